"""Monitoring a new feedback batch against a reference batch: does the model need retraining?

:func:`monitor_batch` runs these checks (thresholds in :class:`MonitorSettings`):

| check | statistic | fires when |
|---|---|---|
| ``prompt_length``, ``response_length`` (and ``rating_score``) | PSI (reference-quantile bins) and two-sample KS, in words | PSI > ``psi_threshold`` and KS p < ``alpha`` |
| ``prompt_vocabulary``, ``response_vocabulary`` | token-distribution JS (bits) beyond its permutation noise floor | excess JS > ``js_threshold`` and permutation p < ``alpha`` |
| ``preference_balance`` | share of ``a`` among a/b choices (pairwise) or of thumbs-up (binary) | shift > ``max_preference_balance_shift`` and two-proportion p < ``alpha`` |
| ``annotator_agreement`` | share of agreeing label pairs on items labelled twice or more | drop > ``max_agreement_drop`` and one-sided p < ``alpha`` |
| ``reward_accuracy`` (concept drift) | the champion reward model's accuracy on the new pairwise labels | accuracy < ``min_reward_accuracy`` and binomial p < ``alpha`` |

Each check needs both a material effect and a significant test: effect sizes alone are
inflated by sampling noise in small batches, p-values alone flag immaterial shifts in large
ones. With fewer than ``min_rows`` new rows nothing fires. Inputs are validated feedback
tables (DESIGN.md kinds); a check whose columns are absent is skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy import stats

from alignment.batching import decode_prompt
from tasks.evaluation import metrics as M
from tasks.evaluation.settings import MonitorSettings

RewardScorer = Callable[[list, list[str]], Sequence[float]]
"""(prompts, responses) -> reward scores, e.g. the champion reward model."""


class DriftCheck(BaseModel):
    """One detector's statistics and verdict."""

    name: str
    value: float | None
    """The effect size compared with ``threshold`` (PSI, excess JS, shift, drop, accuracy)."""
    threshold: float
    pvalue: float | None
    """The test's p-value (None when the check could not run)."""
    triggered: bool
    stats: dict[str, float] = Field(default_factory=dict)
    """Everything else measured (means, raw JS, KS statistic, counts)."""
    message: str


class DriftReport(BaseModel):
    """The monitor's verdict on one batch."""

    triggered: bool
    reasons: list[str] = Field(default_factory=list)
    """One sentence per fired check (empty when nothing fired)."""
    checks: list[DriftCheck] = Field(default_factory=list)
    rows_new: int
    rows_reference: int

    def check(self, name: str) -> DriftCheck | None:
        return next((c for c in self.checks if c.name == name), None)

    def metrics(self, prefix: str = "drift/") -> dict[str, float]:
        """Flat finite numbers for MLflow: ``drift/<check>/value``, ``.../pvalue``, ``.../triggered``, stats."""
        out: dict[str, float] = {f"{prefix}triggered": float(self.triggered)}
        for c in self.checks:
            items = {"value": c.value, "pvalue": c.pvalue, "triggered": float(c.triggered), **c.stats}
            out.update({f"{prefix}{c.name}/{k}": float(v) for k, v in items.items()
                        if v is not None and math.isfinite(float(v))})
        return out

    def to_markdown(self) -> str:
        """A table for a Prefect artifact."""
        head = "**Drift detected: retraining triggered.**" if self.triggered else "No drift detected."
        lines = [head, "", *[f"- {r}" for r in self.reasons], "",
                 f"new rows: {self.rows_new}, reference rows: {self.rows_reference}", "",
                 "| check | value | threshold | p-value | fired | |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            v = "n/a" if c.value is None else f"{c.value:.4g}"
            p = "n/a" if c.pvalue is None else f"{c.pvalue:.3g}"
            lines.append(f"| {c.name} | {v} | {c.threshold:g} | {p} | {'yes' if c.triggered else 'no'} | {c.message} |")
        return "\n".join(lines)


# --- extracting texts -----------------------------------------------------------------------
def _prompt_text(prompt, is_chat: bool = False) -> str:
    if isinstance(prompt, str) and is_chat:
        try:
            prompt = json.loads(prompt)
        except ValueError:
            return prompt
    if isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        return " ".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in list(prompt))
    return str(prompt)


