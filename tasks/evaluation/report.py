"""The evaluation report: JSON-serialisable results of :func:`tasks.evaluation.suite.evaluate_models`.

Roles: ``candidate`` (the model just trained), ``champion`` (the registry's serving model, or
the reference when there is none yet) and ``reference`` (the frozen model the candidate was
trained from; KL is measured against it). Judges: ``reward_model`` and ``oracle`` (where
configured, e.g. VADER in the demo). Flat MLflow metric names come from :meth:`EvalReport.metrics`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.evaluation.metrics import Judge, WinRate

Role = Literal["candidate", "champion", "reference"]


class AccuracyResult(BaseModel):
    """Held-out preference accuracy of a scorer: share of pairs ranked chosen > rejected."""

    judge: Literal["reward_model", "implicit_dpo", "model"]
    """``reward_model``: the trained RM; ``implicit_dpo``: β·(log π − log π_ref) of ``model``;
    ``model``: the judge model's verdicts in both orders (:mod:`tasks.evaluation.model_judge`)."""
    model: Role | None = None
    """Whose implicit reward (implicit_dpo only)."""
    accuracy: float
    lower: float
    upper: float
    mean_margin: float
    """Mean score(chosen) − score(rejected)."""
    ece: float
    """Expected calibration error of sigmoid(margin)."""
    n: int


class JudgeAgreement(BaseModel):
    """How often the reward model ranks the evaluated response pairs (candidate vs ``opponent``)
    as the oracle does (:func:`tasks.evaluation.metrics.judge_agreement`)."""

    opponent: Literal["champion", "reference"]
    rate: float
    lower: float
    upper: float
    n: int
    """Comparisons the oracle decided (oracle ties are left out)."""
    oracle_ties: int


class ModelEval(BaseModel):
    """Everything measured on one model's samples (and on the held-out pairs)."""

    role: Role
    path: str
    reward_mean: float | None = None
    reward_std: float | None = None
    oracle_mean: float | None = None
    oracle_std: float | None = None
    kl: float | None = None
    """KL(model ‖ reference), nats per sequence, at the sampling temperature; 0 for the reference."""
    kl_se: float | None = None
    """Standard error of ``kl`` (prompts as units)."""
    length: dict[str, float] = Field(default_factory=dict)
    """Response length in tokens: mean, std, min, p10, median, p90, max, truncated_share."""
    distinct_1: float
    distinct_2: float
    repetition_rate: float
    """Mean share of repeated word bigrams within a response (:func:`tasks.evaluation.metrics.repetition_rate`)."""
    repeated_trigram_rate: float | None = None
    """The same for word trigrams: loops and stuffed phrases repeat trigrams, ordinary text rarely does."""
    fluency: float | None = None
    """Mean log-likelihood per token (nats) of this model's responses under the reference at
    temperature 1 (:func:`tasks.evaluation.metrics.token_loglik`): the fluency proxy."""
    malformed_share: float
    malformed_reasons: dict[str, int] = Field(default_factory=dict)
    """How many responses tripped each malformed-text rule."""
    perplexity: float | None = None
    """Perplexity of the held-out chosen responses under this model (None without pairs)."""
    eos_share: float
    """Share of responses that ended with EOS before the token limit."""
    greedy_looping_share: float | None = None
    """Share of this model's greedy responses to the greedy prompts (one per prompt: the evaluated
    prompts and any other held-out ones of ``evaluation.greedy_splits``, ``num_greedy_prompts`` in
    all) that loop: seq-rep-3 above the report's ``loop_threshold``
    (:func:`tasks.evaluation.metrics.loop_stats`). None when greedy decoding is off (``evaluation.greedy``)."""
    greedy_seq_rep3: float | None = None
    """Mean seq-rep-3 of those greedy responses (a response under three words counts 0)."""
    greedy_looping_share_evaluated: float | None = None
    """The looping share on the evaluated prompts alone (the figure of reports before
    ``evaluation.greedy_splits``; equal to ``greedy_looping_share`` when no other split is decoded)."""


