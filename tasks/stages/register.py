"""Register + promote: log the candidate policy and reward model to the MLflow registry, tag the
versions with their lineage and the gate decision, move ``challenger`` to the candidate and,
when the gate passes, ``champion`` too. A failed gate leaves ``champion`` untouched. Each
version's description is its model card (:mod:`tasks.serving.card`).

Idempotent and crash-safe: a candidate already registered (same ``alignflow.candidate_digest``
tag) is not registered again, so a re-run adds no version; every later write (gate tags,
``challenger``, promotions) is repeated as the gate decides, and ``alignflow.registration =
complete`` is written last. A re-run after a kill anywhere in between (a version without gate
tags, tags without aliases, the reward model promoted but not the policy) finishes the job;
only a version with that tag counts as done (:func:`tasks.stages.models.registered_candidate`).
The reward model is promoted before the policy, so a policy ``champion`` never points at a
round whose reward model was left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.data.extra_pairs import extra_pairs_tags
from tasks.evaluation.judge import trained_judge_tags
from tasks.faults import fault_point
from tasks.records import ModelRecord
from tasks.serving.card import policy_card, reward_card
from tasks.stages import slots
from tasks.versioning import code_version, git_commit

CANDIDATE_TAG = "alignflow.candidate_digest"
REGISTRATION_TAG = "alignflow.registration"
"""``complete`` once every write of :func:`register_and_promote` for the version is done."""
POLICY_VERSION_TAG = "alignflow.policy_version"
"""On a reward model version: the policy version registered with it (set before either is promoted)."""


class RegistryRecord(BaseModel):
    """What the registry looks like after this stage."""

    policy_model: str
    policy_version: str
    reward_model: str | None = None
    reward_version: str | None = None
    promoted: bool
    champion_version: str | None
    previous_champion: str | None
    reasons: list[str] = Field(default_factory=list)
    newly_registered: bool = True


def version_label(version: str | None, none: str = "none") -> str:
    """``v3`` for a version, ``none`` (or the given word) when there is none (never ``vNone``)."""
    return f"v{version}" if version else none


def _serving_folder(candidate: ModelRecord) -> Path:
    """Full weights for local bases; the adapter alone when its base is a hub id (recorded in it)."""
    if candidate.adapter_path and candidate.base and not Path(candidate.base).exists():
        return Path(candidate.adapter_path)
    return Path(candidate.path)


def lineage_tags(cfg: PipelineConfig, candidate: ModelRecord, dataset_digest: str,
                 parent_version: str | None) -> dict[str, str]:
    """The version tags DESIGN.md requires: data, config and code versions, parent, base."""
    tags = {
        CANDIDATE_TAG: candidate.digest,
        "alignflow.data_digest": dataset_digest,
        "alignflow.config_digest": cfg.digest(),
        "alignflow.code_version": code_version(),
        "alignflow.parent_version": parent_version or "base",
        "alignflow.method": cfg.pipeline.method,
        "alignflow.base_model": str(candidate.base or ""),
    }
    commit = git_commit()
    if commit:
        tags["alignflow.git_commit"] = commit
    return tags


def register_and_promote(cfg: PipelineConfig, candidate: ModelRecord, reward: ModelRecord | None,
                         dataset_digest: str, decision: dict[str, Any], parent_run_id: str,
                         evaluated_against: str | None = None) -> RegistryRecord:
    """Register (once), tag, alias. ``decision`` is a GateDecision dump: passed, reasons, checks.

    ``evaluated_against`` is the champion version the candidate was compared with (None: the
    base model). Callers hold the ``registry`` concurrency slot, so the champion cannot move
    between this check and the promotion; if it moved since the evaluation, the evidence is
    stale and the candidate is not promoted.
    """
    name = cfg.pipeline.name
    policy_name, reward_name = tracking.policy_model_name(name), tracking.reward_model_name(name)
    previous = tracking.alias_version(policy_name, tracking.CHAMPION)
    passed = bool(decision.get("passed"))
    reasons = [str(r) for r in decision.get("reasons", [])]
    if passed and previous != evaluated_against:
        passed = False
        reasons.insert(0, f"Not promoted: the champion changed from {version_label(evaluated_against, 'the base model')} "
                          f"to {version_label(previous)} while this candidate was evaluated; its evidence is stale.")
    version = tracking.find_version(policy_name, CANDIDATE_TAG, candidate.digest)
    newly = version is None
    reward_version = None
    with tracking.child_run(parent_run_id, "register") as run_id:
        if version is None:
            version = tracking.log_policy(run_id, _serving_folder(candidate), name,
                                          lineage_tags(cfg, candidate, dataset_digest, previous))
            fault_point("register:version")
        if reward is not None:
            reward_version = tracking.find_version(reward_name, CANDIDATE_TAG, reward.digest)
            if reward_version is None:
                reward_version = tracking.log_reward_model(
                    run_id, Path(reward.path), name, lineage_tags(cfg, reward, dataset_digest, None))
        if reward_version:  # the judge's record: validation (reward run) and test (this evaluation) accuracy
            tracking.set_version_tags(reward_name, reward_version,
                                      {**trained_judge_tags(reward.summary), **decision.get("judge_tags", {}),
                                       **extra_pairs_tags(reward.summary), POLICY_VERSION_TAG: version})
        gate_tags = {"alignflow.gate": "passed" if passed else "failed",
                     "alignflow.gate_reasons": " | ".join(reasons)[:5000]}
        tracking.set_version_tags(policy_name, version, {**gate_tags, **decision.get("eval_tags", {})})
        tracking.set_version_description(policy_name, version, policy_card(cfg, candidate, version, dataset_digest,
                                                                           decision, passed, reasons))
        if reward_version:
            tracking.set_version_description(reward_name, reward_version,
                                             reward_card(cfg, reward, reward_version, dataset_digest, version))
        fault_point("register:tags")
        if decision.get("report_path") and Path(decision["report_path"]).exists():
            tracking.log_artifact(run_id, decision["report_path"], "evaluation")
        tracking.set_alias(policy_name, tracking.CHALLENGER, version)
        if reward_version:
            tracking.set_alias(reward_name, tracking.CHALLENGER, reward_version)
        if passed and previous != version:
            if reward_version:
                tracking.promote(reward_name, reward_version, reason=f"with {policy_name} v{version}")
            fault_point("register:promote")
            tracking.promote(policy_name, version, reason="; ".join(reasons))
        tracking.log_metrics(run_id, {"promoted": float(passed), "policy_version": float(version)})
        tracking.set_version_tags(policy_name, version, {REGISTRATION_TAG: "complete"})
    champion = tracking.alias_version(policy_name, tracking.CHAMPION)
    return RegistryRecord(policy_model=policy_name, policy_version=version, reward_model=reward_name if reward else None,
                          reward_version=reward_version, promoted=passed and champion == version,
                          champion_version=champion, previous_champion=previous, reasons=reasons,
                          newly_registered=newly)


def _cell(value: Any) -> str:
    """A gate figure for people: floats to 4 significant digits, none as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def verdict_line(record: RegistryRecord) -> str:
    """``demo-policy v3 PROMOTED to champion`` or ``... NOT promoted (champion stays v2)``."""
    if record.promoted:
        verdict = "PROMOTED to champion"
    else:
        verdict = f"NOT promoted (champion stays {version_label(record.champion_version, 'unset: no champion yet')})"
    return f"{record.policy_model} v{record.policy_version} {verdict}"


