"""Data stages as Prefect tasks: ingest + validate (new landing files only) and the preference
dataset build (cached on the validated data's digest and the ``preferences`` section).
Which validated files a build reads is :func:`tasks.data.handoff.selected_files`.

MLflow: row counts, quarantine share and failure reasons, the validation report and
quarantine summary as artifacts; for the build, pair counts, agreement, split sizes, the data
card and dataset lineage through ``mlflow.data`` (the dataset's digest is its version).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from pydantic import BaseModel, Field

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.data.handoff import selected_files, validated_root
from tasks.data.landing import AlreadyConsumed, ingest, quarantine_sample
from tasks.data.preferences import build_preferences
from tasks.data.settings import IngestSettings
from tasks.data.validate import QuarantineThresholdExceeded
from tasks.round import RoundLog
from tasks.stages.cached import cached_stage
from tasks.versioning import digest_of


class IngestRecord(BaseModel):
    """One ingest: counts of this batch and where all validated data lives."""

    new_files: int
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    validated_dir: str
    validated_digest: str
    """Digest of the names of the validated files the build reads (the build's cache input)."""
    replayed_batches: list[str] = Field(default_factory=list)
    """Earlier batches the build reads besides the newest ``preferences.recent_batches``
    (``preferences.replay_refused``: the refused rounds' since the champion was promoted)."""
    batch_id: str | None = None
    """The batch ingested now (its files stay pending in the ledger until the round ends)."""
    quarantine: str | None = None
    top_reasons: dict[str, int] = Field(default_factory=dict)


class DatasetRecord(BaseModel):
    """The preference dataset version handed to training and evaluation."""

    digest: str
    out_dir: str
    files: dict[str, str]
    """File roles (``pairs-train``, ``prompts-test``, ...) to Parquet paths."""
    counts: dict[str, int | str] = Field(default_factory=dict)
    card_md: str | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.counts.get("pairs", 0))


def data_dir(cfg: PipelineConfig) -> Path:
    """Where a pipeline's ingested data, ledger and builds live."""
    return cfg.home / "data" / cfg.pipeline.name


def ingest_settings(cfg: PipelineConfig) -> IngestSettings:
    """The ``data`` section with the landing folder resolved (default ``<home>/landing/<pipeline>``)."""
    landing = cfg.data.landing_dir or str(cfg.home / "landing" / cfg.pipeline.name)
    Path(landing).mkdir(parents=True, exist_ok=True)
    return cfg.data.model_copy(update={"landing_dir": landing})


def _validated_digest(root: Path, recent_batches: int | None = None, also: list[str] | None = None) -> str:
    """Digest of the names of the validated files a build would read (the build's cache input)."""
    files = selected_files(root, recent_batches, also or ())
    return digest_of({k: [p.name for p in v] for k, v in sorted(files.items())})


def replayed_batches(cfg: PipelineConfig) -> list[str]:
    """The refused rounds' batches a build reads under ``preferences.replay_refused`` (else []):
    those since the champion was promoted, from the home's round log (:class:`tasks.round.RoundLog`).
    A redo of a round that died or failed reads the list its first attempt recorded
    (:attr:`tasks.round.RoundRecord.replayed_batches`): that attempt may have moved the champion."""
    if not (cfg.preferences.replay_refused and cfg.preferences.recent_batches):
        return []
    log = RoundLog(data_dir(cfg))
    current = log.load()
    if current is not None and not current.ended and current.replayed_batches is not None:
        return current.replayed_batches
    champion = tracking.alias_version(tracking.policy_model_name(cfg.pipeline.name), tracking.CHAMPION)
    return log.refused_since_promotion(champion)


def _log_ingest_failure(run_id: str, out: Path, err: QuarantineThresholdExceeded) -> None:
    tracking.log_metrics(run_id, {"ingest/threshold_exceeded": 1.0})
    tracking.set_tags(run_id, {"alignflow.ingest_error": str(err)[:5000]})
    for path in out.glob("reports/*.json"):
        tracking.log_artifact(run_id, path, "ingest/reports")


def _log_ingest(run_id: str, record: IngestRecord, result) -> None:
    share = record.rows_quarantined / record.rows_in if record.rows_in else 0.0
    tracking.log_metrics(run_id, {"ingest/new_files": record.new_files, "ingest/rows_in": record.rows_in,
                                  "ingest/rows_valid": record.rows_valid,
                                  "ingest/rows_quarantined": record.rows_quarantined,
                                  "ingest/quarantine_share": share,
                                  **{f"ingest/reason/{k}": v for k, v in record.top_reasons.items()}})
    if result.report_path:
        tracking.log_artifact(run_id, result.report_path, "ingest")
    if result.quarantine and record.rows_quarantined:
        tracking.log_table(run_id, quarantine_sample(result.quarantine), "ingest/quarantine_sample.json")
    for kind, path in result.validated.items():
        tracking.log_dataset(run_id, path, name=f"validated-{kind}", context="validated")


