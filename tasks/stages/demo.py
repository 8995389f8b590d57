"""The embedded demo's stages: the pretrained base model (built once, cached), the prompt set,
and simulated feedback from the current champion written into the landing folder."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from tasks.config import PipelineConfig
from tasks.demo.prompts import demo_pretraining_prompts, demo_prompts
from tasks.demo.settings import DemoSettings
from tasks.records import ModelRecord
from tasks.stages.data import data_dir, ingest_settings

EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


def demo_settings(cfg: PipelineConfig) -> DemoSettings:
    """The demo section with its cache folder resolved under the pipeline's home."""
    if cfg.demo is None:
        raise ValueError("this pipeline has no demo section")
    cache = cfg.demo.cache_dir or str(cfg.home / "cache" / "demo")
    return cfg.demo.model_copy(update={"cache_dir": cache})


def demo_base_model(cfg: PipelineConfig) -> ModelRecord:
    """Build (once) or load the demo's base model; its record's digest is the build digest."""
    from tasks.demo.base_model import build_base_model  # torch and transformers: imported when a stage runs

    info = build_base_model(demo_settings(cfg))
    return ModelRecord(stage="base", path=info.path, digest=info.digest, base=info.path,
                       summary={"heldout_perplexity": info.heldout_perplexity, "parameters": info.parameters,
                                "build_seconds": info.build_seconds, "cached": info.cached})


@task(name="demo-base-model", retries=1, retry_delay_seconds=10)
def demo_base_model_task(cfg: PipelineConfig) -> ModelRecord:
    """Prefect task: the demo base model (fetching the corpus is retried once on I/O errors)."""
    return demo_base_model(cfg)


def reward_start(cfg: PipelineConfig, base: ModelRecord) -> ModelRecord:
    """Where a reward stage starts: the demo's offline reward model (:func:`demo_offline_reward_model`,
    trained once and cached) when ``demo.offline`` is on, else ``base``. The pipeline's reward stage
    and benchmarks/frontier.py both start here, so the frontier's RL points are scored by the reward
    model the demo trains."""
    if cfg.demo is not None and cfg.demo.offline.enabled:
        return demo_offline_reward_model(cfg, base)
    return base


def demo_offline_reward_model(cfg: PipelineConfig, base: ModelRecord) -> ModelRecord:
    """The reward model trained on the demo's offline set alone (``demo.offline``: its epochs and lr,
    the rest of the recipe from ``reward``), trained once and cached under the demo cache by the
    digest of the base model, the set, the settings and the code the reward recipe runs
    (:func:`tasks.versioning.recipe_code_version`). Each
    round's reward stage starts from it (its ``init``). The record's summary holds the set's size and
    digest (``extra_train``), which the reward run and the registered reward version record."""
    from alignment.recipes.checkpoint import RESUME_IGNORED_FIELDS
    from tasks.demo.offline_feedback import build_offline_set
    from tasks.launcher import device_env, finished_summary, run_recipe
    from tasks.stages.train import recipe_settings
    from tasks.versioning import digest_of, recipe_code_version

    settings = demo_settings(cfg)
    offline = build_offline_set(settings, base.path, cfg.data, cfg.preferences)  # built once, cached by digest
    _, recipe = recipe_settings(cfg, "reward", {"pairs-train": offline.path}, base)
    recipe = recipe.model_copy(update={
        "epochs": settings.offline.epochs, "optim": recipe.optim.model_copy(update={"lr": settings.offline.lr}),
        "eval_path": None, "extra_train_paths": [], "calibrate": False, "max_steps": None})  # fmt: skip
    key = digest_of("offline-reward", base.digest, offline.digest, recipe_code_version("reward"),
                    recipe.model_dump(mode="json", exclude={"train_path", "model", *RESUME_IGNORED_FIELDS}))[:16]
    run_dir = Path(settings.cache_dir) / f"reward-offline-{key}"
    extra = {"paths": [offline.path], "pairs": offline.pairs, "digest": offline.digest, "mode": "warm_start"}
    summary = finished_summary(run_dir)
    done = summary is not None
    if not done:
        summary = run_recipe("reward", recipe, run_dir, timeout_s=cfg.pipeline.stage_timeout_s,
                             description="train the demo's offline reward model",
                             progress_every_s=cfg.pipeline.progress_log_s, extra_env=device_env(cfg.pipeline.device))
    return ModelRecord(stage="reward-offline", path=str(run_dir / "final"), digest=key, base=base.path,
                       summary={"cached": done, "steps": summary.get("steps"), "wall_s": summary.get("wall_time_s"),
                                "extra_train": extra, "offline_build_seconds": offline.build_seconds,
                                "offline_cached": offline.cached})


