"""Small records that Prefect tasks pass each other: paths, digests and numbers, never models
or tensors. They are persisted as task results, so a cached stage hands the same record on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class ModelRecord(BaseModel):
    """A model folder produced or chosen by a stage."""

    stage: str
    """Which stage made it (base, champion, sft, reward, dpo, ppo, grpo)."""
    path: str
    """Hugging Face folder (full weights; for LoRA runs the merged weights)."""
    digest: str
    """Identity used in downstream cache keys (content digest or the producing stage's key)."""
    run_id: str | None = None
    """MLflow run that trained it."""
    adapter_path: str | None = None
    """LoRA adapter folder when the run trained adapters."""
    base: str | None = None
    """The model it started from (hub id or path)."""
    summary: dict[str, Any] = Field(default_factory=dict)
    """The recipe's summary.json (final metrics, steps, wall time)."""
    registry_version: str | None = None
    """Registered version when the record comes from the registry."""

    def exists(self) -> bool:
        return Path(self.path).exists()


class StageTiming(BaseModel):
    """One row of the end-of-run summary."""

    stage: str
    status: str
    """ran, cached, skipped or failed."""
    seconds: float
    metrics: dict[str, Any] = Field(default_factory=dict)
