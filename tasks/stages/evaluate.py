"""Evaluation stage: the candidate against the champion (or the base model for a first
candidate) and the reference, on held-out prompts and pairs; then the gate decision.

Logged to a child MLflow run: every ``eval/`` metric, the report JSON, a samples table
(``log_table``), score distributions, the candidate's training curves and reward vs KL across
registered versions (PNG). Cached on the models' digests, the test split and the
``evaluation`` section, so a re-run compares the same models only once.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

import pandas as pd
from pydantic import BaseModel, Field

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.evaluation.gate import decide
from tasks.evaluation.judge import report_judge_tags
from tasks.evaluation.report import EvalReport
from tasks.faults import fault_point
from tasks.launcher import resolve_device
from tasks.methods import method
from tasks.progress import run_logger
from tasks.records import ModelRecord
from tasks.stages.cached import cached_stage
from tasks.stages.data import DatasetRecord

EVAL_TAGS = ("kl", "reward_mean", "oracle_mean", "malformed_share", "distinct_2")
HEADLINE = {
    "oracle cand": "eval/candidate/oracle_mean", "oracle base": "eval/reference/oracle_mean",
    "reward cand": "eval/candidate/reward_mean", "KL to base": "eval/candidate/kl",
    "win vs champion (RM)": "eval/win_rate/reward_model_vs_champion",
    "win vs champion (oracle)": "eval/win_rate/oracle_vs_champion",
    "malformed": "eval/candidate/malformed_share", "distinct-2": "eval/candidate/distinct_2",
    "greedy looping cand": "eval/candidate/greedy_looping_share",
    "greedy looping base": "eval/reference/greedy_looping_share",
}
"""Summary-table label -> metric of the evaluation's headline."""


class EvalRecord(BaseModel):
    """The evaluation's report (as a dict) and where its files are."""

    report: dict[str, Any]
    report_path: str
    run_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)

    def parsed(self) -> EvalReport:
        return EvalReport.model_validate(self.report)

    def headline(self) -> dict[str, float]:
        """The handful of numbers shown in the summary table."""
        return {label: round(self.metrics[key], 4) for label, key in HEADLINE.items() if key in self.metrics}

    def headline_metrics(self) -> dict[str, float]:
        """The headline numbers under their MLflow metric names (logged on the round's parent run)."""
        return {key: self.metrics[key] for key in HEADLINE.values() if key in self.metrics}


def _heldout(dataset: DatasetRecord) -> tuple[list, pd.DataFrame | None]:
    """Test-split prompts (falling back to validation) and test pairs."""
    from alignment.batching import decode_prompt  # torch: imported when the stage runs, not with the flow

    prompt_file = dataset.files.get("prompts-test") or dataset.files.get("prompts-validation")
    if not prompt_file or not Path(prompt_file).exists():
        raise ValueError(f"the dataset {dataset.digest} has no held-out prompts (test or validation split)")
    prompts = [decode_prompt(row) for row in pd.read_parquet(prompt_file).to_dict("records")]
    pair_file = dataset.files.get("pairs-test")
    pairs = pd.read_parquet(pair_file) if pair_file and Path(pair_file).exists() else None
    return prompts, pairs


def _validation_prompts(cfg: PipelineConfig, dataset: DatasetRecord, base: ModelRecord) -> list:
    """The validation split's prompts: the demo's own prompt table where there is one, else the
    dataset's ``prompts-validation`` file; empty when there are none."""
    if cfg.demo is not None:
        from tasks.stages.demo import heldout_prompts

        if found := heldout_prompts(cfg, base, "validation"):
            return found
    path = dataset.files.get("prompts-validation")
    if not path or not Path(path).exists():
        return []
    from alignment.batching import decode_prompt

    return [decode_prompt(row) for row in pd.read_parquet(path).to_dict("records")]


