"""The pipeline's one YAML config: typed sections, validated on load, ``--set a.b=c`` overrides.

Sections: ``pipeline`` (name, home, method), ``data`` (ingest + validation), ``preferences``
(dataset building), ``model`` (policy and reward backbones), one section per training stage
(``sft``, ``reward``, ``dpo``, ``kto``, ``ppo``, ``grpo``, each a recipe config from
:mod:`alignment.config` plus ``enabled``), ``evaluation``, ``gate``, ``monitor``, ``schedule``
and ``demo``. Errors name the field: ``dpo.beta: Input should be greater than 0 (got -1)``.
The resolved config is logged to MLflow and its digest tagged on every run and model version.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from alignment.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ModelSettings,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    StrictModel,
    apply_overrides,
    config_digest,
    validate_config,
)
from tasks.data.settings import IngestSettings, PreferenceSettings
from tasks.demo.settings import DemoSettings
from tasks.evaluation.settings import EvalSettings, GateSettings, MonitorSettings
from tasks.methods import METHOD_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


class PipelineSettings(StrictModel):
    """Identity, home folder and the training method of a pipeline."""

    name: str = "demo"
    """Pipeline name: MLflow experiment, registered models ``<name>-policy`` and ``<name>-reward``."""
    home: str | None = None
    """Folder for the embedded stores and data (MLflow SQLite, Prefect DB, landing, runs).
    Default: $ALIGNFLOW_HOME, else ./.alignflow."""
    seed: int = 0
    """Seed for every stage (recorded on every run), except a stage whose section sets its own
    ``seed`` (``--set ppo.seed=1``: that stage alone on another seed)."""
    method: Literal[METHOD_NAMES] = "dpo"  # type: ignore[valid-type]  # the names of tasks/methods.py
    """Fine-tuning method (a row of :mod:`tasks.methods`): dpo/ipo/simpo use the ``dpo`` section
    (loss type set by the method), kto, ppo and grpo their own sections (ppo and grpo use the reward model)."""
    init_from: Literal["base", "champion"] = "base"
    """Start each round's policy from the base model, or from the current champion (iterative,
    on-policy rounds; the champion is then also the DPO reference)."""
    dpo_reference: Literal["init", "base"] = "init"
    """What DPO measures its implicit reward against: ``init``, the model the round starts from
    (the usual DPO reference; with ``init_from: champion`` each round may drift another
    β-budget from the champion), or ``base``, the base model, so iterative rounds stay anchored
    where the gate measures KL (its ``max_kl`` budget is against the base model)."""
    processes: int = Field(1, gt=0)
    """Training processes; more than 1 launches training with ``accelerate launch``."""
    accelerate_config: str | None = None
    """An accelerate config file (e.g. infra/accelerate/fsdp.yaml) for multi-process training.
    Settable only in the config file, never by a deployment run's ``overrides`` (:mod:`tasks.trusted`)."""
    allowed_models: list[str] = []
    """Model ids or folders (``fnmatch`` patterns, e.g. ``Qwen/*``) that a deployment run's
    ``overrides`` may point a model path at; other model paths come only from this file."""
    stage_timeout_s: int = Field(6 * 3600, gt=0)
    """Wall-clock limit of one training process; past it the process group is killed."""
    stall_warning_s: int | None = Field(600, gt=0)
    """Log a warning naming the stage each time a training process goes this long without a
    step (no new line in its metrics.jsonl), so a slow or stuck stage never sits silently;
    it keeps running (``stage_timeout_s`` stops it). None: no warning."""
    progress_log_s: int | None = Field(60, gt=0)
    """How often (at most, in seconds) a training stage logs its progress (step, loss, key
    metrics, ETA) to the Prefect run's logs and moves its progress artifact; evaluations are
    logged as they come. None: no progress lines (metrics still stream to MLflow)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where training and evaluation run (auto: CUDA when available)."""
    lock_wait_s: float = Field(0.0, ge=0)
    """How long a run waits for another run on the same home to finish (one writer per home,
    :mod:`tasks.lock`) before it exits saying which process holds the home. 0: exit at once
    (a scheduled run that finds the previous one still running skips its turn)."""

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", v):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (it names models and experiments)")
        return v


