"""Judge a finished loop's rounds again on other held-out prompts: the same models, another evaluation set.

For each round of a demo home (``alignflow run`` then ``alignflow demo --rounds N``, no re-runs: the i-th
evaluation and the i-th reward model by time belong to round i), it reruns the evaluation suite of that round
(candidate against the champion it challenged, the base model as reference, the round's reward model and the
oracle as judges) on the prompts of ``--splits`` (``test``: what the gate saw with the default
``evaluation.prompt_splits``; ``test validation``: the 220 prompts of the demo config), greedy decoding off, and
prints one JSON line per round: oracle mean, KL, distinct-2 as a share of the base's, the repeated-trigram rise,
and each judge's paired win rate against the champion with its 95% interval. A round's verdict on the test split
reproduces the gate's figures to the digit (same seed, same models), so the other set's verdicts differ only
by the prompts. ``--reward-model`` judges every round with one fixed reward model instead (e.g. the demo's
offline one, which no round's feedback trained); ``--previous-judge`` judges round i with round i-1's reward model,
which never saw the feedback round i's candidate trained on. Rounds after the first verdict that would change are
counterfactual: the loop would have gone on from another champion.

    .venv/bin/python benchmarks/rejudge_loop.py --home <home> --splits test validation --out rejudge.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import load_pipeline_config  # noqa: E402
from tasks.demo.oracle import sentiment  # noqa: E402
from tasks.evaluation.suite import evaluate_models  # noqa: E402


def judge_of(rewards: list[Path], i: int, previous: bool) -> str | None:
    """The reward folder that judges round ``i``: its own, or with ``previous`` the round before's."""
    j = max(i - 1, 0) if previous else i
    return str(rewards[j]) if j < len(rewards) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="the demo home (ALIGNFLOW_HOME)")
    parser.add_argument("--splits", nargs="+", default=["test", "validation"], choices=["test", "validation"])
    parser.add_argument("--out", default=None, help="also write the lines here")
    judge = parser.add_mutually_exclusive_group()
    judge.add_argument("--reward-model", default=None,
                       help="judge every round with this reward folder instead of the round's own")
    judge.add_argument("--previous-judge", action="store_true",
                       help="judge round i with round i-1's reward model (round 0 with its own)")
    args = parser.parse_args()
    home = Path(args.home)
    runs = home / "runs" / "demo"
    table = pd.read_parquet(next((home / "data" / "demo" / "demo-prompts").glob("prompts-*.parquet")))
    prompts = [p for split in args.splits for p in table.loc[table["split"] == split, "prompt"].tolist()]
    cfg = load_pipeline_config(None, [f"pipeline.home={home}"])
    settings = cfg.evaluation.model_copy(update={"num_prompts": len(prompts), "greedy": False})
    evals = sorted(runs.glob("eval-*/eval_report.json"), key=lambda p: p.stat().st_mtime)
    rewards = sorted(runs.glob("reward-*/final"), key=lambda p: p.stat().st_mtime)
    lines = []
    for i, path in enumerate(evals):
        report = json.loads(path.read_text())
        champion = None if report["champion_is_reference"] else report["champion"]["path"]
        out = evaluate_models(report["candidate"]["path"], champion, report["reference"]["path"], prompts, None,
                              reward_model=args.reward_model or judge_of(rewards, i, args.previous_judge), oracle=sentiment,
                              settings=settings, beta=report["beta"])
        r = out.report
        row = {"round": i, "splits": args.splits, "prompts": r.num_prompts, "oracle": r.candidate.oracle_mean,
               "base_oracle": r.reference.oracle_mean, "kl": r.candidate.kl,
               "distinct2_ratio": r.candidate.distinct_2 / r.reference.distinct_2,
               "rep3_rise": r.candidate.repeated_trigram_rate - r.reference.repeated_trigram_rate}
        for w in r.win_rates:
            if w.opponent == "champion":
                row[f"win_{w.judge}"] = [round(w.rate, 3), round(w.lower, 3), round(w.upper, 3)]
        lines.append(json.dumps(row))
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