def _eval_prompts(cfg: PipelineConfig, dataset: DatasetRecord, base: ModelRecord, test: list) -> list:
    """The prompts of ``evaluation.prompt_splits`` in order, each once: ``test`` (the demo's own
    test split, larger than the feedback's, else the dataset's test prompts as given) and
    ``validation``; then, in the demo with ``demo.pretraining_heldout_prompts``, the held-out prompts
    cut from its pretraining documents. Raises ValueError when they hold none."""
    def of(split: str) -> list:
        if split == "validation":
            return _validation_prompts(cfg, dataset, base)
        if cfg.demo is not None:
            from tasks.stages.demo import heldout_prompts

            return heldout_prompts(cfg, base) or test
        return test

    # first occurrence wins; repr keys: chat prompts are lists of dicts (unhashable)
    ordered = [p for split in cfg.evaluation.prompt_splits for p in of(split)]
    if cfg.demo is not None and len(ordered) < cfg.evaluation.num_prompts:  # round 0's 220 need none: not cut
        from tasks.stages.demo import pretraining_prompts

        ordered += pretraining_prompts(cfg, base)
    unique = list({repr(p): p for p in ordered}.values())
    if not unique:
        raise ValueError(f"no held-out prompts in the splits {cfg.evaluation.prompt_splits} of dataset {dataset.digest}")
    return unique


def evaluation_inputs(cfg: PipelineConfig, dataset: DatasetRecord, base: ModelRecord) -> tuple[list, pd.DataFrame | None]:
    """What this stage evaluates ``dataset`` on: the prompts of ``evaluation.prompt_splits`` (each once;
    ``evaluation.num_prompts`` caps them later) and the test pairs the judge's accuracy is measured on.
    Benchmarks call it to score on the gate's own prompts. Raises ValueError when there are no prompts."""
    test, pairs = _heldout(dataset)
    return _eval_prompts(cfg, dataset, base, test), pairs


def _greedy_extra_prompts(cfg: PipelineConfig, dataset: DatasetRecord, base: ModelRecord) -> list | None:
    """The validation split's prompts when ``evaluation.greedy_splits`` names it: decoded greedily
    beside the evaluated prompts for the looping share (no policy trains on them). None when not
    asked for or there are none."""
    if not cfg.evaluation.greedy or "validation" not in cfg.evaluation.greedy_splits:
        return None
    return _validation_prompts(cfg, dataset, base) or None


def _oracle(cfg: PipelineConfig):
    if cfg.demo is None:
        return None
    from tasks.demo.oracle import sentiment

    return lambda texts: sentiment(texts)


def frontier_judge(cfg: PipelineConfig) -> str:
    """The score on the frontier plot's y axis: the demo's oracle, else the reward model's."""
    return "oracle_mean" if cfg.demo is not None else "reward_mean"


def _version_points(cfg: PipelineConfig, current: dict[str, float]) -> list[tuple[str, float, float]]:
    """(label, KL, score) of earlier registered versions plus this candidate, for the frontier plot."""
    judge = frontier_judge(cfg)
    points = []
    for v in tracking.model_versions(tracking.policy_model_name(cfg.pipeline.name)):
        kl, reward = v.tags.get("alignflow.eval.kl"), v.tags.get(f"alignflow.eval.{judge}")
        if kl is not None and reward is not None:
            points.append((f"v{v.version}", float(kl), float(reward)))
    if f"eval/candidate/{judge}" in current and "eval/candidate/kl" in current:
        points.append(("candidate", current["eval/candidate/kl"], current[f"eval/candidate/{judge}"]))
    if f"eval/reference/{judge}" in current:
        points.insert(0, ("base", 0.0, current[f"eval/reference/{judge}"]))
    return points


