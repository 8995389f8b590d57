"""Small records that Prefect tasks pass each other: paths, digests and numbers, never models
or tensors. They are persisted as task results, so a cached stage hands the same record on."""

from __future__ import annotations

import hashlib
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


def folder_digest(path: str | Path, sample_bytes: int = 1 << 20) -> str:
    """Content digest of a model folder: names, sizes, small files whole, large files' ends.

    Hub ids (not a local folder) digest to their id.
    """
    root = Path(path)
    digest = hashlib.sha256()
    if not root.exists():
        digest.update(str(path).encode())
        return digest.hexdigest()[:16]
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}:{size}".encode())
        with file.open("rb") as fh:
            if size <= 8 * sample_bytes:
                digest.update(fh.read())
            else:
                digest.update(fh.read(sample_bytes))
                fh.seek(size - sample_bytes)
                digest.update(fh.read(sample_bytes))
    return digest.hexdigest()[:16]
