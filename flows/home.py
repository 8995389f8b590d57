"""Which pipeline a command without ``--config`` means: the one that has run in the home.

Every pipeline run saves its resolved config as ``<home>/runs/<name>/config-<digest>.yaml``
(:func:`saved_config_path`, written by flows/pipeline.py). ``alignflow status`` and ``alignflow ingest`` without ``--config`` use the
most recently saved config of the home, and say which; with none in the home, ``status``
says so and ``ingest`` uses the default ``data`` settings (not the demo's), so the threshold
it applies is the one a new config would have. Imports no Prefect or MLflow.
"""

from __future__ import annotations

from pathlib import Path

from alignment.config import ConfigError
from tasks.config import PipelineConfig, load_pipeline_config


def saved_config_path(home: Path, name: str, digest: str) -> Path:
    """Where a pipeline run saves its resolved config (this module owns the layout)."""
    return Path(home) / "runs" / name / f"config-{digest}.yaml"


def saved_configs(home: Path) -> dict[str, Path]:
    """The newest saved config of each pipeline that has run in ``home``, by pipeline name."""
    found: dict[str, Path] = {}
    for path in sorted((Path(home) / "runs").glob("*/config-*.yaml"), key=lambda p: p.stat().st_mtime):
        found[path.parent.name] = path  # later (newer) files win
    return found


def home_pipeline(home: Path, overrides: list[str] | None = None) -> tuple[PipelineConfig | None, str]:
    """(config, sentence): the most recently run pipeline of ``home`` with ``overrides`` applied,
    or None when no pipeline has run there; the sentence says which was picked and from where."""
    found = saved_configs(home)
    if not found:
        return None, f"no pipeline has run in {home}; pass --config FILE"
    name, path = max(found.items(), key=lambda item: item[1].stat().st_mtime)
    try:
        cfg = load_pipeline_config(path, [f"pipeline.home={home}", *(overrides or [])])
    except ConfigError as err:  # saved by an older version whose fields have changed
        return None, f"the saved config of pipeline {name} ({path}) no longer loads ({err}); pass --config FILE"
    others = sorted(set(found) - {name})
    tail = f" (others here: {', '.join(others)}; pass --config FILE to choose)" if others else ""
    return cfg, f"pipeline {name} of {home}, config {path.name}{tail}"


def default_data_config(home: Path, overrides: list[str] | None = None) -> PipelineConfig:
    """A config with every section at its defaults (no demo), in ``home``."""
    from alignment.config import apply_overrides, validate_config

    data = apply_overrides({"pipeline": {"home": str(home)}}, overrides)
    return validate_config(PipelineConfig, data)  # type: ignore[return-value]
