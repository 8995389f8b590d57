"""tasks.evaluation.metrics against hand computation, and the win-rate interval's coverage by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluation import metrics as M


# --- win rate and its interval --------------------------------------------------------------
def test_wilson_interval_matches_hand_computation():
    z = 1.959963984540054
    n, p = 10, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = M.wilson_interval(7, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # textbook value for 7/10
    lo0, hi0 = M.wilson_interval(0, 10)
    assert lo0 == 0.0 and hi0 == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="n must be"):
        M.wilson_interval(0, 0)


def test_win_rate_counts_ties_half_and_groups_by_prompt():
    a, b = [3, 1, 2, 2], [1, 2, 2, 0]  # win, loss, tie, win
    w = M.win_rate(a, b)
    assert (w.wins, w.losses, w.ties, w.units) == (2, 1, 1, 4)
    assert w.rate == pytest.approx(2.5 / 4)
    assert (w.lower, w.upper) == pytest.approx(M.wilson_interval(2.5, 4))
    grouped = M.win_rate(a, b, groups=[0, 0, 1, 1])  # prompt means 0.5 and 0.75
    assert grouped.units == 2 and grouped.rate == pytest.approx(0.625)
    assert (grouped.lower, grouped.upper) == pytest.approx(M.wilson_interval(1.25, 2))
    assert M.win_rate([1.0, 2.0], [1.05, 1.0], tie_margin=0.1).ties == 1
    with pytest.raises(ValueError, match="pair up"):
        M.win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="scores_a is empty"):
        M.win_rate([], [])


@pytest.mark.parametrize("true_win,tie", [(0.3, 0.0), (0.5, 0.0), (0.85, 0.0), (0.5, 0.3), (0.7, 0.3)])
def test_win_rate_interval_covers_the_true_rate(true_win, tie):
    """2000 simulated evaluations of 100 paired comparisons: the 95% interval should contain the
    true win rate about 95% of the time (Wilson oscillates with n; ties make it conservative)."""
    rng = np.random.default_rng(0)
    p_win = true_win - tie / 2  # P(win) + P(tie)/2 = true_win
    p_loss = 1 - p_win - tie
    covered = 0
    for _ in range(2000):
        outcome = rng.choice([1.0, 0.5, 0.0], size=100, p=[p_win, tie, p_loss])
        w = M.win_rate(outcome, np.full(100, 0.5))
        covered += w.lower <= true_win <= w.upper
    coverage = covered / 2000
    # Wilson's exact coverage at n = 100 oscillates between about 93% and 96.5% with p (see the
    # next test); the simulation adds about ±1 point (2 sd). Ties only make it conservative.
    assert 0.92 <= coverage <= (0.995 if tie else 0.975)


def test_wilson_coverage_averages_to_nominal_over_rates():
    """Exact coverage (binomial sums, no simulation noise) averaged over true rates 0.05..0.95."""
    from scipy import stats

    n = 60
    bounds = [M.wilson_interval(k, n) for k in range(n + 1)]
    coverages = []
    for p in np.linspace(0.05, 0.95, 91):
        pmf = stats.binom.pmf(np.arange(n + 1), n, p)
        coverages.append(sum(pmf[k] for k, (lo, hi) in enumerate(bounds) if lo <= p <= hi))
    assert abs(np.mean(coverages) - 0.95) < 0.01 and min(coverages) > 0.90


def test_grouping_keeps_coverage_when_samples_per_prompt_are_correlated():
    """Several samples per prompt share the prompt's difficulty: treating them as independent
    under-covers; averaging per prompt (groups=) restores coverage."""
    rng = np.random.default_rng(1)
    prompts, k, true_win = 50, 4, 0.5
    groups = np.repeat(np.arange(prompts), k)
    cover_grouped = cover_naive = 0
    for _ in range(2000):
        p_i = rng.beta(2, 2, size=prompts)  # mean 0.5, ICC 0.2
        outcome = (rng.random(prompts * k) < np.repeat(p_i, k)).astype(float)
        g = M.win_rate(outcome, np.full(outcome.size, 0.5), groups=groups)
        naive = M.win_rate(outcome, np.full(outcome.size, 0.5))
        cover_grouped += g.lower <= true_win <= g.upper
        cover_naive += naive.lower <= true_win <= naive.upper
    assert cover_grouped / 2000 >= 0.95
    assert cover_naive / 2000 < 0.92  # design effect 1.6 -> about 88%


# --- KL -------------------------------------------------------------------------------------
def test_sequence_kl_hand_values_and_groups():
    est = M.sequence_kl([-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0])  # d = 1, 0, 2
    assert est.mean == pytest.approx(1.0) and est.se == pytest.approx(1 / math.sqrt(3)) and est.n == 3
    g = M.sequence_kl([-1.0, -2.0, -3.0, -1.0], [-2.0, -2.0, -5.0, -1.0], groups=["x", "x", "y", "y"])
    assert g.n == 2 and g.mean == pytest.approx(0.75)  # prompt means 0.5 and 1.0
    assert M.sequence_kl([1.0], [0.0]).se == 0.0


def test_sequence_kl_is_unbiased_for_sampled_sequences():
    """Sequences of 3 i.i.d. tokens from a categorical π: exact KL = 3·KL_token(π‖π_ref)."""
    rng = np.random.default_rng(0)
    pi = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    ref = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = 3 * float(np.sum(pi * np.log(pi / ref)))
    tokens = rng.choice(5, size=(4000, 3), p=pi)
    est = M.sequence_kl(np.log(pi)[tokens].sum(1), np.log(ref)[tokens].sum(1))
    assert abs(est.mean - exact) < 4 * est.se
    assert est.se == pytest.approx(np.std(np.log(pi / ref)[tokens].sum(1), ddof=1) / math.sqrt(4000))


# --- text statistics ------------------------------------------------------------------------
def test_distinct_and_repetition_by_hand():
    texts = ["a b a", "a b"]
    assert M.distinct_n(texts, 1) == pytest.approx(2 / 5)
    assert M.distinct_n(texts, 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert M.distinct_n(["a"], 2) == 0.0
    # "a b a b": bigrams ab, ba, ab -> 1/3 repeated; "x y": 0; "z" is skipped.
    assert M.repetition_rate(["a b a b", "x y", "z"]) == pytest.approx(1 / 6)
    assert M.repetition_rate([["t1", "t2", "t1", "t2"]], n=2) == pytest.approx(1 / 3)  # token lists work too
    assert M.word_tokens("Great movie!") == ["great", "movie", "!"]


@pytest.mark.parametrize("text,reason", [
    ("a fine movie \ufffd\ufffd", "replacement_char"),
    (b"a fine movie \xff\xfe", "invalid_utf8"),
    ("a fine movie \x07 really", "control_char"),
    ("a fine movie \ue000", "control_char"),  # private use
    ("sooooooo good", "char_run"),
    ("the end #$%^&*( yes", "symbol_run"),
    ("it was 12 34 ## )) 5 then", "junk_tokens"),
    ("x9/10:3;7+a x1234/56", "few_letters"),
])
def test_malformed_reasons_flag_junk(text, reason):
    assert reason in M.malformed_reasons(text)


def test_clean_review_text_is_not_malformed():
    clean = [
        "A beautiful, moving film... I'd give it 10/10!",
        "The director's cut runs 2 hours — too long, but worth it.",
        "Café scenes in Paris; naïve but charming. 😀",
        "Line one\nline two\twith a tab.",
        "",
        "Bravo!!!",
    ]
    assert [M.malformed_reasons(t) for t in clean] == [[]] * len(clean)
    assert M.malformed_share(clean + ["\ufffd oops"]) == pytest.approx(1 / 7)


def test_length_stats_drift_and_perplexity_by_hand():
    s = M.length_stats([1, 2, 3, 4], max_length=4)
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(1.25)) and s["median"] == 2.5
    assert s["truncated_share"] == 0.25 and s["min"] == 1 and s["max"] == 4
    d = M.length_drift([2, 4, 6, 8], [1, 2, 3, 4])
    assert d["mean_diff"] == 2.5 and d["relative_change"] == pytest.approx(1.0)
    assert 0 <= d["ks_pvalue"] <= 1 and d["ks_statistic"] == pytest.approx(0.5)
    assert M.perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(6 / 4))
    with pytest.raises(ValueError, match="at least one token"):
        M.perplexity([0.0], [0])


# --- preferences ----------------------------------------------------------------------------
def test_preference_accuracy_and_ece_by_hand():
    acc = M.preference_accuracy([1, 2, 3, 0], [0, 2, 1, 1])
    assert acc.accuracy == pytest.approx(0.625) and acc.mean_margin == pytest.approx(0.5) and acc.n == 4
    margins = np.array([2.0, 0.0, -1.0, 0.5])
    p = 1 / (1 + np.exp(-margins))
    conf = np.maximum(p, 1 - p)  # 0.881, 0.5, 0.731, 0.622 -> four different bins
    correct = np.array([1.0, 0.5, 0.0, 1.0])
    want = float(np.mean(np.abs(correct - conf)))
    assert M.calibration_ece(margins, np.zeros(4)) == pytest.approx(want)


def test_ece_is_small_for_calibrated_scores_and_large_for_overconfident_ones():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 2, size=20000)
    first_wins = rng.random(m.size) < 1 / (1 + np.exp(-m))  # labels follow Bradley–Terry
    margin_chosen = np.where(first_wins, m, -m)
    assert M.calibration_ece(margin_chosen, np.zeros(m.size)) < 0.02
    assert M.calibration_ece(3 * margin_chosen, np.zeros(m.size)) > 0.08


# --- drift statistics -----------------------------------------------------------------------
def test_psi_by_hand():
    # Reference median 2.5 splits two bins; counts ref [2, 2], new [3, 1], plus 0.5 each.
    ref_share, new_share = np.array([0.5, 0.5]), np.array([3.5, 1.5]) / 5
    want = float(np.sum((new_share - ref_share) * np.log(new_share / ref_share)))
    assert M.psi([1, 1, 1, 4], [1, 2, 3, 4], bins=2) == pytest.approx(want)
    assert M.psi([1, 2, 3, 4], [1, 2, 3, 4], bins=2) == 0.0
    rng = np.random.default_rng(0)
    assert M.psi(rng.normal(1, 1, 2000), rng.normal(0, 1, 2000)) > 0.5
    assert M.psi(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)) < 0.05


def test_ks_and_js_by_hand():
    stat, p = M.ks_test([1, 2, 3], [4, 5, 6])
    assert stat == 1.0 and p < 0.2
    assert M.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert M.js_divergence([3, 3], [3, 3]) == 0.0
    kl_p = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_q = math.log(1 / 0.75)
    assert M.js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5 * (kl_p + kl_q) / math.log(2))
    assert M.token_js(["good film"], ["Good film"]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        M.js_divergence([1, -1], [1, 1])


def test_js_permutation_test_separates_noise_from_shift():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    zipf = 1 / np.arange(1, 401)
    zipf /= zipf.sum()

    def docs(n, p):
        return [" ".join(rng.choice(vocab, 12, p=p)) for _ in range(n)]

    same = M.js_permutation_test(docs(150, zipf), docs(150, zipf), rounds=100, seed=1)
    assert same.js > 0.02 and abs(same.excess) < 0.02 and same.pvalue > 0.01  # noise, not drift
    shifted = M.js_permutation_test(docs(150, zipf), docs(150, zipf[::-1]), rounds=100, seed=1)
    assert shifted.pvalue == pytest.approx(1 / 101) and shifted.excess > 0.3