def _prompts(df: pd.DataFrame) -> list[str]:
    chat = df["is_chat"] if "is_chat" in df else pd.Series(False, index=df.index)
    return [_prompt_text(p, bool(c)) for p, c in zip(df["prompt"], chat, strict=True)]


def _responses(df: pd.DataFrame) -> list[str]:
    if {"response_a", "response_b"} <= set(df.columns):
        return [str(x) for x in pd.concat([df["response_a"], df["response_b"]])]
    if "responses" in df:
        return [str(r) for rs in df["responses"] for r in rs]
    if "response" in df:
        return [str(x) for x in df["response"]]
    return []


# --- checks ---------------------------------------------------------------------------------
def _distribution_check(name: str, new: Sequence[float], ref: Sequence[float], s: MonitorSettings,
                        enough: bool, unit: str) -> DriftCheck:
    psi = M.psi(new, ref, bins=s.psi_bins)
    ks_stat, ks_p = M.ks_test(new, ref)
    fired = enough and psi > s.psi_threshold and ks_p < s.alpha
    mean_new, mean_ref = float(np.mean(new)), float(np.mean(ref))
    msg = (f"{name.replace('_', ' ')} shifted: mean {mean_ref:.1f} -> {mean_new:.1f} {unit}, PSI {psi:.3f} "
           f"(> {s.psi_threshold:g}), KS p = {ks_p:.2g}" if fired else
           f"mean {mean_ref:.1f} -> {mean_new:.1f} {unit}, PSI {psi:.3f}, KS p = {ks_p:.2g}")
    return DriftCheck(name=name, value=psi, threshold=s.psi_threshold, pvalue=ks_p, triggered=fired,
                      stats={"ks_statistic": ks_stat, "mean_new": mean_new, "mean_reference": mean_ref}, message=msg)


def _vocabulary_check(name: str, new: list[str], ref: list[str], s: MonitorSettings, enough: bool,
                      tokenize, seed: int) -> DriftCheck:
    res = M.js_permutation_test(new, ref, rounds=s.permutation_rounds, seed=seed, tokenize=tokenize)
    fired = enough and res.excess > s.js_threshold and res.pvalue < s.alpha
    msg = (f"{name.replace('_', ' ')} shifted: JS {res.js:.3f} bits, {res.excess:.3f} above the noise floor "
           f"(> {s.js_threshold:g}), permutation p = {res.pvalue:.2g}" if fired else
           f"JS {res.js:.3f} bits, noise floor {res.null_mean:.3f}, p = {res.pvalue:.2g}")
    return DriftCheck(name=name, value=res.excess, threshold=s.js_threshold, pvalue=res.pvalue, triggered=fired,
                      stats={"js": res.js, "noise_floor": res.null_mean}, message=msg)