def decision_markdown(record: RegistryRecord, decision: dict[str, Any]) -> str:
    """The gate decision as a Markdown artifact: verdict, reasons, then one row per rule (figures
    rounded); the champion before and after, never ``vNone``."""
    lines = [f"# Gate decision: {verdict_line(record)}", ""]
    lines += [f"- {r}" for r in record.reasons] + ["", "| rule | value | threshold | passed |", "|---|---|---|---|"]
    for check in decision.get("checks", []):
        lines.append(f"| {check.get('rule')} | {_cell(check.get('value'))} | {_cell(check.get('threshold'))} | "
                     f"{'yes' if check.get('passed') else 'no'} |")
    lines += ["", f"champion: {version_label(record.champion_version)} (before: {version_label(record.previous_champion)})"]
    return "\n".join(lines)


def log_verdict(record: RegistryRecord, logger: Any) -> None:
    """The gate's verdict and each reason as lines of the run's log (the Prefect UI's Logs tab)."""
    logger.info("Gate: %s", verdict_line(record))
    for reason in record.reasons:
        logger.info("Gate reason: %s", reason)


@task(name="register-and-promote", retries=2, retry_delay_seconds=5)
def register_task(cfg: PipelineConfig, candidate: ModelRecord, reward: ModelRecord | None, dataset_digest: str,
                  decision: dict[str, Any], parent_run_id: str, evaluated_against: str | None = None) -> RegistryRecord:
    """Prefect task: register, alias, and leave the decision as a Prefect artifact.

    Holds the global concurrency limit ``registry`` where it exists (a bootstrapped server:
    tasks/stages/slots.py) so champion moves are serialised across workers; embedded, the home
    lock already makes this run the home's only writer."""
    with slots.held(slots.REGISTRY):
        record = register_and_promote(cfg, candidate, reward, dataset_digest, decision, parent_run_id,
                                      evaluated_against)
    log_verdict(record, get_run_logger())
    create_markdown_artifact(decision_markdown(record, decision), key=f"{cfg.pipeline.name}-gate-decision".replace("_", "-"),
                             description="Promotion gate decision")
    return record