class EvalReport(BaseModel):
    """Result of one evaluation: per-model results, paired win rates and held-out accuracies."""

    candidate: ModelEval
    champion: ModelEval
    reference: ModelEval
    champion_is_reference: bool
    """True when there was no champion and the reference stood in for it."""
    win_rates: list[WinRate] = Field(default_factory=list)
    preference_accuracy: list[AccuracyResult] = Field(default_factory=list)
    judge_agreement: list[JudgeAgreement] = Field(default_factory=list)
    """Reward model vs oracle on the evaluated pairs (only where both judged)."""
    length_drift: dict[str, float] = Field(default_factory=dict)
    """Candidate vs reference response lengths: mean_diff, relative_change, ks_statistic, ks_pvalue."""
    num_prompts: int
    samples_per_prompt: int
    num_pairs: int
    seed: int
    generation: dict[str, Any] = Field(default_factory=dict)
    """Sampling settings used for every model."""
    kl_temperature: float = 1.0
    """Softmax temperature of the log-probs behind every KL (the sampling temperature, so the
    samples come from the distributions compared; 1.0 for greedy decoding)."""
    beta: float | None = None
    """β of the implicit DPO reward."""
    loop_threshold: float | None = None
    """seq-rep-3 above which a greedy response loops (None: no greedy decoding)."""
    num_greedy_prompts: int | None = None
    """Prompts decoded greedily per model (None: no greedy decoding)."""
    greedy_loop_rise_se: float | None = None
    """Standard error of the candidate's looping share minus the reference's, paired per greedy
    prompt (sample standard deviation of the per-prompt differences over sqrt(n)); what the gate's
    ``greedy_loops`` rule states beside the rise."""
    wall_time_s: float = 0.0

    def model(self, role: Role) -> ModelEval:
        return {"candidate": self.candidate, "champion": self.champion, "reference": self.reference}[role]

    def win_rate(self, judge: Judge, opponent: str) -> WinRate | None:
        """The win rate of the candidate vs ``opponent`` by ``judge``, or None when not measured."""
        return next((w for w in self.win_rates if w.judge == judge and w.opponent == opponent), None)

    def agreement(self, opponent: str) -> JudgeAgreement | None:
        """The reward model's agreement with the oracle on candidate-vs-``opponent`` pairs, or None."""
        return next((j for j in self.judge_agreement if j.opponent == opponent), None)

    def accuracy(self, judge: str, model: Role | None = None) -> AccuracyResult | None:
        return next((a for a in self.preference_accuracy if a.judge == judge and a.model == model), None)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat, finite numeric metrics for MLflow: ``eval/candidate/kl``, ``eval/win_rate/oracle_vs_champion``,
        ``eval/win_rate/oracle_vs_champion_lower``, ``eval/accuracy/reward_model``, ..."""
        out: dict[str, float] = {}
        for role in ("candidate", "champion", "reference"):
            m = self.model(role)  # type: ignore[arg-type]
            for key, value in m.model_dump(exclude={"role", "path", "length", "malformed_reasons"}).items():
                out[f"{prefix}{role}/{key}"] = value
            for key, value in m.length.items():
                out[f"{prefix}{role}/length_{key}"] = value
        for w in self.win_rates:
            name = f"{prefix}win_rate/{w.judge}_vs_{w.opponent}"
            out[name], out[f"{name}_lower"], out[f"{name}_upper"] = w.rate, w.lower, w.upper
        for a in self.preference_accuracy:
            name = f"{prefix}accuracy/{a.judge}" + (f"_{a.model}" if a.model else "")
            out[name], out[f"{name}_margin"], out[f"{name}_ece"] = a.accuracy, a.mean_margin, a.ece
        for j in self.judge_agreement:
            name = f"{prefix}judge_agreement/reward_model_vs_oracle_{j.opponent}"
            out[name], out[f"{name}_lower"], out[f"{name}_upper"] = j.rate, j.lower, j.upper
        for key, value in self.length_drift.items():
            out[f"{prefix}length_drift/{key}"] = value
        out[f"{prefix}greedy/num_prompts"] = self.num_greedy_prompts
        out[f"{prefix}greedy/loop_rise_se"] = self.greedy_loop_rise_se
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}
