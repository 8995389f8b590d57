"""How good a demo reward model is as a judge, on one finished demo round (issue 15).

Scores two held-out sets with each reward-model folder given:

* the round's labelled held-out pairs (``pairs-validation`` and ``pairs-test`` of its preference
  dataset): pairwise accuracy with a Wilson interval and the calibration error (ECE) of
  sigmoid(r_c − r_r), as the reward run and the gate measure it;
* the oracle's order: every two responses the simulator scored for the same held-out prompt
  (prompts of the validation and test splits only) whose VADER scores differ by more than 0.05;
  the share the reward model orders as the oracle does. Larger than the labelled set and free of
  label noise, so it separates settings the labelled set cannot.

* the raw held-out labels: every well-formed, non-tie comparison an annotator gave on a held-out
  prompt, one row per annotator (spammers included), before the builder aggregates them. This
  is the set the simulator's Bayes ceiling (``best_accuracy`` in its report, mean max(p, 1 - p))
  is computed on, so only here are the two comparable: ``raw_labels`` gives the model's
  realised accuracy, its expected accuracy (mean over rows of the true probability of the side it
  picks: the label noise averaged out) and the ceiling on those same rows.

The ceilings are printed once (``ceilings``): the simulator's mean max(p, 1 - p) on the raw
held-out labels (and on all of them, as its report gives it), and the oracle's realised accuracy
on the raw held-out labels and on the built held-out pairs. The built pairs aggregate several
annotators per item, so their labels are much less noisy than single labels (the oracle agrees
with about 0.93 of them, against 0.85 of raw labels): accuracy on built pairs must be held
against the oracle's accuracy on those pairs, not against the simulator's raw-label ceiling.

Calibration: ``test_ece_at_validation_temperature`` is the test pairs' ECE of σ((r_c − r_r)/T) with
T fitted on the validation pairs (BT log-loss; accuracy unchanged). ``--bag-of-words C`` adds a
baseline that is not a reward model: Bradley–Terry logistic regression on binary word features of
the training pairs (L2, no intercept: 0.5‖w‖² + 2C Σ weight·log(1 + exp(−(x_c − x_r)·w))), scored
on the same held-out sets — the textbook shape for a lexicon oracle such as VADER.

With two folders it also runs exact McNemar tests on the labelled pairs and on the oracle-order
pairs (pairs one model gets right and the other wrong; the oracle-order pairs of one prompt share
responses, so that test is optimistic). Usage, after ``make run`` (or any demo home)::

    .venv/bin/python benchmarks/reward_accuracy.py --home .alignflow REWARD_FOLDER [OTHER_FOLDER]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from scipy.stats import binomtest

from alignment.batching import decode_prompt
from tasks.demo.annotators import best_accuracy
from tasks.evaluation.judge import reliability_from_scores
from tasks.evaluation.metrics import wilson_interval
from tasks.evaluation.suite import reward_scorer_from_folder


def _newest(pattern: str, home: Path) -> Path:
    found = sorted(home.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {home / pattern}: is {home} a finished demo home?")
    return found[-1]


def _held_prompts(prefs: Path) -> set[str]:
    held = set(pd.concat([pd.read_parquet(prefs / f"prompts-{s}.parquet") for s in ("validation", "test")])["prompt"])
    return held - set(pd.read_parquet(prefs / "prompts-train.parquet")["prompt"])


def _truth(home: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in home.glob("data/demo/simulator/truth-*.parquet")])


def _scores(truth: pd.DataFrame) -> pd.DataFrame:
    """Every (prompt, response) the oracle scored, with its score ``s``."""
    cols = ["prompt", "response", "s"]
    return pd.concat([truth[cols].dropna(),
                      truth[["prompt", "response_a", "s_a"]].dropna().set_axis(cols, axis=1),
                      truth[["prompt", "response_b", "s_b"]].dropna().set_axis(cols, axis=1)]
                     ).drop_duplicates(["prompt", "response"])


def _oracle_pairs(truth: pd.DataFrame, held: set[str]) -> list[tuple[dict, dict]]:
    resp = _scores(truth)
    resp = resp[resp.prompt.isin(held)]
    return [(a, b) for _, g in resp.groupby("prompt") for a, b in itertools.combinations(g.to_dict("records"), 2)
            if abs(a["s"] - b["s"]) > 0.05]


def _labels(truth: pd.DataFrame) -> pd.DataFrame:
    """Well-formed, non-tie comparison labels (one per annotator)."""
    return truth[(truth["kind"] == "pairwise") & truth["malformed"].isna() & truth["choice"].isin(["a", "b"])]


def _raw_labels(truth: pd.DataFrame, held: set[str]) -> pd.DataFrame:
    """:func:`_labels` on held-out prompts."""
    ok = _labels(truth)
    return ok[ok.prompt.isin(held)].reset_index(drop=True)


def _ceilings(truth: pd.DataFrame, raw: pd.DataFrame, labelled: pd.DataFrame) -> dict:
    """The simulator's Bayes ceiling and the oracle's realised accuracy, raw and built (module docstring)."""
    p = raw["p_a"].astype(float).to_numpy()
    every = _labels(truth)
    s = {(r.prompt, r.response): r.s for r in _scores(truth).itertuples()}
    sc = np.array([s.get((r["prompt"], r["chosen"]), np.nan) for r in labelled.to_dict("records")])
    sr = np.array([s.get((r["prompt"], r["rejected"]), np.nan) for r in labelled.to_dict("records")])
    known = ~(np.isnan(sc) | np.isnan(sr))
    oracle_raw = np.where(raw["s_a"] > raw["s_b"], "a", np.where(raw["s_a"] < raw["s_b"], "b", "-"))
    return {
        "raw_held_out": {"labels": len(raw), "bayes_ceiling": round(best_accuracy(p), 4),
                         "oracle_realised": round(float((oracle_raw == raw["choice"]).mean()), 4)},
        "raw_all": {"labels": len(every), "bayes_ceiling": round(best_accuracy(every["p_a"].astype(float)), 4)},
        "built_held_out": {"pairs": int(known.sum()), "oracle_realised":
                           round(float(((sc > sr) + 0.5 * (sc == sr))[known].mean()), 4)},
    }


def _temperature(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """T minimising the BT log-loss mean log(1 + exp(-(r_c - r_r) / T))."""
    d = chosen - rejected
    fit = minimize_scalar(lambda t: float(np.mean(np.logaddexp(0.0, -d / np.exp(t)))), bounds=(-4, 4), method="bounded")
    return float(np.exp(fit.x))


YARDSTICK_WORDS = re.compile(r"\w+|[!?]")


def yardstick_words(text: str) -> list[str]:
    """Lowercased word tokens (and ! ?): what the bag-of-words yardstick reads of a response."""
    return YARDSTICK_WORDS.findall(text.lower())


def _bag_of_words(train: pd.DataFrame, c: float, prior=None):
    """A scorer: BT logistic regression on binary word features (module docstring).

    ``prior`` (texts -> scores), when given, is one more feature whose weight is all but
    unregularised (1e-3 of the words' L2): a sentiment score the words' weights correct.
    """
    import scipy.sparse as sp

    words = lambda text: set(yardstick_words(text))  # noqa: E731
    vocab = {w: i for i, w in enumerate(sorted(set().union(*map(words, pd.concat([train.chosen, train.rejected])))))}

    def features(texts: list[str]) -> sp.csr_matrix:
        cols = [sorted(vocab[w] for w in words(t) if w in vocab) for t in texts]
        rows = [i for i, js in enumerate(cols) for _ in js]
        x = sp.csr_matrix((np.ones(len(rows)), (rows, [j for js in cols for j in js])), shape=(len(texts), len(vocab)))
        return x if prior is None else sp.hstack([x, sp.csr_matrix(np.asarray(prior(texts), float)[:, None])]).tocsr()

    d = (features(train.chosen.tolist()) - features(train.rejected.tolist())).tocsr()
    weight = train["weight"].to_numpy(float)
    reg = np.ones(d.shape[1])
    if prior is not None:
        reg[-1] = 1e-3

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = d @ w
        grad = -(d.T @ (weight * 2 * c / (1 + np.exp(z))))
        return float(0.5 * (reg * w) @ w + 2 * c * np.sum(weight * np.logaddexp(0.0, -z))), reg * w + grad

    w = minimize(loss, np.zeros(d.shape[1]), jac=True, method="L-BFGS-B").x
    return lambda prompts, responses: features(list(responses)) @ w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path(".alignflow"), help="a demo home (its .alignflow folder)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-prompt-length", type=int, default=16)
    ap.add_argument("--bag-of-words", type=float, metavar="C", help="also score a bag-of-words BT baseline")
    ap.add_argument("folders", nargs="*", help="reward-model folders (a reward run's final/)")
    args = ap.parse_args()
    prefs = _newest("data/demo/preferences/*/pairs-test.parquet", args.home).parent
    labelled = pd.concat([pd.read_parquet(prefs / f"pairs-{s}.parquet") for s in ("validation", "test")])
    rows = labelled.to_dict("records")
    prompts = [decode_prompt(r) for r in rows]
    truth, held = _truth(args.home), _held_prompts(prefs)
    oracle = _oracle_pairs(truth, held)
    raw = _raw_labels(truth, held)
    raw_prompts = raw["prompt"].tolist()
    p_a = raw["p_a"].astype(float).to_numpy()
    print(json.dumps({"ceilings": _ceilings(truth, raw, labelled)}))
    right, ordered = {}, {}
    scorers = {f: None for f in args.folders}
    if args.bag_of_words is not None:
        scorers[f"bag-of-words C={args.bag_of_words:g}"] = _bag_of_words(
            pd.read_parquet(prefs / "pairs-train.parquet"), args.bag_of_words)
    for folder, score in scorers.items():
        if score is None:
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
        val, test = (labelled["split"] == "validation").to_numpy(), (labelled["split"] == "test").to_numpy()
        t = _temperature(chosen[val], rejected[val])
        out["test_ece_at_validation_temperature"] = {
            "temperature": round(t, 3), "ece": round(reliability_from_scores(chosen[test] / t, rejected[test] / t,
                                                                          split="test").ece, 4)}
        sa = score([a["prompt"] for a, _ in oracle], [a["response"] for a, _ in oracle])
        sb = score([b["prompt"] for _, b in oracle], [b["response"] for _, b in oracle])
        agree = ((sa - sb) * np.array([a["s"] - b["s"] for a, b in oracle]) > 0).astype(float)
        ordered[folder] = agree > 0
        lo, hi = wilson_interval(agree.sum(), len(agree))
        out["oracle_order"] = {"agreement": round(float(agree.mean()), 4), "ci": [round(lo, 4), round(hi, 4)],
                               "pairs": len(agree)}
        picks_a = score(raw_prompts, raw["response_a"].tolist()) > score(raw_prompts, raw["response_b"].tolist())
        hit = picks_a == (raw["choice"] == "a").to_numpy()
        lo, hi = wilson_interval(hit.sum(), len(hit))
        out["raw_labels"] = {"accuracy": round(float(hit.mean()), 4), "ci": [round(lo, 4), round(hi, 4)],
                             "expected_accuracy": round(float(np.where(picks_a, p_a, 1 - p_a).mean()), 4),
                             "labels": len(hit)}
        print(json.dumps(out))
    if len(args.folders) == 2:
        for what, hits in (("labelled held-out pairs", right), ("oracle-order pairs", ordered)):
            a, b = (hits[f] for f in args.folders)
            only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
            p = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
            print(f"{what}: right only by the first {only_a}, only by the second {only_b}; "
                  f"exact McNemar p = {p:.3g}")


if __name__ == "__main__":
    main()