def _two_proportions(k1: float, n1: int, k2: float, n2: int, alternative: str = "two-sided") -> float:
    """p-value of the pooled two-proportion z-test of p1 = p2 (``less``: p1 < p2)."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    return float(2 * stats.norm.sf(abs(z)) if alternative == "two-sided" else stats.norm.cdf(z))


def _balance(df: pd.DataFrame) -> tuple[float, int] | None:
    """(count of 'a' or thumbs-up, count of decisive rows), or None when the kind has no balance."""
    if "choice" in df:
        choice = df["choice"].astype(str).str.strip().str.lower()
        decisive = choice.isin(["a", "b"])
        return float((choice[decisive] == "a").sum()), int(decisive.sum())
    if "label" in df:
        return float(df["label"].astype(bool).sum()), len(df)
    return None


def _balance_check(new: pd.DataFrame, ref: pd.DataFrame, s: MonitorSettings, enough: bool) -> DriftCheck | None:
    bn, br = _balance(new), _balance(ref)
    if bn is None or br is None or bn[1] == 0 or br[1] == 0:
        return None
    pn, pr = bn[0] / bn[1], br[0] / br[1]
    p = _two_proportions(bn[0], bn[1], br[0], br[1])
    shift = abs(pn - pr)
    fired = enough and shift > s.max_preference_balance_shift and p < s.alpha
    what = "share of 'a' choices" if "choice" in new else "share of thumbs-up"
    msg = f"{what} moved {pr:.2f} -> {pn:.2f} (p = {p:.2g})"
    return DriftCheck(name="preference_balance", value=shift, threshold=s.max_preference_balance_shift, pvalue=p,
                      triggered=fired, stats={"share_new": pn, "share_reference": pr}, message=msg)


def _agreement(df: pd.DataFrame) -> tuple[int, int]:
    """(agreeing label pairs, all label pairs) over items labelled by more than one annotator."""
    if "annotator_id" not in df:
        return 0, 0
    if "choice" in df:
        keys, labels = [], []
        for p, a, b, c in zip(df["prompt"].astype(str), df["response_a"].astype(str), df["response_b"].astype(str),
                              df["choice"].astype(str).str.strip().str.lower(), strict=True):
            flip = a > b  # orient every item the same way so a swapped presentation still agrees
            keys.append((p, b, a) if flip else (p, a, b))
            labels.append({"a": "b", "b": "a"}.get(c, c) if flip else c)
    elif "label" in df:
        keys = list(zip(df["prompt"].astype(str), df["response"].astype(str), strict=True))
        labels = list(df["label"].astype(bool))
    else:
        return 0, 0
    groups: dict = {}  # item -> {annotator: label}; an annotator's repeat label replaces the earlier one
    for k, ann, lab in zip(keys, df["annotator_id"].astype(str), labels, strict=True):
        groups.setdefault(k, {})[ann] = lab
    agree = total = 0
    for labs in groups.values():
        for x, y in combinations(labs.values(), 2):
            total += 1
            agree += x == y
    return agree, total


def _agreement_check(new: pd.DataFrame, ref: pd.DataFrame, s: MonitorSettings, enough: bool) -> DriftCheck | None:
    (an, tn), (ar, tr) = _agreement(new), _agreement(ref)
    if tn == 0 or tr == 0:
        return None
    gn, gr = an / tn, ar / tr
    p = _two_proportions(an, tn, ar, tr, alternative="less")
    drop = gr - gn
    # Label pairs on one item share annotators and items, so the test is approximate.
    fired = enough and drop > s.max_agreement_drop and p < s.alpha
    msg = f"annotator agreement {gr:.2f} -> {gn:.2f} over {tn} label pairs (p = {p:.2g})"
    return DriftCheck(name="annotator_agreement", value=drop, threshold=s.max_agreement_drop, pvalue=p,
                      triggered=fired, stats={"agreement_new": gn, "agreement_reference": gr, "pairs_new": tn},
                      message=msg)


def _reward_accuracy(df: pd.DataFrame, scorer: RewardScorer) -> tuple[float, int]:
    choice = df["choice"].astype(str).str.strip().str.lower()
    sub = df[choice.isin(["a", "b"])]
    if sub.empty:
        return 0.0, 0
    chat = sub["is_chat"] if "is_chat" in sub else pd.Series(False, index=sub.index)
    prompts = [decode_prompt({"prompt": p, "is_chat": bool(c)}) for p, c in zip(sub["prompt"], chat, strict=True)]
    sa = np.asarray(scorer(prompts, [str(x) for x in sub["response_a"]]), dtype=float)
    sb = np.asarray(scorer(prompts, [str(x) for x in sub["response_b"]]), dtype=float)
    wants_a = (choice[sub.index] == "a").to_numpy()
    correct = np.where(sa == sb, 0.5, ((sa > sb) == wants_a).astype(float))
    return float(correct.sum()), len(sub)


def _reward_check(new: pd.DataFrame, ref: pd.DataFrame, s: MonitorSettings, enough: bool,
                  scorer: RewardScorer) -> DriftCheck | None:
    if "choice" not in new:
        return None
    k, n = _reward_accuracy(new, scorer)
    if n == 0:
        return None
    acc = k / n
    p = float(stats.binomtest(int(math.floor(k)), n, s.min_reward_accuracy, alternative="less").pvalue)
    fired = enough and acc < s.min_reward_accuracy and p < s.alpha
    extra = {"correct": k, "pairs": float(n)}
    ref_part = ""
    if "choice" in ref:
        kr, nr = _reward_accuracy(ref, scorer)
        if nr:
            extra["accuracy_reference"] = kr / nr
            ref_part = f" (reference batch {kr / nr:.2f})"
    msg = (f"the champion reward model agrees with {acc:.0%} of {n} new labels{ref_part}, "
           f"{'below' if acc < s.min_reward_accuracy else 'above'} {s.min_reward_accuracy:.0%} (p = {p:.2g})")
    return DriftCheck(name="reward_accuracy", value=acc, threshold=s.min_reward_accuracy, pvalue=p, triggered=fired,
                      stats=extra, message=msg)


def monitor_batch(
    new_batch: pd.DataFrame,
    reference_batch: pd.DataFrame,
    settings: MonitorSettings,
    reward_scorer: RewardScorer | None = None,
    *,
    tokenize: Callable[[str], list] | None = None,
    seed: int = 0,
) -> DriftReport:
    """Compare ``new_batch`` with ``reference_batch`` (validated feedback tables of one kind).

    ``tokenize`` splits text for lengths and vocabulary (default: lowercase words and
    punctuation, :func:`tasks.evaluation.metrics.word_tokens`); ``seed`` seeds the permutation tests.
    Raises ValueError when either batch is empty or has no ``prompt`` column.
    """
    for name, df in (("new_batch", new_batch), ("reference_batch", reference_batch)):
        if df is None or len(df) == 0:
            raise ValueError(f"{name} is empty")
        if "prompt" not in df:
            raise ValueError(f"{name} has no 'prompt' column; columns: {list(df.columns)}")
    s, tok = settings, tokenize or M.word_tokens
    enough = len(new_batch) >= s.min_rows
    checks: list[DriftCheck] = []

    pn, pr = _prompts(new_batch), _prompts(reference_batch)
    checks.append(_distribution_check("prompt_length", [len(tok(t)) for t in pn], [len(tok(t)) for t in pr],
                                      s, enough, "words"))
    rn, rr = _responses(new_batch), _responses(reference_batch)
    if rn and rr:
        checks.append(_distribution_check("response_length", [len(tok(t)) for t in rn],
                                          [len(tok(t)) for t in rr], s, enough, "words"))
    if "score" in new_batch and "score" in reference_batch:
        checks.append(_distribution_check("rating_score", new_batch["score"].astype(float),
                                          reference_batch["score"].astype(float), s, enough, "points"))
    checks.append(_vocabulary_check("prompt_vocabulary", pn, pr, s, enough, tok, seed))
    if rn and rr:
        checks.append(_vocabulary_check("response_vocabulary", rn, rr, s, enough, tok, seed + 1))
    for extra in (_balance_check(new_batch, reference_batch, s, enough),
                  _agreement_check(new_batch, reference_batch, s, enough),
                  _reward_check(new_batch, reference_batch, s, enough, reward_scorer) if reward_scorer else None):
        if extra is not None:
            checks.append(extra)

    fired = [c for c in checks if c.triggered]
    reasons = [f"{c.name}: {c.message}." for c in fired]
    if not enough:
        reasons = []
        for c in checks:
            c.message += f" (only {len(new_batch)} new rows, fewer than min_rows={s.min_rows}: not acted on)"
    return DriftReport(triggered=bool(fired), reasons=reasons, checks=checks, rows_new=len(new_batch),
                       rows_reference=len(reference_batch))
