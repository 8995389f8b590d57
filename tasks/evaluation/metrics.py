"""Pure evaluation and drift statistics: win rates with intervals, sequence KL, text guards, drift.

Every function takes plain numbers, arrays or strings and returns numbers or small frozen
dataclasses; nothing here loads a model or talks to a tracker. Conventions:

* **Paired comparisons.** ``scores_a[i]`` and ``scores_b[i]`` judge two models' responses to
  the same prompt drawn with the same sampling seed. ``groups[i]`` (optional) names the prompt
  of comparison ``i`` when there are several samples per prompt; statistics then treat the
  prompt as the independent unit.
* **Words.** Text statistics (distinct-n, repetition, token distributions) use
  :func:`word_tokens` (lowercased ``\\w+`` runs and single punctuation marks) unless the caller
  passes token lists.
* Empty inputs raise ``ValueError`` naming the argument, rather than returning NaN.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import sparse, stats

from alignment.text_stats import distinct_n, ngrams, tokenised, word_tokens

__all__ = [
    "WinRate",
    "KLEstimate",
    "Accuracy",
    "wilson_interval",
    "paired_outcomes",
    "win_rate",
    "sequence_kl",
    "word_tokens",
    "distinct_n",
    "windowed_distinct_n",
    "repetition_rate",
    "LOOP_THRESHOLD",
    "seq_rep",
    "LoopStats",
    "loop_stats",
    "malformed_reasons",
    "malformed_share",
    "length_stats",
    "length_drift",
    "perplexity",
    "token_loglik",
    "preference_accuracy",
    "Agreement",
    "judge_agreement",
    "calibration_ece",
    "psi",
    "ks_test",
    "js_divergence",
    "token_js",
    "JSTest",
    "js_permutation_test",
]


def _array(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


# --- win rate -------------------------------------------------------------------------------
Judge = Literal["reward_model", "oracle", "model"]
"""Who scores the comparisons of an evaluation report's win rate."""


class WinRate(BaseModel):
    """Share of paired comparisons won by model A (ties count half) with its interval.

    The same type is an entry of the evaluation report (:class:`tasks.evaluation.report.EvalReport`),
    where A is the candidate and ``judge`` and ``opponent`` say who scored it against whom;
    :func:`win_rate` leaves those two None."""

    model_config = ConfigDict(frozen=True)

    judge: Judge | None = None
    """Who scored the comparisons (set when the win rate enters a report)."""
    opponent: Literal["champion", "reference"] | None = None
    """Model B in a report (set when the win rate enters a report)."""
    rate: float
    """(wins + ties / 2) / comparisons (per-prompt means when several samples per prompt)."""
    lower: float
    """Lower Wilson bound at ``confidence``: the number the gate uses."""
    upper: float
    """Upper Wilson bound at ``confidence``."""
    wins: int
    ties: int
    losses: int
    units: int
    """Independent units the interval is based on (prompts when grouped, else comparisons)."""
    confidence: float


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion p = successes / n.

    With z the two-sided normal quantile, centre = (p + z²/2n) / (1 + z²/n) and half width
    = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²). It inverts the score test, so unlike the Wald
    interval it stays inside [0, 1] and keeps near-nominal coverage for small n and p near 0
    or 1. ``successes`` may be fractional (ties counted half). Raises ValueError for n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = min(max(successes / n, 0.0), 1.0)
    z = _z(confidence)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_outcomes(scores_a, scores_b, tie_margin: float = 0.0) -> np.ndarray:
    """Per-comparison outcome for A: 1 when s_a - s_b > margin, 0 when < -margin, else 0.5."""
    a, b = _array(scores_a, "scores_a"), _array(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a ({a.size}) and scores_b ({b.size}) must pair up one to one")
    diff = a - b
    return np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))