def _cached_frame(path: Path, build) -> pd.DataFrame:
    """The Parquet at ``path``, built by ``build()`` and written first when it is missing (to a
    temporary name, then renamed: a killed write leaves no half file under the final name)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        build().to_parquet(tmp, index=False)
        tmp.replace(path)
    return pd.read_parquet(path)


def prompt_table(cfg: PipelineConfig, base: ModelRecord) -> pd.DataFrame:
    """The demo's prompt table (all splits), cached as Parquet next to the pipeline's data."""
    return _cached_frame(data_dir(cfg) / "demo-prompts" / f"prompts-{base.digest}.parquet",
                         lambda: demo_prompts(demo_settings(cfg), base.path, cfg.preferences))


def pretraining_prompts(cfg: PipelineConfig, base: ModelRecord) -> list[str]:
    """Held-out prompts cut from the pretraining documents (``demo.pretraining_heldout_prompts``),
    cached as Parquet beside the prompt table; empty when the setting is off."""
    if cfg.demo is None or not cfg.demo.pretraining_heldout_prompts:
        return []
    frame = _cached_frame(data_dir(cfg) / "demo-prompts" / f"pretraining-heldout-{base.digest}.parquet",
                          lambda: demo_pretraining_prompts(demo_settings(cfg), base.path, prompt_table(cfg, base),
                                                           cfg.preferences))
    return frame["prompt"].tolist()


def heldout_prompts(cfg: PipelineConfig, base: ModelRecord, split: str = "test") -> list[str]:
    """Prompts of one split (the data layer's hash split, so test prompts are never trained on)."""
    frame = prompt_table(cfg, base)
    return frame.loc[frame["split"] == split, "prompt"].tolist()


def simulator_dir(cfg: PipelineConfig) -> Path:
    """Where the simulator keeps each batch's report, truth table and staged files."""
    return data_dir(cfg) / "simulator"


def finish_simulated_landing(cfg: PipelineConfig) -> list[str]:
    """Land the rest of a simulated batch a killed process left staged after its report, or drop
    one staged before it (tasks/demo/staging.py), saying so; returns the batch ids it landed. Call
    before looking at the landing folder."""
    from tasks.demo.staging import finish_landing

    landed = finish_landing(simulator_dir(cfg), ingest_settings(cfg).landing_dir)
    for batch in landed:
        print(f"{batch}: landed the rest of its files (the process that simulated it was stopped)")
    return landed


def landing_is_empty(cfg: PipelineConfig) -> bool:
    """True when the landing folder holds no file the ingest would read."""
    settings = ingest_settings(cfg)
    landing = Path(settings.landing_dir)
    return not any(p.is_file() for pattern in settings.landing_patterns for p in landing.glob(pattern))


def simulate_round(cfg: PipelineConfig, policy: ModelRecord, base: ModelRecord, round_index: int) -> dict[str, Any]:
    """Write one simulated feedback batch sampled from ``policy`` into the landing folder.

    The batch id names the round and the policy, so the same round is never written twice.
    """
    from tasks.demo.simulator import simulate_feedback  # torch and transformers: imported when a stage runs

    settings = demo_settings(cfg)
    frame = prompt_table(cfg, base)
    batch_id = f"round{round_index:03d}-{policy.digest[:10]}"
    report = simulate_feedback(policy.path, frame["prompt"].tolist(), settings.simulator,
                               ingest_settings(cfg).landing_dir, batch_id=batch_id,
                               report_dir=simulator_dir(cfg), seed=settings.simulator.seed + round_index,
                               start_time=EPOCH + timedelta(days=round_index))
    return simulation_figures(report.to_dict())


def simulation_figures(report: dict[str, Any]) -> dict[str, Any]:
    """A simulated batch's figures for the round's summary, from its report (``SimulationReport.to_dict``,
    also what the simulator saves as ``report-<batch>.json``)."""
    return {"batch": report["batch_id"], "files": len(report["files"]), "rows": sum(report["rows"].values()),
            "malformed share": round(report["malformed_share"], 4),
            "raw-click ceiling": round(report["best_accuracy"], 4),
            "policy sentiment": round(report["policy_sentiment"], 4), "rejected samples": report["rejected_samples"],
            "kept samples": report["kept_samples"], "paired samples": report["paired_samples"],
            "draws": report["draws"]}


@task(name="simulate-feedback")
def simulate_feedback_task(cfg: PipelineConfig, policy: ModelRecord, base: ModelRecord,
                           round_index: int = 0) -> dict[str, Any]:
    """Prefect task: one simulated feedback batch (demo only)."""
    return simulate_round(cfg, policy, base, round_index)