class ModelSection(StrictModel):
    """The models the pipeline starts from."""

    policy: ModelSettings | None = None
    """Base policy (hub id or local path). None with a ``demo`` section: the demo's pretrained model."""
    reward: ModelSettings | None = None
    """Reward-model backbone; None: the policy's backbone (LoRA settings are not carried over)."""


class SFTStage(SFTConfig):
    """Optional supervised fine-tuning before the reward model and the policy update."""

    enabled: bool = False
    """Run the SFT stage; its output becomes the policy (and reference) for the next stages."""


class RewardStage(RewardConfig):
    """Reward-model training (used by PPO/GRPO and by evaluation)."""

    enabled: bool = True
    """Train a reward model this round (required for ppo/grpo and for reward-based evaluation)."""


class ScheduleSettings(StrictModel):
    """When the scheduled deployments run (``alignflow serve``)."""

    cron: str = "0 3 * * *"
    """Cron expression of the retraining deployment."""
    timezone: str = "UTC"
    """Time zone of the cron expression."""
    monitor_cron: str | None = "0 * * * *"
    """Cron of the monitoring deployment (None: not scheduled)."""


class PipelineConfig(StrictModel):
    """A whole pipeline. Every section has defaults, so an empty file is the embedded demo's shape."""

    pipeline: PipelineSettings = PipelineSettings()
    """Name, home, method."""
    data: IngestSettings = IngestSettings()
    """Landing folder, sources and validation."""
    preferences: PreferenceSettings = PreferenceSettings()
    """Preference-dataset building."""
    model: ModelSection = ModelSection()
    """Starting models."""
    sft: SFTStage = SFTStage()
    """Optional SFT stage."""
    reward: RewardStage = RewardStage()
    """Reward model."""
    dpo: DPOConfig = DPOConfig()
    """DPO family (method dpo, ipo, simpo)."""
    kto: KTOConfig = KTOConfig()
    """KTO on unpaired desirable/undesirable responses (method kto; trains on ``unpaired-train``)."""
    ppo: PPOConfig = PPOConfig()
    """PPO (method ppo)."""
    grpo: GRPOConfig = GRPOConfig()
    """GRPO / RLOO (method grpo)."""
    evaluation: EvalSettings = EvalSettings()
    """Evaluation suite."""
    gate: GateSettings = GateSettings()
    """Promotion rules."""
    monitor: MonitorSettings = MonitorSettings()
    """Drift thresholds."""
    schedule: ScheduleSettings = ScheduleSettings()
    """Deployment schedules."""
    demo: DemoSettings | None = None
    """The embedded demo (corpus, base model, simulated annotators); None for real pipelines."""

    @model_validator(mode="after")
    def _one_reward_starting_point(self) -> PipelineConfig:
        # demo.offline starts the reward stage from the offline reward model: model.reward would be ignored
        if self.demo is not None and self.demo.offline.enabled and self.model.reward is not None:
            raise ValueError("demo.offline.enabled starts the reward model from one trained on the offline set; "
                             "model.reward names another starting point: unset one of them")
        return self

    # --- derived values -------------------------------------------------------------------
    @property
    def home(self) -> Path:
        """The resolved home folder (absolute)."""
        raw = self.pipeline.home or os.environ.get("ALIGNFLOW_HOME") or ".alignflow"
        return Path(raw).expanduser().resolve()

    def digest(self) -> str:
        """Digest of the settings that change results (not where things are stored)."""
        data = self.model_dump(mode="json")
        data["pipeline"].pop("home", None)
        data.pop("schedule", None)
        return config_digest(data)


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (None: the embedded demo, configs/demo.yaml), apply overrides, validate.

    Raises ConfigError naming each bad field, or FileNotFoundError for a missing file.
    """
    source = Path(path) if path else DEMO_CONFIG
    if not source.exists():
        raise FileNotFoundError(f"config file not found: {source}")
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    return validate_config(PipelineConfig, data)  # type: ignore[return-value]


def to_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (what is logged to MLflow)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