def win_rate(
    scores_a,
    scores_b,
    *,
    tie_margin: float = 0.0,
    confidence: float = 0.95,
    groups: Sequence | None = None,
) -> WinRate:
    """Win rate of A over B on paired comparisons, ties counted half, with a Wilson interval.

    rate = (wins + ties / 2) / n. Interval: :func:`wilson_interval` on the mean outcome, with
    n the number of independent units. With ``groups`` (several samples per prompt) the
    outcomes are first averaged per prompt and n is the number of prompts.

    Why Wilson and not a bootstrap: it is closed-form and deterministic (the gate decides
    the same way every time), and it keeps coverage near nominal at the small n and extreme
    rates that gates see, where percentile bootstraps under-cover. Its width assumes
    per-unit variance p(1-p), the largest any [0, 1]-valued outcome with mean p can have; a
    tie (or a per-prompt average) has less, so ties and grouping only make it conservative.
    """
    out = paired_outcomes(scores_a, scores_b, tie_margin)
    wins, ties = int((out == 1.0).sum()), int((out == 0.5).sum())
    losses = out.size - wins - ties
    if groups is not None:
        keys = np.asarray(list(groups), dtype=object)
        if keys.size != out.size:
            raise ValueError(f"groups has {keys.size} entries for {out.size} comparisons")
        _, inverse = np.unique(keys.astype(str), return_inverse=True)
        unit = np.bincount(inverse, weights=out) / np.bincount(inverse)
    else:
        unit = out
    rate = float(unit.mean())
    lo, hi = wilson_interval(rate * unit.size, unit.size, confidence)
    return WinRate(rate=rate, lower=lo, upper=hi, wins=wins, ties=ties, losses=losses, units=int(unit.size),
                   confidence=confidence)


# --- KL -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo estimate of a sequence-level KL with its standard error (nats per sequence)."""

    mean: float
    se: float
    n: int


def sequence_kl(logps, ref_logps, groups: Sequence | None = None) -> KLEstimate:
    """KL(π ‖ π_ref) per sequence from samples y⁽ⁱ⁾ ~ π(·|x⁽ⁱ⁾).

    d_i = Σ_t [log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)] (``logps`` and ``ref_logps``
    are those per-sequence sums, from the *same* token ids); KL ≈ mean(d) and
    SE = std(d, ddof=1) / sqrt(n). Unbiased when the samples come from π itself: compute both
    log-probs with the sampling temperature, and note that top-k/top-p truncation is not in
    the formula. A single d_i can be negative; the mean converges to a value >= 0. With
    ``groups`` the d_i are averaged per prompt first and n counts prompts (cluster-robust SE).
    SE is 0 for n = 1.
    """
    p, q = _array(logps, "logps"), _array(ref_logps, "ref_logps")
    if p.shape != q.shape:
        raise ValueError(f"logps ({p.size}) and ref_logps ({q.size}) must have one entry per sequence")
    d = p - q
    if groups is not None:
        _, inverse = np.unique(np.asarray(list(groups), dtype=object).astype(str), return_inverse=True)
        d = np.bincount(inverse, weights=d) / np.bincount(inverse)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return KLEstimate(float(d.mean()), se, int(d.size))


# --- text statistics ------------------------------------------------------------------------
def windowed_distinct_n(texts: Sequence, n: int, window: int | None) -> float:
    """distinct-n at a fixed sample size: the mean of :func:`distinct_n` over consecutive blocks of
    ``window`` responses, the last block ending at the last response (overlapping the one before
    it); pooled over all responses when ``window`` is None or not smaller than their number.

    Pooled distinct-n falls as the text grows (each new response repeats more of the n-grams
    already seen: the type-token ratio's length dependence, against which MATTR, Covington and
    McFall 2010, averages fixed windows), so a floor set as a share of the reference's at one
    number of prompts is stricter at another. At a fixed window the figure keeps its scale
    whatever the prompt count, and more blocks only average out its noise."""
    texts = list(texts)
    if window is None or len(texts) <= window:
        return distinct_n(texts, n)
    starts = list(range(0, len(texts) - window + 1, window))
    if starts[-1] + window < len(texts):
        starts.append(len(texts) - window)
    return float(np.mean([distinct_n(texts[s : s + window], n) for s in starts]))


