"""How good a demo reward model is as a judge, on one finished demo round (issue 15).

Scores two held-out sets with each reward-model folder given:

* the round's labelled held-out pairs (``pairs-validation`` and ``pairs-test`` of its preference
  dataset): pairwise accuracy with a Wilson interval and the calibration error (ECE) of
  sigmoid(r_c − r_r), as the reward run and the gate measure it;
* the oracle's order: every two responses the simulator scored for the same held-out prompt
  (prompts of the validation and test splits only) whose VADER scores differ by more than 0.05;
  the share the reward model orders as the oracle does. Larger than the labelled set and free of
  label noise, so it separates settings the labelled set cannot.

With two folders it also runs an exact McNemar test on the labelled pairs (pairs one model gets
right and the other wrong). Usage, after ``make run`` (or any demo home)::

    .venv/bin/python benchmarks/reward_accuracy.py --home .alignflow REWARD_FOLDER [OTHER_FOLDER]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from alignment.batching import decode_prompt
from tasks.evaluation.judge import reliability_from_scores
from tasks.evaluation.metrics import wilson_interval
from tasks.evaluation.suite import reward_scorer_from_folder


def _newest(pattern: str, home: Path) -> Path:
    found = sorted(home.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {home / pattern}: is {home} a finished demo home?")
    return found[-1]


def _oracle_pairs(home: Path, prefs: Path) -> list[tuple[dict, dict]]:
    held = set(pd.concat([pd.read_parquet(prefs / f"prompts-{s}.parquet") for s in ("validation", "test")])["prompt"])
    held -= set(pd.read_parquet(prefs / "prompts-train.parquet")["prompt"])
    truth = pd.concat([pd.read_parquet(p) for p in home.glob("data/demo/simulator/truth-*.parquet")])
    cols = ["prompt", "response", "s"]
    resp = pd.concat([truth[cols].dropna(),
                      truth[["prompt", "response_a", "s_a"]].dropna().set_axis(cols, axis=1),
                      truth[["prompt", "response_b", "s_b"]].dropna().set_axis(cols, axis=1)])
    resp = resp[resp.prompt.isin(held)].drop_duplicates(["prompt", "response"])
    return [(a, b) for _, g in resp.groupby("prompt") for a, b in itertools.combinations(g.to_dict("records"), 2)
            if abs(a["s"] - b["s"]) > 0.05]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path(".alignflow"), help="a demo home (its .alignflow folder)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-prompt-length", type=int, default=16)
    ap.add_argument("folders", nargs="+", help="reward-model folders (a reward run's final/)")
    args = ap.parse_args()
    prefs = _newest("data/demo/preferences/*/pairs-test.parquet", args.home).parent
    labelled = pd.concat([pd.read_parquet(prefs / f"pairs-{s}.parquet") for s in ("validation", "test")])
    rows = labelled.to_dict("records")
    prompts = [decode_prompt(r) for r in rows]
    oracle = _oracle_pairs(args.home, prefs)
    right = {}
    for folder in args.folders:
        score = reward_scorer_from_folder(folder, "cpu", 64, args.max_length, args.max_prompt_length)
        chosen = score(prompts, [r["chosen"] for r in rows])
        rejected = score(prompts, [r["rejected"] for r in rows])
        right[folder] = chosen > rejected
        out = {"folder": folder}
        for split in ("validation", "test", None):
            sel = np.ones(len(rows), bool) if split is None else (labelled["split"] == split).to_numpy()
            rel = reliability_from_scores(chosen[sel], rejected[sel], split=split or "held-out")
            out[rel.split] = {"accuracy": round(rel.accuracy, 4), "ci": [round(rel.lower, 4), round(rel.upper, 4)],
                              "ece": round(rel.ece, 4), "pairs": rel.pairs}
        sa = score([a["prompt"] for a, _ in oracle], [a["response"] for a, _ in oracle])
        sb = score([b["prompt"] for _, b in oracle], [b["response"] for _, b in oracle])
        agree = ((sa - sb) * np.array([a["s"] - b["s"] for a, b in oracle]) > 0).astype(float)
        lo, hi = wilson_interval(agree.sum(), len(agree))
        out["oracle_order"] = {"agreement": round(float(agree.mean()), 4), "ci": [round(lo, 4), round(hi, 4)],
                               "pairs": len(agree)}
        print(json.dumps(out))
    if len(args.folders) == 2:
        a, b = (right[f] for f in args.folders)
        only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
        p = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
        print(f"labelled held-out pairs: right only by the first {only_a}, only by the second {only_b}; "
              f"exact McNemar p = {p:.3g}")


if __name__ == "__main__":
    main()