def run_ingest(cfg: PipelineConfig, parent_run_id: str | None) -> IngestRecord:
    """Validate new landing files; raise QuarantineThresholdExceeded after logging when over the limit."""
    out = data_dir(cfg)
    replayed = replayed_batches(cfg)
    with tracking.stage_run(parent_run_id, "ingest") as run_id:
        try:
            result = ingest(ingest_settings(cfg), out, commit=False)  # the round settles the ledger
        except QuarantineThresholdExceeded as err:
            if run_id:
                _log_ingest_failure(run_id, out, err)
            raise
        report = result.report or {}
        record = IngestRecord(new_files=len(result.sources), rows_in=report.get("rows_in", 0),
                              rows_valid=report.get("rows_valid", 0),
                              rows_quarantined=report.get("rows_quarantined", 0),
                              validated_dir=str(validated_root(out)),
                              validated_digest=_validated_digest(validated_root(out), cfg.preferences.recent_batches,
                                                                 replayed),
                              replayed_batches=replayed,
                              quarantine=result.quarantine, batch_id=result.batch_id,
                              top_reasons=dict(list((report.get("reasons") or {}).items())[:20]))
        if run_id:
            _log_ingest(run_id, record, result)
        return record


@task(name="ingest-validate", retries=2, retry_delay_seconds=5,
      retry_condition_fn=lambda task, run, state: not isinstance(state.result(raise_on_failure=False),
                                                                  (QuarantineThresholdExceeded, AlreadyConsumed)))
def ingest_task(cfg: PipelineConfig, parent_run_id: str | None) -> IngestRecord:
    """Prefect task: ingest new landing files (I/O errors are retried; a quarantine overflow is not)."""
    return run_ingest(cfg, parent_run_id)


def _files(build) -> dict[str, str]:
    files = {}
    for table, per_split in build.split_files.items():
        for split, path in per_split.items():
            files[f"{table}-{split}"] = path
    files.update(pairs=build.pairs, prompts=build.prompts, demonstrations=build.demonstrations)
    return files


def _log_build(run_id: str, cfg: PipelineConfig, build) -> None:
    numeric = {f"data/{k}": v for k, v in build.counts.items() if isinstance(v, (int, float))}
    pairs = pd.read_parquet(build.pairs, columns=["agreement", "weight", "split"])
    numeric.update({"data/agreement_mean": float(pairs["agreement"].mean()) if len(pairs) else 0.0,
                    "data/weight_mean": float(pairs["weight"].mean()) if len(pairs) else 0.0})
    tracking.log_metrics(run_id, numeric)
    tracking.set_tags(run_id, {"alignflow.data_digest": build.digest})
    tracking.log_artifact(run_id, build.card_json, "data_card")
    tracking.log_artifact(run_id, build.card_md, "data_card")
    tracking.log_dataset(run_id, build.pairs, name=f"{cfg.pipeline.name}-preferences", context="training",
                         digest=build.digest[:36])


def log_round_dataset(parent_run_id: str, cfg: PipelineConfig, dataset: DatasetRecord) -> None:
    """The preference dataset as an input of the round's parent run (also when the build was
    cached), under the same name and digest as on the build's run."""
    if Path(dataset.files.get("pairs", "")).is_file():
        tracking.log_dataset(parent_run_id, dataset.files["pairs"], name=f"{cfg.pipeline.name}-preferences",
                             context="training", digest=dataset.digest[:36])


def _build_key(cfg: PipelineConfig, ingest_record: IngestRecord, **_) -> tuple:
    return ingest_record.validated_digest, cfg.preferences, cfg.pipeline.name, str(cfg.home)


def dataset_present(record: DatasetRecord) -> bool:
    """True while every file of a (cached) dataset record is still on disk."""
    return all(Path(p).exists() for p in record.files.values())


def run_build(cfg: PipelineConfig, ingest_record: IngestRecord, parent_run_id: str | None) -> DatasetRecord:
    """Build the preference dataset from the selected validated files; log counts, card, lineage."""
    out = data_dir(cfg) / "preferences" / ingest_record.validated_digest
    with tracking.stage_run(parent_run_id, "preferences") as run_id:
        files = selected_files(Path(ingest_record.validated_dir), cfg.preferences.recent_batches,
                               ingest_record.replayed_batches)
        build = build_preferences({k: [str(p) for p in v] for k, v in files.items()}, out, cfg.preferences)
        if run_id:
            _log_build(run_id, cfg, build)
        return DatasetRecord(digest=build.digest, out_dir=build.out_dir, files=_files(build),
                             counts=build.counts, card_md=build.card_md)


build_task = cached_stage("build-preferences", key=_build_key)(run_build)
"""Prefect task of :func:`run_build`, cached on the validated files' digest and the ``preferences``
section (run it with :func:`tasks.stages.cached.run_cached` and :func:`dataset_present`)."""