def repetition_rate(texts: Iterable, n: int = 2, tokenize: Callable[[str], list] | None = None) -> float:
    """Mean over responses of the share of repeated n-grams within the response.

    rep(y) = 1 − |unique n-grams of y| / |n-grams of y| ("seq-rep-n", Welleck et al. 2020);
    responses shorter than n tokens are skipped; 0.0 when all are.
    """
    reps = []
    for toks in tokenised(texts, tokenize):
        grams = ngrams(toks, n)
        if grams:
            reps.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(reps)) if reps else 0.0


LOOP_THRESHOLD = 0.1
"""A response loops when its seq-rep-3 exceeds this: more than one word trigram in ten repeats an
earlier one. Ordinary text of 24 tokens rarely repeats a trigram; "a great pleasure to be a great
pleasure to be" does (seq-rep-3 3/8)."""


def seq_rep(text: str | Sequence, n: int = 3, tokenize: Callable[[str], list] | None = None) -> float:
    """seq-rep-n of ONE response (Welleck et al. 2020): 1 − |unique n-grams| / |n-grams|, over its
    words (:func:`word_tokens`, or ``tokenize``; a token list passes as it is). 0.0 for a response
    shorter than n tokens: too short to repeat a phrase, so it does not loop (unlike
    :func:`repetition_rate`, which leaves such responses out of its mean)."""
    grams = ngrams(tokenised([text], tokenize)[0], n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class LoopStats:
    """How often responses loop (:func:`loop_stats`)."""

    looping_share: float
    """Share of responses whose seq-rep-n exceeds the threshold."""
    mean_seq_rep: float
    """Mean seq-rep-n over all responses (short ones count 0)."""
    n: int
    """Responses measured."""


def loop_stats(texts: Iterable, n: int = 3, threshold: float = LOOP_THRESHOLD,
               tokenize: Callable[[str], list] | None = None) -> LoopStats:
    """The looping share and mean :func:`seq_rep` of responses: the evaluation's greedy-loop
    figures (and benchmarks/greedy_loops.py's). A response loops when seq-rep-n > ``threshold``.
    Raises ValueError for no responses."""
    reps = np.array([seq_rep(t, n, tokenize) for t in texts], dtype=np.float64)
    if reps.size == 0:
        raise ValueError("texts is empty")
    return LoopStats(float((reps > threshold).mean()), float(reps.mean()), int(reps.size))


def looping(texts: Iterable, n: int = 3, threshold: float = LOOP_THRESHOLD,
            tokenize: Callable[[str], list] | None = None) -> np.ndarray:
    """Per response: True when it loops (seq-rep-n above ``threshold``), as :func:`loop_stats` counts."""
    return np.array([seq_rep(t, n, tokenize) > threshold for t in texts], dtype=bool)


def paired_share_diff_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) − mean(b) for two 0/1 outcomes on the same items (paired: the
    items are the units): sample standard deviation of a_i − b_i over sqrt(n). NaN under two items.
    Items on which both agree add nothing but n, so it is smaller than the unpaired error when the
    two models loop on the same prompts."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    return float(d.std(ddof=1) / np.sqrt(d.size)) if d.size >= 2 else float("nan")


_ALLOWED_CONTROL = set("\n\t\r")
_CHAR_RUN = re.compile(r"(\S)\1{5,}")
_SYMBOL_RUN = re.compile(r"[^\w\s]{6,}")


def malformed_reasons(
    text: str | bytes, *, max_junk_tokens: int = 4, min_letter_share: float = 0.5, min_chars: int = 12
) -> list[str]:
    """Why a response looks like junk rather than text (empty list: it looks fine).

    Reasons: ``invalid_utf8`` (bytes that do not decode), ``replacement_char`` (U+FFFD, what a
    byte-level tokenizer yields for a broken byte sequence), ``control_char`` (Unicode Cc other
    than newline/tab/CR, surrogates, private-use or unassigned code points), ``char_run`` (one
    non-space character 6+ times in a row), ``symbol_run`` (6+ punctuation/symbols in a row),
    ``junk_tokens`` (``max_junk_tokens``+ consecutive whitespace tokens without a letter), and
    ``few_letters`` (letters under ``min_letter_share`` of the non-space characters, for
    texts with at least ``min_chars`` of them). An empty response is not malformed (length
    statistics catch that). These are the guards against reward hacking by noise.
    """
    reasons: list[str] = []
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            reasons.append("invalid_utf8")
            text = text.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        reasons.append("replacement_char")
    if any(
        (cat := unicodedata.category(ch)) in ("Cs", "Co", "Cn") or (cat == "Cc" and ch not in _ALLOWED_CONTROL)
        for ch in text
    ):
        reasons.append("control_char")
    if _CHAR_RUN.search(text):
        reasons.append("char_run")
    if _SYMBOL_RUN.search(text):
        reasons.append("symbol_run")
    run = 0
    for word in text.split():
        run = 0 if any(ch.isalpha() for ch in word) else run + 1
        if run >= max_junk_tokens:
            reasons.append("junk_tokens")
            break
    visible = [ch for ch in text if not ch.isspace()]
    if len(visible) >= min_chars and sum(ch.isalpha() for ch in visible) < min_letter_share * len(visible):
        reasons.append("few_letters")
    return reasons


