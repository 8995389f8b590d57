"""The alignment pipeline flow: one round of ingest → preferences → (SFT) → reward model →
policy update → evaluation → register + promote, tracked in MLflow.

Each stage is a Prefect task (``tasks/stages``); stages pass records (paths, digests,
numbers), never models. Training stages are cached on their inputs, config section and the
code version of ``alignment/``, so a re-run with nothing new skips them, and a re-run after a
crash resumes the interrupted training from its last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks import tracking
from tasks.config import PipelineConfig, load_pipeline_config, to_yaml
from tasks.methods import label, method
from tasks.records import ModelRecord, StageTiming
from tasks.stages.data import build_preferences_task, ingest_task
from tasks.stages.demo import demo_base_model_task, landing_is_empty, simulate_feedback_task
from tasks.stages.evaluate import evaluate_task, gate_decision
from tasks.stages.models import base_model_record, champion_record, champion_trained_on, registered_candidate
from tasks.stages.register import register_task
from tasks.stages.summary import PipelineSummary, publish_summary
from tasks.stages.train import run_train_task
from tasks.versioning import code_version


class StageClock:
    """Times stages for the end-of-run table and the orchestration-overhead figure."""

    def __init__(self) -> None:
        self.rows: list[StageTiming] = []
        self.started = time.monotonic()

    def add(self, stage: str, status: str, started: float, metrics: dict[str, Any] | None = None) -> None:
        self.rows.append(StageTiming(stage=stage, status=status, seconds=time.monotonic() - started,
                                     metrics=metrics or {}))


def resolve_config(config: PipelineConfig | str | None, overrides: list[str] | None) -> PipelineConfig:
    """A config object as given, or loaded from a path (None: the embedded demo)."""
    if isinstance(config, PipelineConfig):
        return config if not overrides else load_pipeline_config(None, overrides)
    return load_pipeline_config(config, overrides)


@flow(name="alignment-pipeline", log_prints=True)
def alignment_pipeline(config: str | None = None, overrides: list[str] | None = None,
                       only_if_new_data: bool = False) -> dict[str, Any]:
    """Run one round of the pipeline.

    Args:
        config: path to a pipeline YAML; None runs the embedded demo (configs/demo.yaml).
        overrides: ``key.path=value`` strings applied on top of the file.
        only_if_new_data: return at once (status ``no-new-data``) when no new landing files
            arrived — what the scheduled deployment uses.

    Returns the run summary (stages, timings, metrics, registry state) as a dict.
    Raises the first stage error after marking the MLflow parent run FAILED; the quarantine
    and every finished stage's outputs stay on disk (and in the cache) for the re-run.
    """
    cfg = resolve_config(config, overrides)
    logger = get_run_logger()
    clock = StageClock()
    experiment_id = tracking.configure(cfg.home, cfg.pipeline.name)
    parent = tracking.start_parent_run(experiment_id, run_name=f"{cfg.pipeline.name}-{flow_run.get_name() or 'run'}",
                                       tags={"prefect.flow_run_id": str(flow_run.get_id() or ""),
                                             "alignflow.config_digest": cfg.digest(),
                                             "alignflow.code_version": code_version(),
                                             "alignflow.method": cfg.pipeline.method})
    summary = PipelineSummary(pipeline=cfg.pipeline.name, home=str(cfg.home), mlflow_run_id=parent,
                              experiment_id=experiment_id, tracking_uri=tracking.tracking_uri(cfg.home),
                              flow_run_id=str(flow_run.get_id() or ""))
    status = "FAILED"
    try:
        tracking.log_params(parent, tracking.flatten(cfg.model_dump(mode="json")))
        config_file = Path(cfg.home) / "runs" / cfg.pipeline.name / f"config-{cfg.digest()}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(to_yaml(cfg))
        tracking.log_artifact(parent, config_file, "config")

        # -- the starting model (the demo builds and caches its own) ---------------------------
        t = time.monotonic()
        if cfg.demo is not None and cfg.model.policy is None:
            base = demo_base_model_task(cfg)
            clock.add("base model (demo)", "ready", t, {"path": base.path})
        else:
            base = base_model_record(cfg)
            clock.add("base model", "ready", t)

        # -- feedback --------------------------------------------------------------------------
        if cfg.demo is not None and landing_is_empty(cfg):
            t = time.monotonic()
            sim = simulate_feedback_task(cfg, champion_record(cfg) or base, base, round_index=0)
            clock.add("simulate feedback (demo)", "ran", t, sim)
        t = time.monotonic()
        ingest = ingest_task(cfg, parent)
        clock.add("ingest + validate", "ran", t, {"new files": ingest.new_files, "rows in": ingest.rows_in,
                                                  "valid": ingest.rows_valid,
                                                  "quarantined": ingest.rows_quarantined})
        if only_if_new_data and ingest.new_files == 0:
            logger.info("No new landing files: nothing to do.")
            summary.status = "no-new-data"
            status = "FINISHED"
            return publish_summary(summary, clock.rows, clock.started)

        t = time.monotonic()
        dataset, cached = build_preferences_task(cfg, ingest, parent)
        clock.add("build preferences", "cached" if cached else "ran", t,
                  {"pairs": dataset.num_pairs, "digest": dataset.digest})

        # -- nothing new: the champion already reflects this data and config ------------------
        current = champion_trained_on(cfg, dataset.digest)
        if current is not None:
            logger.info("The champion v%s was trained on this dataset and config: nothing to retrain.",
                        current.policy_version)
            summary.registry = current
            summary.status = "unchanged"
            clock.add("train + evaluate", "skipped", time.monotonic(), {"champion": current.policy_version})
            status = "FINISHED"
            return publish_summary(summary, clock.rows, clock.started)

        # -- training --------------------------------------------------------------------------
        init = base
        if cfg.pipeline.init_from == "champion":
            init = champion_record(cfg) or base
        if cfg.sft.enabled:
            t = time.monotonic()
            init, cached = run_train_task(cfg, "sft", dataset.files, dataset.digest, init, parent)
            clock.add("supervised fine-tune", "cached" if cached else "ran", t, _final(init, "eval/loss"))
        reward = None
        row = method(cfg.pipeline.method)
        if cfg.reward.enabled or row.needs_reward_model:
            t = time.monotonic()
            reward, cached = run_train_task(cfg, "reward", dataset.files, dataset.digest, base, parent)
            clock.add("reward model", "cached" if cached else "ran", t, _final(reward, "eval/accuracy"))
        t = time.monotonic()
        reference = base if row.implicit_reward and cfg.pipeline.dpo_reference == "base" else None
        candidate, cached = run_train_task(cfg, cfg.pipeline.method, dataset.files, dataset.digest, init, parent,
                                           reward=reward, reference=reference)
        shown = label(cfg.pipeline.method, getattr(getattr(cfg, method(cfg.pipeline.method).section), "loss_type", None))
        clock.add(f"fine-tune ({shown})", "cached" if cached else "ran", t,
                  _final(candidate, "eval/rewards/accuracy", "reward/raw"))

        # -- evaluation, gate, registry -------------------------------------------------------
        existing = registered_candidate(cfg, candidate)
        if existing is not None:
            summary.registry = existing
            summary.status = "unchanged"
            clock.add("evaluate + gate", "cached", time.monotonic(), {"version": existing.policy_version})
        else:
            t = time.monotonic()
            champion = champion_record(cfg)
            report, cached = evaluate_task(cfg, candidate, champion, base, reward, dataset, parent)
            decision = gate_decision(cfg, report, has_champion=champion is not None)
            clock.add("evaluate", "cached" if cached else "ran", t, report.headline())
            t = time.monotonic()
            registry = register_task(cfg, candidate, reward, dataset.digest, decision, parent,
                                     evaluated_against=champion.registry_version if champion else None)
            clock.add("register + promote", "ran", t, {"version": registry.policy_version,
                                                       "promoted": registry.promoted})
            summary.registry = registry
            summary.evaluation = report.headline()
            summary.status = "promoted" if registry.promoted else "not-promoted"
        status = "FINISHED"
        return publish_summary(summary, clock.rows, clock.started)
    finally:
        tracking.end_run(parent, status)


def _final(record: ModelRecord, *keys: str) -> dict[str, Any]:
    """Pick a few final metrics of a training record for the summary table."""
    metrics = record.summary.get("metrics", record.summary) if record.summary else {}
    out = {k: metrics[k] for k in keys if k in metrics}
    if "wall_s" in record.summary:
        out["train s"] = round(float(record.summary["wall_s"]), 1)
    return out