def run_evaluation(cfg: PipelineConfig, candidate: ModelRecord, champion: ModelRecord | None, base: ModelRecord,
                   reward: ModelRecord | None, dataset: DatasetRecord, parent_run_id: str | None) -> EvalRecord:
    """Evaluate and log; returns the record (the report is also written under the run folder)."""
    # torch, transformers and matplotlib: imported when the stage runs, not with the flow (process start-up)
    from tasks.evaluation.plots import (
        SCORE_AXES,
        plot_reward_vs_kl,
        plot_score_distributions,
        plot_training_curves,
    )
    from tasks.evaluation.suite import evaluate_models

    prompts, pairs = evaluation_inputs(cfg, dataset, base)
    greedy_extra = _greedy_extra_prompts(cfg, dataset, base)
    row = method(cfg.pipeline.method)
    beta = getattr(cfg, row.section).beta if row.implicit_reward else 0.1
    logger, started = run_logger(), time.monotonic()
    logger.info("evaluate: %d response(s) for each of %d held-out prompts from the candidate, %s and the base "
                "model; judged by %s", cfg.evaluation.samples_per_prompt, min(len(prompts), cfg.evaluation.num_prompts),
                f"the champion v{champion.registry_version}" if champion and champion.registry_version else "no champion",
                " and ".join(j for j, on in (("the reward model", reward), ("the oracle", cfg.demo)) if on) or "no judge")
    out = evaluate_models(candidate.path, champion.path if champion else None, base.path, prompts, pairs,
                          reward_model=reward.path if reward else None, oracle=_oracle(cfg),
                          settings=cfg.evaluation, beta=beta, device=resolve_device(cfg.pipeline.device),
                          reference_tokenizer=cfg.model.policy.tokenizer if cfg.model.policy else None,
                          chat_template=cfg.model.policy.chat_template if cfg.model.policy else None,
                          greedy_prompts=greedy_extra, sample_cache=cfg.home / "cache" / "eval-samples",
                          progress=lambda line: logger.info("evaluate: %s", line))
    logger.info("evaluate: done in %.0f s", time.monotonic() - started)
    folder = cfg.home / "runs" / cfg.pipeline.name / f"eval-{candidate.digest}"
    folder.mkdir(parents=True, exist_ok=True)
    report_path = folder / "eval_report.json"
    report_path.write_text(out.report.model_dump_json(indent=2))
    metrics = out.report.metrics()
    record = EvalRecord(report=out.report.model_dump(mode="json"), report_path=str(report_path), metrics=metrics)
    if parent_run_id is None:
        return record
    with tracking.child_run(parent_run_id, "evaluate") as run_id:
        record.run_id = run_id
        tracking.log_metrics(run_id, metrics)
        _log_heldout(run_id, cfg, dataset)
        fault_point("evaluate")
        tracking.log_artifact(run_id, report_path, "evaluation")
        if out.samples:
            tracking.log_table(run_id, pd.DataFrame(out.samples), "evaluation/samples.json")
        plots = []
        if out.scores:
            plots.append(plot_score_distributions(out.scores, folder / "score_distributions.png"))
        metrics_file = Path(candidate.path).parent / "metrics.jsonl"
        if not metrics_file.exists():
            metrics_file = Path(candidate.path).parent.parent / "metrics.jsonl"
        if metrics_file.exists():
            plots.append(plot_training_curves(metrics_file, folder / "training_curves.png"))
        points = _version_points(cfg, metrics)
        if len(points) >= 2:
            ylabel, title = SCORE_AXES[frontier_judge(cfg)]
            plots.append(plot_reward_vs_kl(points, folder / "reward_vs_kl.png", ylabel=ylabel, title=title))
        for plot in plots:
            tracking.log_artifact(run_id, plot, "evaluation/plots")
    return record


def _log_heldout(run_id: str, cfg: PipelineConfig, dataset: DatasetRecord) -> None:
    """The held-out files the evaluation reads, as the run's dataset inputs."""
    prompts = dataset.files.get("prompts-test") or dataset.files.get("prompts-validation")
    for path in (prompts, dataset.files.get("pairs-test")):
        if path and Path(path).is_file():
            tracking.log_dataset(run_id, path, context="evaluation", name=f"{cfg.pipeline.name}-{Path(path).stem}",
                                 digest=dataset.digest[:36])