def malformed_share(texts: Iterable[str | bytes], **rules) -> float:
    """Share of responses with at least one :func:`malformed_reasons` reason (0.0 for none)."""
    flags = [bool(malformed_reasons(t, **rules)) for t in texts]
    return float(np.mean(flags)) if flags else 0.0


def length_stats(lengths, max_length: int | None = None) -> dict[str, float]:
    """mean, std (ddof=0), min, p10, median, p90, max of response lengths; with ``max_length``
    also ``truncated_share``, the share that hit the generation limit."""
    x = _array(lengths, "lengths")
    out = {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "p10": float(np.percentile(x, 10)),
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "max": float(x.max()),
    }
    if max_length is not None:
        out["truncated_share"] = float((x >= max_length).mean())
    return out


def length_drift(lengths, ref_lengths) -> dict[str, float]:
    """Length change against a reference: ``mean_diff`` = mean − mean_ref, ``relative_change`` =
    mean / mean_ref − 1 (0 when both means are 0, inf when only the reference's is), and the
    two-sample KS ``ks_statistic`` / ``ks_pvalue``."""
    x, r = _array(lengths, "lengths"), _array(ref_lengths, "ref_lengths")
    diff = float(x.mean() - r.mean())
    rel = diff / r.mean() if r.mean() != 0 else (0.0 if diff == 0 else math.inf)
    ks_stat, ks_p = ks_test(x, r)
    return {"mean_diff": diff, "relative_change": float(rel), "ks_statistic": ks_stat, "ks_pvalue": ks_p}


def perplexity(nll_sum, n_tokens) -> float:
    """exp(Σ NLL / Σ tokens): token-level perplexity pooled over sequences (scalars or arrays of
    per-sequence summed NLL in nats and token counts). Raises ValueError with no tokens."""
    total, count = float(np.sum(nll_sum)), float(np.sum(n_tokens))
    if count <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(total / count)


def token_loglik(logps, n_tokens) -> float:
    """Mean log-likelihood per token, Σ log p / Σ tokens (nats/token), pooled over sequences:
    ``logps`` are per-sequence sums of token log-probs, ``n_tokens`` their token counts.
    Sequences with no tokens add nothing. The gate's fluency proxy (the candidate's text scored
    by the base model: word stuffing and junk are unlikely text to the model it came from).
    Raises ValueError with no tokens at all."""
    lp, n = _array(logps, "logps"), _array(n_tokens, "n_tokens")
    if lp.shape != n.shape:
        raise ValueError(f"logps ({lp.size}) and n_tokens ({n.size}) must have one entry per sequence")
    if n.sum() <= 0:
        raise ValueError("token_loglik needs at least one token")
    return float(lp[n > 0].sum() / n.sum())


# --- preferences ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Accuracy:
    """Pairwise preference accuracy (ties half) with a Wilson interval and the mean margin."""

    accuracy: float
    lower: float
    upper: float
    mean_margin: float
    n: int


