"""Settings of the evaluation suite, the promotion gate and the monitor (pipeline sections
``evaluation``, ``gate`` and ``monitor``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignment.config import GenerationSettings, StrictModel
from tasks.evaluation.model_judge import JudgeModelSettings


class EvalSettings(StrictModel):
    """Evaluate candidate, champion and reference on held-out prompts with fixed seeds."""

    num_prompts: int = Field(128, gt=0)
    """Held-out prompts (those of ``prompt_splits``) to sample on; fewer when the splits have fewer."""
    prompt_splits: list[Literal["test", "validation"]] = Field(["test"], min_length=1)
    """Held-out splits whose prompts are sampled, scored and judged (win rates, KL, diversity, the
    gate's every sampled figure), in this order: ``test``; ``validation`` adds the validation split's
    prompts, whose pairs never train a policy (they score DPO's eval loss and the reward model's
    validation accuracy; the judge's accuracy the gate holds is measured on the test pairs). The
    paired win rate's interval narrows as 1/sqrt(prompts): on the demo's 103 test prompts a gain
    of 0.58 is not established (lower bound 0.48), on its 220 test + validation prompts it is
    (0.51). Sampling and scoring cost grows with the prompts."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per prompt and model."""
    generation: GenerationSettings = GenerationSettings(max_new_tokens=24, temperature=0.7, top_k=0, top_p=1.0)
    """Sampling settings (the same for every model compared)."""
    seed: int = 1234
    """Sampling seed, fixed so that models are compared on the same randomness."""
    judge: Literal["reward_model", "oracle", "both"] = "both"
    """Who judges win rates: the reward model, the configured oracle (demo), or both."""
    judge_model: JudgeModelSettings | None = None
    """A local causal LM asked for pairwise verdicts in both orders (:mod:`tasks.evaluation.model_judge`);
    when set, its win rates and its accuracy on the held-out pairs are reported too (``gate.judge:
    model`` lets it decide). Its verdicts are only as good as that model."""
    distinct_window: int | None = Field(None, gt=1)
    """distinct-1/2 as the mean over blocks of this many responses (the last block ending at the last
    response) instead of pooled over all of them; None: pooled. Pooled distinct-n falls as the text
    grows, so ``gate.min_distinct2_ratio`` is stricter the more prompts are evaluated (the demo's
    later rounds on 2,092 prompts: a candidate at 82.5% of the base's over blocks of 220 reads 76.4%
    pooled); a fixed window keeps the floor's meaning at any ``num_prompts`` (RESULTS.md, issue 15,
    "Fifteenth pass")."""
    samples_table_rows: int = Field(50, ge=0)
    """Rows of the samples table logged with mlflow.log_table."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Confidence level of the reported intervals."""
    tie_margin: float = Field(0.0, ge=0)
    """Score differences within this margin count as ties (half a win) in win rates."""
    max_pairs: int = Field(256, gt=0)
    """Held-out preference pairs scored (accuracy, implicit reward, perplexity); fewer when the split is smaller."""
    max_length: int = Field(512, gt=0)
    """Longest prompt + response (tokens) when scoring held-out pairs; longer ones are truncated."""
    max_prompt_length: int = Field(256, gt=0)
    """Longest prompt (tokens) for sampling and pair scoring; longer prompts keep their end."""
    score_batch_size: int = Field(32, gt=0)
    """Sequences per forward pass when computing log-probs and reward scores."""
    greedy: bool = True
    """Also decode every evaluated prompt greedily (``generation.max_new_tokens`` tokens) with the
    candidate, the champion and the reference, and report the share of greedy responses that
    loop and their mean seq-rep-3 (:func:`tasks.evaluation.metrics.loop_stats`): sampled text at
    temperature 0.7 can read well while the most likely text loops ("a great pleasure to be a
    great pleasure to be"). One extra decode per model, no scoring (seconds on the demo's CPU).
    False: not measured (then ``gate.max_greedy_loop_increase`` fails, as for any missing figure)."""
    loop_threshold: float = Field(0.1, ge=0, lt=1)
    """A greedy response loops when its seq-rep-3 exceeds this (0.1: one word trigram in ten repeats)."""
    greedy_splits: list[Literal["test", "validation"]] = ["test"]
    """Held-out prompts the greedy figures are measured on: ``test``, the evaluated prompts (the
    first ``num_prompts`` of ``prompt_splits``, those of every other figure); ``validation`` adds every
    prompt of the validation split, whose pairs never train a policy (they only score DPO's eval
    loss and, with ``reward.calibrate``, fit the reward model's temperature). Greedy decoding is
    cheap and the share is a proportion: over n prompts its standard error is about
    50/sqrt(n) points (5 at the demo's 103 test prompts, 3.4 at 220), so more prompts make the
    gate's ``max_greedy_loop_increase`` a test of the model, not of the draw of prompts. The
    report keeps the share on the evaluated prompts alone too (``greedy_looping_share_evaluated``)."""


class GateSettings(StrictModel):
    """Promotion rules: the candidate replaces the champion only when every rule passes."""

    judge: Literal["reward_model", "oracle", "human", "model"] = "reward_model"
    """Whose judgement the win-rate rule uses (oracle only where one is configured). ``model``: the
    judge model of ``evaluation.judge_model``, held to ``min_judge_accuracy`` like the reward model. ``human``:
    people, through the blinded sheets of ``alignflow eval-export`` (:mod:`tasks.evaluation.human`):
    a round's candidate then waits as ``challenger`` until a returned sheet shows people prefer
    it to the champion."""
    reward_judge: Literal["round", "champion"] = "round"
    """Which reward model judges when ``judge`` is ``reward_model``. ``round``: the round's own, which
    trained on the feedback the candidate trained on, so it shares the candidate's quirks and reads
    close rounds high (RESULTS.md, "Ninth pass": +0.03 on average on the demo). ``champion``: the one
    registered with the champion, which never saw this round's feedback; its accuracy is then measured
    on this round's test pairs, text it never saw, and it leans to the champion if anywhere (it
    trained on the champion's round). Against the base model (no champion yet) the round's own judges."""
    min_win_rate_lower_bound: float = Field(0.5, ge=0, le=1)
    """The lower confidence bound of the win rate vs the champion must clear this."""
    max_kl: float | None = Field(25.0, gt=0)
    """KL(candidate || reference) budget in nats per sequence (None: no limit)."""
    max_malformed_share: float = Field(0.10, ge=0, le=1)
    """Largest share of malformed responses (invalid UTF-8, control characters, junk runs)."""
    max_malformed_increase: float = Field(0.05, ge=0, le=1)
    """Largest rise of the malformed share over the reference's."""
    min_distinct2_ratio: float = Field(0.6, ge=0)
    """Candidate distinct-2 must stay above this fraction of the reference's (collapse guard)."""
    max_repetition_rate: float = Field(0.5, ge=0, le=1)
    """Largest share of repeated n-grams within responses."""
    max_length_change: float | None = Field(None, gt=0)
    """Largest relative change of mean response length vs the reference (None: not checked);
    a guard against length hacking."""
    max_repeated_trigram_increase: float | None = Field(0.05, ge=0, le=1)
    """Largest rise of the repeated-trigram share (mean share of a response's word trigrams that
    repeat an earlier one) over the reference's, in share points (0.05 = 5 points); loops and
    stuffed phrases raise it. None: not checked."""
    max_fluency_drop: float | None = Field(1.0, gt=0)
    """Largest fall, in nats per token, of the candidate's responses' log-likelihood under the
    reference (temperature 1) below that of the reference's own responses: word salad and
    stuffed words are text the base model finds unlikely. None: not checked."""
    max_greedy_loop_increase: float | None = Field(None, ge=0, le=1)
    """Largest rise, in share points, of the share of the candidate's GREEDY responses that loop
    (seq-rep-3 above ``evaluation.loop_threshold``) over the reference's, on the greedy prompts
    (``evaluation.greedy``, ``evaluation.greedy_splits``): a champion's sampled text may pass every
    other guard while its most likely output loops. The reason states the rise's standard error
    (paired per prompt). None: not checked."""
    min_judge_accuracy: float | None = Field(0.6, ge=0, le=1)
    """Floor for the reward model as a judge: the lower confidence bound of its held-out pairwise
    accuracy (the evaluation's test pairs) must reach it. When it does not (or the accuracy was
    not measured), the reward model's win rate alone cannot promote: the oracle's win rate
    decides where an oracle is configured (the demo), else the win-rate rule fails. Applies when
    ``judge`` is ``reward_model``. None: the reward model is trusted unchecked."""


class MonitorSettings(StrictModel):
    """Drift checks on each new feedback batch against a reference batch; crossing one triggers retraining.

    A detector fires only when its effect size crosses its threshold AND its test is
    significant at ``alpha``: effect sizes alone (PSI, JS) are inflated by sampling noise in
    small batches, and p-values alone flag immaterial shifts in large ones.
    """

    alpha: float = Field(0.01, gt=0, lt=1)
    """Significance level of every drift test (KS, permutation, proportion and binomial tests)."""
    psi_threshold: float = Field(0.2, gt=0)
    """Population stability index on prompt/response lengths above which length drift is material."""
    psi_bins: int = Field(10, ge=2)
    """Quantile bins of the reference sample used by PSI."""
    js_threshold: float = Field(0.05, gt=0)
    """Jensen–Shannon divergence (bits) of token distributions, beyond the sampling-noise floor
    estimated by permutation, above which vocabulary drift is material."""
    permutation_rounds: int = Field(200, ge=20)
    """Permutations for the JS test (p-value resolution 1 / (rounds + 1))."""
    min_reward_accuracy: float = Field(0.6, ge=0, le=1)
    """The champion reward model's accuracy on new human labels below which concept drift is declared."""
    max_preference_balance_shift: float = Field(0.15, ge=0, le=1)
    """Largest change in the share of 'a' choices (pairwise) or thumbs-up (binary) vs the reference batch."""
    max_agreement_drop: float = Field(0.1, ge=0, le=1)
    """Annotator agreement (share of agreeing label pairs on items labelled twice or more)
    falling by more than this is flagged."""
    min_rows: int = Field(30, gt=0)
    """Fewer new rows than this: statistics are reported but nothing fires (too little evidence)."""
    trigger_deployment: str | None = "alignment-pipeline/retrain"
    """Deployment run when drift is found (None: record only)."""