def _report_model(annotation: Any) -> type[BaseModel] | None:
    """The report model a field holds (itself, in a list or optional), or None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _report_model(a)) is not None), None)


def missing_report_fields(data: Any, model: type[BaseModel] = EvalReport, where: str = "") -> list[str]:
    """Fields of the current report model (nested models and their list items included) that the
    report dict ``data`` lacks: a record written by an older version, before a guard figure existed."""
    if not isinstance(data, dict):
        return [where.rstrip(".") or "<report>"]
    missing = [f"{where}{name}" for name in model.model_fields if name not in data]
    for name, info in model.model_fields.items():
        sub, value = _report_model(info.annotation), data.get(name)
        if sub is not None and isinstance(value, dict):
            missing += missing_report_fields(value, sub, f"{where}{name}.")
        elif sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                missing += missing_report_fields(item, sub, f"{where}{name}.{i}.")
    return missing


def evaluation_complete(record: EvalRecord) -> bool:
    """Whether a (cached) evaluation record has every field the current report, and so the gate,
    reads. False makes :func:`~tasks.stages.cached.run_cached` evaluate again rather than hand the
    gate an old record whose missing guard figures would fail as "not measured"."""
    return not missing_report_fields(record.report)


@lru_cache(maxsize=1)
def evaluation_version() -> str:
    """The evaluation's own version in its cache key, beside ``alignment/``'s code version (which
    does not cover this code): a digest of the report's fields (:class:`EvalReport`'s JSON schema,
    nested) and of the evaluation code's source (``tasks/evaluation/``, this module). A new guard
    figure, or a change in how one is measured, makes an older cached evaluation a miss."""
    digest = hashlib.sha256(json.dumps(EvalReport.model_json_schema(), sort_keys=True).encode())
    here = Path(__file__).resolve()
    for path in [here, *sorted((here.parents[1] / "evaluation").glob("*.py"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _evaluation_key(cfg: PipelineConfig, candidate: ModelRecord, champion: ModelRecord | None, base: ModelRecord,
                    reward: ModelRecord | None, dataset: DatasetRecord, **_: Any) -> tuple:
    return (candidate.digest, champion.digest if champion else None, base.digest, reward.digest if reward else None,
            dataset.digest, cfg.evaluation, cfg.demo and cfg.demo.pretraining_heldout_prompts, evaluation_version())


evaluate_task = cached_stage("evaluate", key=_evaluation_key)(run_evaluation)
"""Prefect task of :func:`run_evaluation`, cached on the models', the dataset's digests, the
``evaluation`` section and :func:`evaluation_version`, so a re-run compares the same models only
once and a record from before a report field existed is never handed to the gate (run it with
:func:`evaluation_complete` as ``run_cached``'s check, which also catches such a record)."""


def gate_decision(cfg: PipelineConfig, record: EvalRecord, has_champion: bool) -> dict[str, Any]:
    """The gate's decision as a plain dict (passed, reasons, checks) plus eval figures to tag versions with."""
    decision = decide(record.parsed(), cfg.gate, has_champion).model_dump(mode="json")
    cand = record.report.get("candidate", {})
    decision["eval_tags"] = {f"alignflow.eval.{k}": cand[k] for k in EVAL_TAGS if cand.get(k) is not None}
    if (base_oracle := (record.report.get("reference") or {}).get("oracle_mean")) is not None:
        # the base model on the same prompts: a gain over the base is read against this, not another round's set
        decision["eval_tags"]["alignflow.eval.base_oracle_mean"] = base_oracle
    decision["judge_tags"] = report_judge_tags(record.parsed(), cfg.evaluation.confidence)  # for the reward version
    decision["report_path"] = record.report_path
    return json.loads(json.dumps(decision, default=str))
