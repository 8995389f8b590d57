"""Where a round's models come from: the configured base model, and the registry's champion
(downloaded once per version into ``<home>/registry-cache``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.records import ModelRecord
from tasks.stages.register import CANDIDATE_TAG, POLICY_VERSION_TAG, REGISTRATION_TAG, RegistryRecord


def model_digest(cfg: PipelineConfig, ref: str | Path, revision: str | None = None) -> str:
    """A model's identity in stage keys: a local folder's config and weight bytes
    (:func:`alignment.models.folder_digest`, remembered under ``<home>/cache`` while the files are
    unchanged), or a hub id by id and revision."""
    if Path(ref).is_dir():
        # alignment.models imports torch: only where a folder is digested (process start-up)
        from alignment.models import folder_digest

        return folder_digest(ref, memo_dir=cfg.home / "cache")[:16]
    return hashlib.sha256(f"{ref}@{revision}".encode()).hexdigest()[:16]


def base_model_record(cfg: PipelineConfig) -> ModelRecord:
    """The configured policy as a record (a local folder is digested by content, a hub id by id+revision).

    Raises ValueError when no policy is configured and there is no demo section to build one.
    """
    if cfg.model.policy is None:
        raise ValueError("model.policy is not set: give a hub id or a local folder (or add a demo section)")
    ref = cfg.model.policy.name_or_path
    digest = model_digest(cfg, ref, cfg.model.policy.revision)
    return ModelRecord(stage="base", path=ref, digest=digest, base=ref)


def champion_record(cfg: PipelineConfig) -> ModelRecord | None:
    """The current champion policy, downloaded to a per-version cache folder; None if there is none."""
    name = tracking.policy_model_name(cfg.pipeline.name)
    version = tracking.alias_version(name, tracking.CHAMPION)
    return None if version is None else _registered(cfg, name, version, "champion")


def champion_reward_record(cfg: PipelineConfig, policy_version: str) -> ModelRecord | None:
    """The reward model registered with policy version ``policy_version`` (the champion a round
    evaluates against; its reward version is tagged ``POLICY_VERSION_TAG``), downloaded like the
    champion; None when it came without one. Found through the policy, not the reward model's own
    ``champion`` alias, which moves first at promotion: a crash between the two leaves it on the new
    round's model."""
    name = tracking.reward_model_name(cfg.pipeline.name)
    version = tracking.find_version(name, POLICY_VERSION_TAG, policy_version)
    return None if version is None else _registered(cfg, name, version, "champion-reward")


def _registered(cfg: PipelineConfig, name: str, version: str, stage: str) -> ModelRecord:
    """A registered model version as a record, its folder downloaded once under ``<home>/registry-cache``."""
    tags = tracking.version_tags(name, version)
    dest = cfg.home / "registry-cache" / name / version
    marker = dest / ".complete"
    if marker.exists():
        folder = Path(marker.read_text().strip())
    else:
        folder = tracking.download_model(name, version, dest)
        marker.write_text(str(folder))
    digest = tags.get(CANDIDATE_TAG) or model_digest(cfg, folder)
    return ModelRecord(stage=stage, path=str(folder), digest=digest, base=tags.get("alignflow.base_model"),
                       registry_version=version)


def registered_candidate(cfg: PipelineConfig, candidate: ModelRecord) -> RegistryRecord | None:
    """The registry state when this exact candidate was already registered, gated and aliased
    (a re-run), else None: a version whose registration a crash cut short is finished by the
    register stage, not taken as done."""
    name = tracking.policy_model_name(cfg.pipeline.name)
    version = tracking.find_version(name, CANDIDATE_TAG, candidate.digest)
    if version is None:
        return None
    tags = tracking.version_tags(name, version)
    if tags.get(REGISTRATION_TAG) != "complete":
        return None
    champion = tracking.alias_version(name, tracking.CHAMPION)
    reasons = [r for r in tags.get("alignflow.gate_reasons", "").split(" | ") if r]
    return RegistryRecord(policy_model=name, policy_version=version, promoted=champion == version,
                          champion_version=champion, previous_champion=tags.get("alignflow.parent_version"),
                          reasons=reasons, newly_registered=False)


def champion_trained_on(cfg: PipelineConfig, dataset_digest: str) -> RegistryRecord | None:
    """The champion's registry state when it was trained on ``dataset_digest`` with this config, else None.

    Why: with ``init_from: champion`` a re-run would otherwise start from the new champion and
    train again on data it has already learnt from.
    """
    name = tracking.policy_model_name(cfg.pipeline.name)
    version = tracking.alias_version(name, tracking.CHAMPION)
    if version is None:
        return None
    tags = tracking.version_tags(name, version)
    if tags.get("alignflow.data_digest") != dataset_digest or tags.get("alignflow.config_digest") != cfg.digest():
        return None
    reasons = [r for r in tags.get("alignflow.gate_reasons", "").split(" | ") if r]
    return RegistryRecord(policy_model=name, policy_version=version, promoted=True, champion_version=version,
                          previous_champion=tags.get("alignflow.parent_version"), reasons=reasons,
                          newly_registered=False)
