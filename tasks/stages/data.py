"""Data stages as Prefect tasks: ingest + validate (new landing files only) and the preference
dataset build (cached on the validated data's digest and the ``preferences`` section).

MLflow: row counts, quarantine share and failure reasons, the validation report and
quarantine summary as artifacts; for the build, pair counts, agreement, split sizes, the data
card and dataset lineage through ``mlflow.data`` (the dataset's digest is its version).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from prefect import task
from pydantic import BaseModel, Field

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.data.handoff import read_validated_frame
from tasks.data.landing import ingest, quarantine_sample
from tasks.data.preferences import build_preferences, validated_files
from tasks.data.settings import IngestSettings
from tasks.data.validate import QuarantineThresholdExceeded
from tasks.versioning import digest_of, stage_cache_key


class IngestRecord(BaseModel):
    """One ingest: counts of this batch and where all validated data lives."""

    new_files: int
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    validated_dir: str
    validated_digest: str
    """Digest of every validated file so far (the build's cache input)."""
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


def selected_files(root: Path, recent_batches: int | None) -> dict[str, list[Path]]:
    """Validated files per kind, limited to the newest ``recent_batches`` ingest batches.

    A batch is one ingest (its files share the batch id as their name); batches are ordered by
    when they were written."""
    files = validated_files(root) if root.exists() else {}
    if recent_batches is None:
        return files
    written: dict[str, float] = {}
    for paths in files.values():
        for p in paths:
            written[p.stem] = max(written.get(p.stem, 0.0), p.stat().st_mtime)
    keep = set(sorted(written, key=lambda b: (written[b], b))[-recent_batches:])
    return {k: [p for p in v if p.stem in keep] for k, v in files.items() if any(p.stem in keep for p in v)}


def _validated_digest(root: Path, recent_batches: int | None = None) -> str:
    files = selected_files(root, recent_batches)
    return digest_of({k: [p.name for p in v] for k, v in sorted(files.items())})


def run_ingest(cfg: PipelineConfig, parent_run_id: str | None) -> IngestRecord:
    """Validate new landing files; raise QuarantineThresholdExceeded after logging when over the limit."""
    out = data_dir(cfg)
    settings = ingest_settings(cfg)

    def body(run_id: str | None) -> IngestRecord:
        try:
            result = ingest(settings, out)
        except QuarantineThresholdExceeded as err:
            if run_id:
                tracking.log_metrics(run_id, {"ingest/threshold_exceeded": 1.0})
                mlflow.MlflowClient().set_tag(run_id, "alignflow.ingest_error", str(err)[:5000])
                for path in out.glob("reports/*.json"):
                    tracking.log_artifact(run_id, path, "ingest/reports")
            raise
        report = result.report or {}
        record = IngestRecord(new_files=len(result.sources), rows_in=report.get("rows_in", 0),
                              rows_valid=report.get("rows_valid", 0),
                              rows_quarantined=report.get("rows_quarantined", 0), validated_dir=str(out / "validated"),
                              validated_digest=_validated_digest(out / "validated", cfg.preferences.recent_batches),
                              quarantine=result.quarantine,
                              top_reasons=dict(list((report.get("reasons") or {}).items())[:20]))
        if run_id:
            share = record.rows_quarantined / record.rows_in if record.rows_in else 0.0
            tracking.log_metrics(run_id, {"ingest/new_files": record.new_files, "ingest/rows_in": record.rows_in,
                                          "ingest/rows_valid": record.rows_valid,
                                          "ingest/rows_quarantined": record.rows_quarantined,
                                          "ingest/quarantine_share": share,
                                          **{f"ingest/reason/{k}": v for k, v in record.top_reasons.items()}})
            if result.report_path:
                tracking.log_artifact(run_id, result.report_path, "ingest")
            if result.quarantine and record.rows_quarantined:
                mlflow.MlflowClient().log_table(run_id, quarantine_sample(result.quarantine),
                                                "ingest/quarantine_sample.json")
            for kind, path in result.validated.items():
                frame = read_validated_frame(path)
                dataset = mlflow.data.from_pandas(frame, source=str(path), name=f"validated-{kind}")
                with mlflow.start_run(run_id=run_id):
                    mlflow.log_input(dataset, context="validated")
        return record

    if parent_run_id is None:
        return body(None)
    with tracking.child_run(parent_run_id, "ingest") as run_id:
        return body(run_id)


@task(name="ingest-validate", retries=2, retry_delay_seconds=5,
      retry_condition_fn=lambda task, run, state: not isinstance(state.result(raise_on_failure=False),
                                                                  QuarantineThresholdExceeded))
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


def run_build(cfg: PipelineConfig, ingest_record: IngestRecord, parent_run_id: str | None) -> DatasetRecord:
    """Build the preference dataset from every validated file so far; log counts, card, lineage."""
    out = data_dir(cfg) / "preferences" / ingest_record.validated_digest

    def body(run_id: str | None) -> DatasetRecord:
        files = selected_files(Path(ingest_record.validated_dir), cfg.preferences.recent_batches)
        build = build_preferences({k: [str(p) for p in v] for k, v in files.items()}, out, cfg.preferences)
        record = DatasetRecord(digest=build.digest, out_dir=build.out_dir, files=_files(build),
                               counts=build.counts, card_md=build.card_md)
        if run_id:
            numeric = {f"data/{k}": v for k, v in build.counts.items() if isinstance(v, (int, float))}
            pairs = pd.read_parquet(build.pairs, columns=["agreement", "weight", "split"])
            numeric.update({"data/agreement_mean": float(pairs["agreement"].mean()) if len(pairs) else 0.0,
                            "data/weight_mean": float(pairs["weight"].mean()) if len(pairs) else 0.0})
            tracking.log_metrics(run_id, numeric)
            mlflow.MlflowClient().set_tag(run_id, "alignflow.data_digest", build.digest)
            tracking.log_artifact(run_id, build.card_json, "data_card")
            tracking.log_artifact(run_id, build.card_md, "data_card")
            frame = pd.read_parquet(build.pairs)
            dataset = mlflow.data.from_pandas(frame, source=build.pairs, name=f"{cfg.pipeline.name}-preferences",
                                              digest=build.digest[:36])
            with mlflow.start_run(run_id=run_id):
                mlflow.log_input(dataset, context="training")
        return record

    if parent_run_id is None:
        return body(None)
    with tracking.child_run(parent_run_id, "preferences") as run_id:
        return body(run_id)


@task(name="build-preferences", cache_key_fn=stage_cache_key("validated_digest", "settings_digest"),
      persist_result=True)
def build_task(cfg: PipelineConfig, ingest_record: IngestRecord, parent_run_id: str | None,
               validated_digest: str = "", settings_digest: str = "") -> DatasetRecord:
    """Prefect wrapper of :func:`run_build`; the digests exist for the cache key."""
    return run_build(cfg, ingest_record, parent_run_id)


def build_preferences_task(cfg: PipelineConfig, ingest_record: IngestRecord,
                           parent_run_id: str | None) -> tuple[DatasetRecord, bool]:
    """Build (or take from cache) the preference dataset. Returns (record, came_from_cache)."""
    kwargs = dict(cfg=cfg, ingest_record=ingest_record, parent_run_id=parent_run_id,
                  validated_digest=ingest_record.validated_digest,
                  settings_digest=digest_of(cfg.preferences, cfg.pipeline.name, str(cfg.home)))
    state = build_task(**kwargs, return_state=True)
    record = state.result()
    if not all(Path(p).exists() for p in record.files.values()):
        state = build_task.with_options(refresh_cache=True)(**kwargs, return_state=True)
        record = state.result()
    return record, state.name == "Cached"
