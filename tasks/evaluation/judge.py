"""The reward model as a judge: how far its verdicts can be trusted.

:func:`reward_model_reliability` scores held-out preference pairs with a trained reward model
and returns its pairwise accuracy with a Wilson interval and the expected calibration error of
its Bradley–Terry probabilities sigmoid(r_c − r_r) (:mod:`tasks.evaluation.metrics`). The reward
stage logs these on its run (``judge/...`` metrics, from the validation pairs, which the
training never sees) and registration tags the reward-model version with them (``alignflow.judge.*``);
the gate holds the same statistics measured on the test pairs against ``gate.min_judge_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tasks.evaluation import metrics as M


class JudgeReliability(BaseModel):
    """Pairwise accuracy of a reward model on held-out pairs, its interval and calibration."""

    accuracy: float
    lower: float
    upper: float
    confidence: float
    ece: float
    """Expected calibration error of sigmoid(r_c − r_r) (:func:`tasks.evaluation.metrics.calibration_ece`)."""
    mean_margin: float
    pairs: int
    split: str
    """Which held-out pairs were scored (``validation`` on the reward run, ``test`` at the gate)."""

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        """Flat MLflow metrics: ``judge/accuracy``, ``judge/accuracy_lower``, ``judge/accuracy_upper``,
        ``judge/ece``, ``judge/mean_margin``, ``judge/pairs``."""
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}accuracy_lower": self.lower,
                f"{prefix}accuracy_upper": self.upper, f"{prefix}ece": self.ece,
                f"{prefix}mean_margin": self.mean_margin, f"{prefix}pairs": float(self.pairs)}

    def tags(self, prefix: str = "alignflow.judge.") -> dict[str, str]:
        """Registry tags (strings): the same figures with the split and confidence level."""
        return {f"{prefix}{self.split}.accuracy": f"{self.accuracy:.4f}",
                f"{prefix}{self.split}.accuracy_ci": f"{self.lower:.4f}-{self.upper:.4f}",
                f"{prefix}{self.split}.confidence": f"{self.confidence:g}",
                f"{prefix}{self.split}.ece": f"{self.ece:.4f}",
                f"{prefix}{self.split}.pairs": str(self.pairs)}


def reliability_from_scores(chosen, rejected, *, split: str, confidence: float = 0.95) -> JudgeReliability:
    """The statistics of scores a judge gave the chosen and rejected sides of held-out pairs."""
    acc = M.preference_accuracy(chosen, rejected, confidence)
    return JudgeReliability(accuracy=acc.accuracy, lower=acc.lower, upper=acc.upper, confidence=confidence,
                            ece=M.calibration_ece(chosen, rejected), mean_margin=acc.mean_margin, pairs=acc.n,
                            split=split)


def reward_model_reliability(model_dir: str | Path, pairs_path: str | Path, *, split: str = "validation",
                             max_length: int = 512, max_prompt_length: int = 256, confidence: float = 0.95,
                             batch_size: int = 32, device: str = "cpu") -> JudgeReliability | None:
    """Score the pairs of ``pairs_path`` (Parquet: ``prompt``, ``is_chat``, ``chosen``, ``rejected``)
    with the reward model in ``model_dir``, tokenised as the reward recipe trains (prompt +
    response, truncated to ``max_length`` / ``max_prompt_length``). None when the file has no rows.
    Raises what reading the file or loading the model raises (naming the path)."""
    import numpy as np
    import pandas as pd

    from alignment.batching import decode_prompt
    from tasks.evaluation.suite import reward_scorer_from_folder

    rows = pd.read_parquet(pairs_path).to_dict("records")
    if not rows:
        return None
    score = reward_scorer_from_folder(model_dir, device, batch_size, max_length, max_prompt_length)
    prompts = [decode_prompt(r) for r in rows]
    chosen = np.asarray(score(prompts, [r["chosen"] for r in rows]), dtype=np.float64)
    rejected = np.asarray(score(prompts, [r["rejected"] for r in rows]), dtype=np.float64)
    return reliability_from_scores(chosen, rejected, split=split, confidence=confidence)


def trained_judge_tags(summary: dict | None) -> dict[str, str]:
    """Registry tags of the reliability a reward stage recorded in its summary (``judge``), or none."""
    record = (summary or {}).get("judge")
    return JudgeReliability.model_validate(record).tags() if record else {}


def report_judge_tags(report, confidence: float) -> dict[str, str]:
    """Registry tags of the reward model's record in an evaluation report
    (:class:`~tasks.evaluation.report.EvalReport`): its accuracy on the test pairs and its
    agreement with the oracle on the evaluated response pairs."""
    tags: dict[str, str] = {}
    acc = report.accuracy("reward_model")
    if acc is not None:
        tags.update(JudgeReliability(accuracy=acc.accuracy, lower=acc.lower, upper=acc.upper, confidence=confidence,
                                     ece=acc.ece, mean_margin=acc.mean_margin, pairs=acc.n, split="test").tags())
    for a in report.judge_agreement:
        tags[f"alignflow.judge.oracle_agreement.{a.opponent}"] = f"{a.rate:.4f} ({a.lower:.4f}-{a.upper:.4f}, n={a.n})"
    return tags
