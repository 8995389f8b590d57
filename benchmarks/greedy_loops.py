"""Greedy output of policy folders on the demo's held-out prompts: does it loop? (issue 15, point 2)

For each model folder: greedy decoding (``max_new_tokens`` tokens) of the first ``--prompts``
test prompts of a prompts table, then per response the repeated-trigram share
rep-3(y) = 1 − |unique word trigrams| / |word trigrams| (seq-rep-3, Welleck et al. 2020; 0 for a
response under three words), and
prints one JSON line: the mean rep-3, the share of responses that loop (rep-3 above
``--loop-threshold``, 0.1 by default: one trigram in ten a repeat) and distinct-2 over all
responses, then a few prompt → response examples. The evaluation's guards measure sampled text;
this is the greedy check point 2 asks for. The definitions are the evaluation's
(:func:`tasks.evaluation.metrics.loop_stats`), which reports the same figures for every
evaluated model (``evaluation.greedy``) and the gate's ``greedy_loops`` rule reads.

With ``--splits test,validation`` the prompts are those the evaluation decodes greedily under
``evaluation.greedy_splits: [test, validation]`` (the test prompts, then the validation ones); each
line then also gives the share's standard error and, for every folder after the first (the base
model), the rise of its looping share over the first folder's with the standard error paired per
prompt (the gate's ``greedy_loops`` figure), and the share on the test prompts alone.

Usage (the demo's prompt table, ``split`` column ``test``: the 103 held-out prompts the evaluation uses):
    .venv/bin/python benchmarks/greedy_loops.py --prompts-file <home>/data/demo/demo-prompts/prompts-<base digest>.parquet \
        [--splits test,validation] <base-model folder> <champion folder> ...
"""

from __future__ import annotations

import argparse
import json
import math

from tasks.evaluation.metrics import LOOP_THRESHOLD, distinct_n, loop_stats, looping, paired_share_diff_se


def loop_summary(texts: list[str], threshold: float = LOOP_THRESHOLD) -> dict[str, float]:
    """Mean seq-rep-3, the share of texts that loop and distinct-2, rounded for the JSON line:
    :func:`tasks.evaluation.metrics.loop_stats`, the evaluation's own definition."""
    stats = loop_stats(texts, 3, threshold)
    return {"mean_seq_rep3": round(stats.mean_seq_rep, 3), "looping_share": round(stats.looping_share, 3),
            "distinct2": round(distinct_n(texts, 2), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="model folders (Hugging Face causal LMs)")
    parser.add_argument("--prompts-file", required=True, help="a prompts Parquet table with a split column")
    parser.add_argument("--prompts", type=int, default=103, help="how many test prompts (default 103)")
    parser.add_argument("--splits", default="test",
                        help="comma-separated: test (the first --prompts test prompts), validation (all of them)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--loop-threshold", type=float, default=LOOP_THRESHOLD)
    args = parser.parse_args(argv)

    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.config import GenerationSettings
    from alignment.generation import generate

    table = pd.read_parquet(args.prompts_file)
    splits = args.splits.split(",")
    test = table.loc[table["split"] == "test", "prompt"].tolist()[: args.prompts] if "test" in splits else []
    seen = set(test)
    prompts = test + [p for p in table.loc[table["split"] == "validation", "prompt"].tolist()
                      if "validation" in splits and p not in seen]
    first = None
    for folder in args.folders:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.inference_mode():
            out = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=args.max_new_tokens,
                                                                         do_sample=False, batch_size=64), 0)
        flags = looping(out.texts, 3, args.loop_threshold)
        line = {"model": folder, "prompts": len(prompts), **loop_summary(out.texts, args.loop_threshold),
                "looping_share_se": round(math.sqrt(flags.mean() * (1 - flags.mean()) / len(flags)), 3)}
        if len(test) < len(prompts):
            line["looping_share_test"] = round(float(flags[: len(test)].mean()), 3) if test else None
        if first is None:
            first = flags
        else:
            line["rise_over_first"] = round(float(flags.mean() - first.mean()), 3)
            line["rise_se_paired"] = round(paired_share_diff_se(flags, first), 3)
        print(json.dumps(line))
        for prompt, text in list(zip(prompts, out.texts, strict=True))[:3]:
            print("   ", repr(prompt), "->", repr(text))


if __name__ == "__main__":
    main()