def preference_accuracy(chosen_scores, rejected_scores, confidence: float = 0.95) -> Accuracy:
    """Share of pairs where score(chosen) > score(rejected), ties counted half.

    margin_i = r_c − r_r; accuracy = mean(1[m > 0] + ½·1[m = 0]); interval as in :func:`win_rate`.
    """
    res = win_rate(chosen_scores, rejected_scores, confidence=confidence)
    margin = _array(chosen_scores, "chosen_scores") - _array(rejected_scores, "rejected_scores")
    return Accuracy(res.rate, res.lower, res.upper, float(margin.mean()), res.units)


def calibration_ece(chosen_scores, rejected_scores, n_bins: int = 10) -> float:
    """Expected calibration error of the Bradley–Terry probability p = sigmoid(r_c − r_r).

    The prediction is "chosen wins" when p > 0.5 with confidence c = max(p, 1 − p) ∈ [0.5, 1];
    it is correct when p > 0.5 (p = 0.5 counts half). Bins split [0.5, 1] into ``n_bins``
    equal widths; ECE = Σ_b (n_b / n) · |acc_b − mean c_b|. 0 means the probabilities say how
    often the model is right.
    """
    margin = _array(chosen_scores, "chosen_scores") - _array(rejected_scores, "rejected_scores")
    p = 1.0 / (1.0 + np.exp(-margin))
    conf = np.maximum(p, 1.0 - p)
    correct = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    bins = np.minimum(((conf - 0.5) * 2 * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


@dataclass(frozen=True)
class Agreement:
    """How often a judge ranks paired responses as the oracle does, with a Wilson interval."""

    rate: float
    lower: float
    upper: float
    n: int
    """Comparisons the oracle decided (its ties are left out: they have no right answer)."""
    oracle_ties: int


def judge_agreement(judge_a, judge_b, oracle_a, oracle_b, *, tie_margin: float = 0.0,
                    confidence: float = 0.95) -> Agreement | None:
    """Share of comparisons i where sign(judge_a − judge_b) = sign(oracle_a − oracle_b).

    Comparisons the oracle calls a tie (|oracle_a − oracle_b| <= ``tie_margin``) are left out;
    a judge tie on an oracle-decided comparison counts half (as in :func:`win_rate`). The
    interval is :func:`wilson_interval` over the comparisons kept (treated as independent).
    None when the oracle decides none of them.
    """
    ja, jb = _array(judge_a, "judge_a"), _array(judge_b, "judge_b")
    oa, ob = _array(oracle_a, "oracle_a"), _array(oracle_b, "oracle_b")
    if not ja.shape == jb.shape == oa.shape == ob.shape:
        raise ValueError("judge and oracle scores must pair up one to one")
    truth, keep = oa - ob, np.abs(oa - ob) > tie_margin
    if not keep.any():
        return None
    judged = paired_outcomes(ja[keep], jb[keep], tie_margin)
    agree = np.where(truth[keep] > 0, judged, 1.0 - judged)
    rate = float(agree.mean())
    lo, hi = wilson_interval(agree.sum(), int(agree.size), confidence)
    return Agreement(rate, lo, hi, int(agree.size), int((~keep).sum()))


# --- drift ----------------------------------------------------------------------------------
def psi(new, ref, bins: int = 10, pseudo_count: float = 0.5) -> float:
    """Population stability index of ``new`` against ``ref``, bins from the reference sample.

    Interior edges are the reference's 1/bins … (bins−1)/bins quantiles (duplicates merged,
    so discrete data gets fewer bins); the outer bins are open. With bin shares r_b and
    n_b (each count plus ``pseudo_count``, so empty bins stay finite),
    PSI = Σ_b (n_b − r_b) · ln(n_b / r_b). Rule of thumb: < 0.1 stable, > 0.2 shifted. Under no
    shift PSI ≈ (1/N + 1/M)·χ²_{B−1}, so small samples inflate it: pair it with a test.
    """
    x, r = _array(new, "new"), _array(ref, "ref")
    edges = np.unique(np.quantile(r, np.arange(1, bins) / bins))
    def shares(v: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=edges.size + 1) + pseudo_count
        return counts / counts.sum()
    pn, pr = shares(x), shares(r)
    return float(np.sum((pn - pr) * np.log(pn / pr)))


def ks_test(new, ref) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test (scipy): (D = sup |F_new − F_ref|, p-value).
    With ties (integer lengths) the p-value is conservative."""
    res = stats.ks_2samp(_array(new, "new"), _array(ref, "ref"))
    return float(res.statistic), float(res.pvalue)


def js_divergence(p, q, base: float = 2.0) -> float:
    """Jensen–Shannon divergence of two count or probability vectors over the same support.

    JS = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = ½(P + Q), with 0·log 0 = 0; in bits by default, so
    0 <= JS <= 1. Inputs are normalised here.
    """
    a, b = np.asarray(p, dtype=np.float64).ravel(), np.asarray(q, dtype=np.float64).ravel()
    if a.shape != b.shape or a.sum() <= 0 or b.sum() <= 0 or (a < 0).any() or (b < 0).any():
        raise ValueError("p and q must be non-negative vectors of equal length with positive mass")
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)
    def kl(u: np.ndarray) -> float:
        nz = u > 0
        return float(np.sum(u[nz] * np.log(u[nz] / m[nz])))
    return max(0.0, 0.5 * kl(a) + 0.5 * kl(b)) / math.log(base)


def token_js(docs_a: Iterable, docs_b: Iterable, tokenize: Callable[[str], list] | None = None) -> float:
    """JS divergence (bits) of the pooled token distributions of two document collections."""
    ca = Counter(t for doc in tokenised(docs_a, tokenize) for t in doc)
    cb = Counter(t for doc in tokenised(docs_b, tokenize) for t in doc)
    if not ca or not cb:
        raise ValueError("token_js needs at least one token on each side")
    vocab = list(ca.keys() | cb.keys())
    return js_divergence([ca[v] for v in vocab], [cb[v] for v in vocab])


@dataclass(frozen=True)
class JSTest:
    """Result of :func:`js_permutation_test` (divergences in bits)."""

    js: float
    null_mean: float
    """Mean JS under random reassignment of documents: the sampling-noise floor."""
    excess: float
    """js − null_mean: the divergence beyond sampling noise."""
    pvalue: float


def js_permutation_test(
    docs_a: Sequence, docs_b: Sequence, rounds: int = 200, seed: int = 0,
    tokenize: Callable[[str], list] | None = None,
) -> JSTest:
    """Token-distribution JS between two collections, its noise floor and permutation p-value.

    The statistic is :func:`token_js`; the null distribution comes from reassigning whole
    documents to the two sides at random ``rounds`` times (documents are the exchangeable
    unit), p = (1 + #{JS_perm >= JS}) / (1 + rounds). Sampling noise alone gives a positive JS
    that grows with vocabulary size and shrinks with sample size; the p-value says whether
    the observed JS exceeds that noise, and ``excess`` = JS − mean(JS_perm) is an effect size
    with the noise floor removed.
    """
    docs_a, docs_b = list(docs_a), list(docs_b)
    if not docs_a or not docs_b:
        raise ValueError("js_permutation_test needs documents on both sides")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    toks = tokenised(docs_a + docs_b, tokenize)
    vocab: dict = {}
    rows, cols = [], []
    for i, doc in enumerate(toks):
        for tok in doc:
            rows.append(i)
            cols.append(vocab.setdefault(tok, len(vocab)))
    if not vocab:
        raise ValueError("js_permutation_test needs at least one token")
    mat = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(toks), len(vocab)))
    n_a, total = len(docs_a), np.asarray(mat.sum(axis=0)).ravel()
    by_term = mat.T.tocsr()  # [V, docs]: one sparse mat-vec per permutation

    def stat(in_a: np.ndarray) -> float:
        indicator = np.zeros(len(toks))
        indicator[in_a] = 1.0
        ca = by_term @ indicator
        cb = total - ca
        return js_divergence(ca, cb) if ca.sum() > 0 and cb.sum() > 0 else 0.0

    observed = stat(np.arange(n_a))
    rng = np.random.default_rng(seed)
    null = np.array([stat(rng.permutation(len(toks))[:n_a]) for _ in range(rounds)])
    pvalue = (1 + int((null >= observed - 1e-12).sum())) / (1 + rounds)
    floor = float(null.mean())
    return JSTest(observed, floor, observed - floor, pvalue)
