"""Model cards: the Markdown description of each registered model version.

A card says what a version is without opening its run: the model it was trained from, the data
(digest and size), the method and its key settings, the evaluation headline and the gate's
verdict. :mod:`tasks.stages.register` writes it with
:func:`tasks.tracking.registry.set_version_description`; the MLflow UI shows it on the version page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY_SETTINGS = ("loss_type", "beta", "desirable_weight", "undesirable_weight", "label_smoothing", "epochs",
                "max_steps", "batch_size", "grad_accum", "max_length", "precision")
"""Fields of a recipe config worth a line on the card (when the config has them)."""


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def key_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The card's settings from a recipe config dump: :data:`KEY_SETTINGS`, the learning rate and LoRA rank."""
    out = {k: settings[k] for k in KEY_SETTINGS if settings.get(k) is not None}
    optim = settings.get("optim") or {}
    if optim.get("lr") is not None:
        out["lr"] = optim["lr"]
    lora = (settings.get("model") or {}).get("lora")
    if lora:
        out["lora_r"] = lora.get("r")
    return out


def data_size(summary: Mapping[str, Any]) -> str:
    """Examples a training run kept per split, from its summary (``data``: split -> counts)."""
    data = summary.get("data") or {}
    parts = [f"{kept} {split}" for split, stats in sorted(data.items())
             if isinstance(stats, Mapping) and (kept := stats.get("examples")) is not None]
    return ", ".join(parts) + " examples" if parts else "size not recorded"


def model_card(*, title: str, base_model: str, data_digest: str, data: str, method: str,
               settings: Mapping[str, Any], evaluation: Mapping[str, Any], gate: str,
               reasons: list[str] | None = None, steps: int | None = None) -> str:
    """The Markdown card. ``evaluation`` holds headline figures (name -> value), ``gate`` the
    verdict in a word (``passed``, ``failed``, ...) and ``reasons`` its sentences, verdict first."""
    lines = [f"**{title}**", "",
             f"- Base model: `{base_model or 'unknown'}`",
             f"- Data: digest `{data_digest}`, {data}",
             f"- Method: {method}" + (f", {steps} steps" if steps else ""),
             "- Settings: " + (", ".join(f"{k}={_number(v)}" for k, v in settings.items()) or "defaults")]
    if evaluation:
        lines.append("- Evaluation: " + ", ".join(f"{k}={_number(v)}" for k, v in evaluation.items()))
    lines.append(f"- Gate: {gate}" + (f" — {reasons[0]}" if reasons else ""))
    lines += [f"  - {r}" for r in (reasons or [])[1:]]
    return "\n".join(lines)


def _evaluation(decision: Mapping[str, Any]) -> dict[str, Any]:
    prefix = "alignflow.eval."
    return {k[len(prefix):]: v for k, v in (decision.get("eval_tags") or {}).items() if k.startswith(prefix)}


def policy_card(cfg, candidate, version: str, dataset_digest: str, decision: Mapping[str, Any], passed: bool,
                reasons: list[str]) -> str:
    """The card of a policy version: ``cfg`` a PipelineConfig, ``candidate`` the trained ModelRecord,
    ``decision`` the gate decision dump (its ``eval_tags`` give the evaluation headline)."""
    from tasks.methods import method

    row = method(cfg.pipeline.method)
    raw = getattr(cfg, row.section).model_dump(mode="json")
    if cfg.model.policy is not None and cfg.model.policy.lora is not None:
        raw["model"] = {"lora": cfg.model.policy.lora.model_dump()}
    if row.loss_type is not None:
        raw["loss_type"] = row.loss_type
    summary = candidate.summary or {}
    return model_card(title=f"{cfg.pipeline.name}-policy v{version}", base_model=str(candidate.base or ""),
                      data_digest=dataset_digest, data=data_size(summary), method=cfg.pipeline.method,
                      settings=key_settings(raw), evaluation=_evaluation(decision),
                      gate="passed" if passed else "failed", reasons=reasons, steps=summary.get("steps"))


def reward_card(cfg, reward, version: str, dataset_digest: str, policy_version: str) -> str:
    """The card of a reward-model version registered with policy ``policy_version``."""
    summary = reward.summary or {}
    metrics = summary.get("metrics") or {}
    evaluation = {k.removeprefix("eval/"): v for k, v in metrics.items() if k in ("eval/accuracy", "eval/margin")}
    return model_card(title=f"{cfg.pipeline.name}-reward v{version}", base_model=str(reward.base or ""),
                      data_digest=dataset_digest, data=data_size(summary), method="reward model (Bradley-Terry)",
                      settings=key_settings(cfg.reward.model_dump(mode="json")), evaluation=evaluation,
                      gate=f"registered with {cfg.pipeline.name}-policy v{policy_version}; promoted together with it",
                      steps=summary.get("steps"))
