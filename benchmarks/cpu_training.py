"""CPU training throughput: our DPO / reward-model (/ PPO) steps, and DPO side by side with TRL.

    .venv/bin/python benchmarks/cpu_training.py                    # all cases, "small" model
    .venv/bin/python benchmarks/cpu_training.py --preset tiny --cases ours_dpo,trl_dpo
    PYTHONPATH=<trl wheel unpacked> .venv/bin/python benchmarks/cpu_training.py --ranked 4 --lengths hh \
        --cases ours_reward_pairs,ours_reward_groups,trl_reward --batch-size 12 --pairs 240

``--ranked K`` makes reward data as a ranking of K responses per prompt compared in all its
K(K-1)/2 pairs (UltraFeedback rates 4 completions per prompt): ``ours_reward_groups`` runs each
distinct response of a batch once (``share_responses``), ``ours_reward_pairs`` each pair's prompt
once (``share_prompt``), TRL's RewardTrainer both responses of every pair. ``--lengths hh`` draws
token counts from gpu_trl_best.py's HH-RLHF law (prompt 163, response 88 tokens on average).

Every case runs in its own subprocess (so peak RSS is that case's alone) on the same
random-weight Llama-shaped model and the same synthetic pairs (prompt 16-96 words, responses
8-96 words, a word-level tokenizer: one word = one token). Timing skips ``--warmup`` steps and
covers the next ``--steps``; tokens/s counts the non-padding tokens of both responses' full
sequences (prompt + completion; ``ours_dpo_shared`` runs each prompt once but counts it twice,
as the data it trains on is the same), ours from the recipe, TRL's from its ``non_padding`` token
counter: the same definition. Peak memory is the subprocess's max RSS (it includes the ~0.4 GiB
of Python + torch + transformers that every case pays). Settings are matched: fp32, no
gradient checkpointing, no dropout, AdamW at a constant lr, grad clipping 1.0, same batch.

The machine is shared and has 2 cores: expect run-to-run noise of ±20%; compare ratios from
the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    # hidden, layers, heads, intermediate, vocab
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab=1024),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352, vocab=4096),
}
CASES = ["ours_dpo", "ours_dpo_shared", "ours_dpo_padded", "ours_dpo_ref_copy", "trl_dpo", "trl_dpo_precomputed", "ours_reward", "ours_ppo",
         "ours_grpo"]
REWARD_CASES = ["ours_reward_pairs", "ours_reward_groups", "trl_reward", "ours_dpo_groups"]
"""Asked for by name (``--cases``), with ``--ranked`` data (``ours_dpo_groups``: DPO with ``share_responses``)."""


# ---------------------------------------------------------------------------- fixtures
def build_fixtures(work: Path, preset: str, pairs: int, seed: int = 0, ranked: int = 0, lengths: str = "uniform") -> None:
    """A random-weight Llama-shaped model + word-level tokenizer, and synthetic pairs/prompts
    (``ranked`` > 1: about ``pairs`` pairs from rankings of that many responses per prompt)."""
    import pandas as pd
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    p = PRESETS[preset]
    words = [f"w{i}" for i in range(p["vocab"] - 4)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_attention_heads"], intermediate_size=p["intermediate_size"], vocab_size=len(vocab),
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    if lengths == "hh":
        from benchmarks.gpu_trl_best import DISTS, lognormal

        law = DISTS["hh"]

        def prompt_text() -> str:  # clipped to fit max_length 512 with a response
            n = min(lognormal(rng, law["prompt_mean"], law["sigma"]), 256)
            return text(n, n)

        def response_text() -> str:
            n = min(lognormal(rng, law["response_mean"], law["sigma"]), 255)
            return text(n, n)
    else:
        def prompt_text() -> str:
            return text(16, 96)

        def response_text() -> str:
            return text(8, 96)
    k = max(ranked, 2)  # independent pairs are rankings of two
    rows = []
    while len(rows) < pairs:
        prompt = prompt_text()
        responses = [" " + response_text() for _ in range(k)]
        rows += [{"prompt": prompt, "is_chat": False, "chosen": responses[i], "rejected": responses[j],
                  "weight": 1.0} for i in range(k) for j in range(i + 1, k)]
    pd.DataFrame(rows).to_parquet(work / "pairs.parquet")
    pd.DataFrame([{"prompt_id": str(i), "prompt": r["prompt"], "is_chat": False, "split": "train"}
                  for i, r in enumerate(rows)]).to_parquet(work / "prompts.parquet")


def length_reward(prompts, responses):
    """A programmatic reward for the PPO case (``reward_fn``): longer responses score higher."""
    return [len(r.split()) / 10.0 for r in responses]


# ---------------------------------------------------------------------------- cases
def _ours(recipe_name: str, work: Path, args, **overrides) -> dict:
    from alignment.config import RECIPE_CONFIGS
    from alignment.recipes import get_recipe

    stamps: list[tuple[float, int]] = []
    base = {"model": {"name_or_path": str(work / "model")}, "train_path": str(work / "pairs.parquet"),
            "batch_size": args.batch_size, "max_steps": args.warmup + args.steps, "max_length": 512,
            "max_prompt_length": 256, "optim": {"lr": 1e-5, "schedule": "constant", "max_grad_norm": 1.0},
            "seed": 0}
    base.update(overrides)
    recipe = get_recipe(recipe_name)(RECIPE_CONFIGS[recipe_name](**base))
    recipe.callbacks.append(lambda r: r["phase"] == "train" and stamps.append((time.perf_counter(), recipe.tokens_seen)))
    setup_started = time.perf_counter()
    try:
        recipe.setup()
        setup_s = time.perf_counter() - setup_started
        recipe.train()
    finally:
        recipe.cleanup()
    return _rate(stamps, args, setup_s)


def _rate(stamps: list[tuple[float, int]], args, setup_s: float) -> dict:
    """Tokens/s and seconds a step over the steps after ``--warmup`` (``stamps``: time and tokens seen at each step end)."""
    (t0, n0), (t1, n1) = stamps[args.warmup - 1], stamps[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "step_s": (t1 - t0) / (len(stamps) - args.warmup),
            "setup_s": setup_s}


def _run_trl(make_trainer, args) -> dict:
    """Build a TRL trainer (``make_trainer(callbacks)``) and train it, its step ends stamped with TRL's token counter."""
    from transformers import TrainerCallback

    stamps: list[tuple[float, int]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            stamps.append((time.perf_counter(), state.num_input_tokens_seen))

    started = time.perf_counter()
    trainer = make_trainer([Stamp()])
    setup_s = time.perf_counter() - started
    trainer.train()
    return _rate(stamps, args, setup_s)


def _trl_dpo(work: Path, args, precompute: bool) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    frame = datasets.Dataset.from_parquet(str(work / "pairs.parquet")).select_columns(["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, beta=0.1, max_length=512,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute, use_cpu=True, bf16=False,
        logging_steps=10_000, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    return _run_trl(lambda callbacks: DPOTrainer(model=model, args=config, train_dataset=frame, processing_class=tok,
                                                 callbacks=callbacks), args)


def _trl_reward(work: Path, args) -> dict:
    """TRL's RewardTrainer on the same pairs (it pads each batch to its longest sequence; no
    padding-free option), fp32, the same optimizer settings; tokens counted as TRL's non-padding counter."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    frame = datasets.Dataset.from_parquet(str(work / "pairs.parquet")).select_columns(["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForSequenceClassification.from_pretrained(work / "model", num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    config = RewardConfig(
        output_dir=str(work / "trl-rm"), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, max_length=512,
        gradient_checkpointing=False, use_cpu=True, bf16=False, logging_steps=10_000, save_strategy="no",
        report_to="none", seed=0, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
    )
    return _run_trl(lambda callbacks: RewardTrainer(model=model, args=config, train_dataset=frame,
                                                    processing_class=tok, callbacks=callbacks), args)


def run_case(name: str, work: Path, args) -> dict | None:
    """One case in this process; None when the case is not available (PPO before its recipe exists)."""
    if name == "ours_dpo":
        return _ours("dpo", work, args, packing=True, ref_cache_dir=str(work / "refs-packed"))
    if name == "ours_dpo_shared":
        return _ours("dpo", work, args, packing=True, share_prompt=True, ref_cache_dir=str(work / "refs-shared"))
    if name == "ours_dpo_groups":
        return _ours("dpo", work, args, packing=True, share_prompt=True, share_responses=True,
                     ref_cache_dir=str(work / "refs-groups"))
    if name == "ours_dpo_padded":
        return _ours("dpo", work, args, packing=False, ref_cache_dir=str(work / "refs-padded"))
    if name == "ours_dpo_ref_copy":
        return _ours("dpo", work, args, packing=False, reference="copy")
    if name == "ours_reward":
        return _ours("reward", work, args, packing=True)
    if name == "ours_reward_pairs":
        return _ours("reward", work, args, packing=True, share_prompt=True)
    if name == "ours_reward_groups":
        return _ours("reward", work, args, packing=True, share_prompt=True, share_responses=True)
    if name == "trl_reward":
        return _trl_reward(work, args)
    if name == "trl_dpo":
        return _trl_dpo(work, args, precompute=False)
    if name == "trl_dpo_precomputed":
        return _trl_dpo(work, args, precompute=True)
    if name == "ours_ppo":
        # Hook for the PPO recipe (alignment/recipes/ppo.py): measured once it exists.
        try:
            import alignment.recipes.ppo  # noqa: F401
        except ImportError:
            return None
        return _ours("ppo", work, args, train_path=str(work / "prompts.parquet"),
                     reward_fn="benchmarks.cpu_training:length_reward", rollout_batch_size=args.batch_size,
                     minibatch_size=args.batch_size, update_epochs=1, generation={"max_new_tokens": 32})
    if name == "ours_grpo":
        # As many samples per step as PPO: batch_size / 4 prompts x 4 samples each.
        return _ours("grpo", work, args, train_path=str(work / "prompts.parquet"),
                     reward_fn="benchmarks.cpu_training:length_reward", rollout_batch_size=max(1, args.batch_size // 4),
                     group_size=4, minibatch_size=args.batch_size, update_epochs=1, generation={"max_new_tokens": 32})
    raise ValueError(f"unknown case {name!r}; expected one of {CASES + REWARD_CASES}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs (or prompts) per step")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--ranked", type=int, default=0, help="K > 1: pairs from rankings of K responses per prompt")
    parser.add_argument("--lengths", choices=["uniform", "hh"], default="uniform",
                        help="token counts: uniform words (16-96 prompt, 8-96 response) or the HH-RLHF law")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case (interleaved); the best is shown")
    parser.add_argument("--work", help="folder for the model and data (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in every case (0: torch's default). On a shared, oversubscribed "
                             "host 1 avoids OpenMP threads spin-waiting for descheduled siblings")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_case:  # child process: one case, one JSON line
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_case(args.run_case, Path(args.work), args)
        if result is not None:
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="alignflow-bench-"))
    if not (work / "model").exists():
        build_fixtures(work, args.preset, args.pairs, ranked=args.ranked, lengths=args.lengths)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    results: dict[str, dict | None] = {}
    # Cases interleave and repeat; the best run of each is kept (on a shared machine, the least disturbed).
    for _ in range(args.repeats):
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--run-case", case, "--work", str(work), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(f"{case}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                results.setdefault(case, None)
                continue
            result = json.loads(line[len("RESULT "):])
            best = results.get(case)
            if result is not None and (best is None or result["tokens_per_s"] > best["tokens_per_s"]):
                results[case] = result
            else:
                results.setdefault(case, None)
            print(f"{case}: {result and round(result['tokens_per_s'])} tokens/s", file=sys.stderr)

    print(f"\nCPU training throughput — preset {args.preset}, {os.cpu_count()} cores, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup, best of {args.repeats}, "
          f"threads {args.threads or 'default'}")
    print(f"{'case':<22}{'tokens/s':>10}{'s/step':>9}{'setup s':>9}{'peak RSS MiB':>14}")
    for case, r in results.items():
        if r is None:
            print(f"{case:<22}{'n/a (not available or failed)':>42}")
        else:
            print(f"{case:<22}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.3f}{r['setup_s']:>9.1f}{r['peak_rss_mib']:>14.0f}")
    pairs, trl_rm = results.get("ours_reward_pairs"), results.get("trl_reward")
    for case in ("ours_reward_groups", "ours_reward_pairs"):
        for base_case, base in (("trl_reward", trl_rm), ("ours_reward_pairs", pairs)):
            if case != base_case and results.get(case) and base:
                print(f"{case} / {base_case}: {results[case]['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                      f"{results[case]['peak_rss_mib'] / base['peak_rss_mib']:.2f}x peak RSS")
    for case, base_case in (("ours_dpo_groups", "ours_dpo_shared"), ("ours_dpo_groups", "trl_dpo_precomputed")):
        if results.get(case) and results.get(base_case):
            print(f"{case} / {base_case}: {results[case]['tokens_per_s'] / results[base_case]['tokens_per_s']:.2f}x "
                  f"tokens/s, {results[case]['peak_rss_mib'] / results[base_case]['peak_rss_mib']:.2f}x peak RSS")
    for ours_case in ("ours_dpo", "ours_dpo_shared"):
        for trl_case in ("trl_dpo", "trl_dpo_precomputed"):
            ours, trl = results.get(ours_case), results.get(trl_case)
            if ours and trl:
                print(f"{ours_case} / {trl_case}: {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s, "
                      f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
