"""Checks that run before the first stage (and before any Prefect server starts).

A mistake that can be seen in the config and on disk should stop a run at once with one line
naming the field, not surface mid-run as a traceback from the stage that trips on it.
:func:`preflight` checks: the sections a real pipeline needs (a policy model); that model paths
exist as folders or look like hub ids (and, offline, are cached); that a local folder's tokenizer
loads; that every stage's ``max_length`` and the evaluation's prompt + new tokens fit the model's
positions; that a configured landing folder and explicit sources exist (no ``landing_dir``:
``<home>/landing/<pipeline>``, created on first use). Its notes name the GPU fast paths the
recipes will switch off here and an evaluation set too small to ever pass the gate.
:func:`check_batch_fits` runs where the training split's size is first known (the training
stage, before its process starts).

Assumptions: no Prefect or MLflow import here (the CLI calls it before the embedded Prefect
home is set); transformers only to load a local tokenizer, torch only to look for CUDA. Hub ids are not looked
up online (a network call per run is not a check); a cached ``config.json`` is read when present.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

from alignment.config import ConfigError, ModelSettings
from tasks.config import PipelineConfig
from tasks.methods import method

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class PreflightError(ConfigError):
    """A config field that cannot work; the message starts with the field's dotted name."""


def _looks_like_path(ref: str) -> bool:
    """Written as a path (a hub id is ``name`` or ``org/name``, never absolute or relative to ``.``)."""
    return ref.startswith(("/", "./", "../", "~", "\\")) or ref.endswith("/") or ref.count("/") > 1


def _is_hub_id(ref: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _cached_config(ref: str, revision: str | None) -> dict | None:
    """A hub model's config.json from the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(ref, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed cache is not this check's business
        return None
    if isinstance(found, str) and Path(found).is_file():
        return json.loads(Path(found).read_text())
    return None


def model_config(field: str, settings: ModelSettings, *, load_tokenizer: bool = True) -> dict | None:
    """Check one model reference; return its ``config.json`` contents where readable (local
    folder or cached hub id), else None. Raises :class:`PreflightError` naming ``field``."""
    ref = settings.name_or_path
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PreflightError(f"{field}.name_or_path: {ref} is a file; give the model's folder "
                                 "(with config.json) or a hub id")
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return None  # a LoRA adapter folder: its base model is named inside it
        if not (path / "config.json").is_file():
            raise PreflightError(f"{field}.name_or_path: {ref} has no config.json; is it a Hugging Face model folder?")
        if load_tokenizer:
            _check_tokenizer(field, settings)
        return json.loads((path / "config.json").read_text())
    if _looks_like_path(ref) or not _is_hub_id(ref):
        raise PreflightError(f"{field}.name_or_path: {ref} does not exist (as a local folder) and is not a "
                             "hub id of the form org/name")
    cached = _cached_config(ref, settings.revision)
    if cached is None and _offline():
        raise PreflightError(f"{field}.name_or_path: {ref} is not a local folder and not in the Hugging Face "
                             "cache, and HF_HUB_OFFLINE is set")
    return cached


def _check_tokenizer(field: str, settings: ModelSettings) -> None:
    from alignment.models import load_tokenizer

    try:
        load_tokenizer(settings)
    except Exception as err:  # noqa: BLE001 - any loader error means the same thing to the user
        where = settings.tokenizer or settings.name_or_path
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        name = "tokenizer" if settings.tokenizer else "name_or_path"
        raise PreflightError(f"{field}.{name}: the tokenizer in {where} does not load ({first})") from None


def positions(config: dict | None) -> tuple[int, str] | None:
    """(positions, key) of a model config: the longest sequence it can take, where it says."""
    if not config:
        return None
    for source in (config, config.get("text_config") or {}):
        for key in _POSITION_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value, key
    return None


def _training_sections(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(section, backbone) of every training stage this config runs."""
    update = method(cfg.pipeline.method)
    out = []
    if cfg.sft.enabled:
        out.append(("sft", "policy"))
    if cfg.reward.enabled or update.needs_reward_model:
        out.append(("reward", "reward"))
    out.append((update.section, update.backbone))
    return out


def _check_sections(cfg: PipelineConfig) -> None:
    for section, _ in _training_sections(cfg):
        settings = getattr(cfg, section)
        if settings.share_responses and not settings.share_prompt:
            raise PreflightError(f"{section}.share_responses: runs a prompt's responses after one copy of it; "
                                 f"set {section}.share_prompt too")
    if cfg.demo is not None:
        return
    if cfg.model.policy is None:
        raise PreflightError("model.policy: not set; give a hub id or a local model folder "
                             "(model: {policy: {name_or_path: ...}}), or add a demo section")


def _check_sources(cfg: PipelineConfig) -> None:
    if cfg.data.landing_dir and cfg.demo is None and not Path(cfg.data.landing_dir).expanduser().is_dir():
        raise PreflightError(f"data.landing_dir: {cfg.data.landing_dir} is not a folder")
    for i, source in enumerate(cfg.data.sources):
        if source.format == "hub" or Path(source.path).expanduser().exists():
            continue
        if _looks_like_path(source.path) or not _is_hub_id(source.path):
            raise PreflightError(f"data.sources[{i}].path: {source.path} does not exist")


def _check_lengths(cfg: PipelineConfig, configs: dict[str, dict | None]) -> None:
    for section, backbone in _training_sections(cfg):
        found = positions(configs.get(backbone))
        settings = getattr(cfg, section)
        model = "model.reward" if backbone == "reward" and cfg.model.reward is not None else "model.policy"
        if found and settings.max_length > found[0]:
            raise PreflightError(
                f"{section}.max_length: {settings.max_length} tokens is more than the {found[0]} positions of "
                f"{model} ({found[1]} in its config.json); set {section}.max_length to at most {found[0]}")
    found = positions(configs.get("policy"))
    ev = cfg.evaluation
    needed = ev.max_prompt_length + ev.generation.max_new_tokens
    if found and needed > found[0]:
        raise PreflightError(
            f"evaluation.generation.max_new_tokens: {ev.generation.max_new_tokens} new tokens after prompts of up to "
            f"evaluation.max_prompt_length {ev.max_prompt_length} need {needed} positions; the policy has {found[0]}")
    if found and ev.max_length > found[0]:
        raise PreflightError(f"evaluation.max_length: {ev.max_length} tokens is more than the policy's "
                             f"{found[0]} positions")


def preflight(cfg: PipelineConfig, *, load_tokenizers: bool = True) -> list[str]:
    """Check ``cfg`` before a run. Returns notes worth a line each (nothing wrong, but the user
    should know); raises :class:`PreflightError` (message: ``field: what is wrong``) at the
    first field that cannot work."""
    _check_sections(cfg)
    _check_sources(cfg)
    _check_device(cfg)
    _check_quantization(cfg)
    configs: dict[str, dict | None] = {}
    if cfg.model.policy is not None:
        configs["policy"] = model_config("model.policy", cfg.model.policy, load_tokenizer=load_tokenizers)
    if cfg.model.reward is not None:
        configs["reward"] = model_config("model.reward", cfg.model.reward, load_tokenizer=load_tokenizers)
    else:
        configs["reward"] = configs.get("policy")
    _check_lengths(cfg, configs)
    from tasks.evaluation.gate import decidable_note

    notes = _fast_path_notes(cfg)
    note = decidable_note(cfg.evaluation, cfg.gate)
    return notes + ([note] if note else [])


def _check_device(cfg: PipelineConfig) -> None:
    """``pipeline.device: cuda`` on a host where torch sees no CUDA device cannot train."""
    if cfg.pipeline.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise PreflightError("pipeline.device: cuda, but torch sees no CUDA device on this machine "
                             "(a CPU build of torch, or no GPU); use auto or cpu")


def _check_quantization(cfg: PipelineConfig) -> None:
    """QLoRA (``lora.quantize_4bit``) loads the base through bitsandbytes: without it no stage could train."""
    import importlib.util

    for field in ("policy", "reward"):
        settings = getattr(cfg.model, field)
        if settings is not None and settings.lora is not None and settings.lora.quantize_4bit \
                and importlib.util.find_spec("bitsandbytes") is None:
            raise PreflightError(f"model.{field}.lora.quantize_4bit: QLoRA needs the bitsandbytes package, which is "
                                 "not installed here (pip install bitsandbytes)")


def _fast_path_notes(cfg: PipelineConfig) -> list[str]:
    """One line naming the GPU fast paths the recipes will switch off here (no CUDA device)."""
    fields = [f"{section}.{name}" for section, _ in _training_sections(cfg)
              for name in ("compile", "varlen_attention") if getattr(getattr(cfg, section), name, False)]
    if not fields:
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [f"{', '.join(fields)}: GPU fast paths, switched off on this machine (no CUDA device)"]


def run_preflight(cfg: PipelineConfig, stream: TextIO | None = None) -> int:
    """The CLI's entry: print each note as ``alignflow: note: ...``, or the error as one line
    ``alignflow: <field>: ...``. Returns the exit code (0 ok, 2 a field that cannot work)."""
    stream = stream or sys.stderr
    try:
        notes = preflight(cfg)
    except PreflightError as err:
        print(f"alignflow: {err}", file=stream)
        return 2
    for note in notes:
        print(f"alignflow: note: {note}", file=stream)
    return 0


def check_batch_fits(section: str, batch_size: int, processes: int, rows: int, path: str) -> None:
    """Raise :class:`PreflightError` naming ``<section>.batch_size`` when one global batch
    (``batch_size`` x ``processes``) needs more examples than the training split has."""
    if rows < batch_size * processes:
        per = f"{batch_size} x {processes} processes" if processes > 1 else f"{batch_size}"
        raise PreflightError(f"{section}.batch_size: {per} is more than the {rows} examples of the training "
                             f"split ({path}); lower {section}.batch_size or add feedback")


def check_chat_template(field: str, settings, path: str) -> None:
    """Raise :class:`PreflightError` naming ``<field>.chat_template`` when the training table at ``path``
    holds chat-conversation prompts (``is_chat``) and the model's tokenizer has no chat template to
    write them as text: a base model given HH-RLHF or chat-list feedback. Called by a training stage
    before it starts a process."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if settings.chat_template or "is_chat" not in table.schema_arrow.names:
        return
    flags = table.read(columns=["is_chat"]).column("is_chat")
    chats = int(pc.sum(pc.fill_null(flags, False)).as_py() or 0)
    if chats == 0:
        return
    from alignment.models import load_tokenizer

    if getattr(load_tokenizer(settings), "chat_template", None):
        return
    raise PreflightError(
        f"{field}.chat_template: {chats} of the {len(flags)} training prompts in {path} are chat conversations and "
        f"the tokenizer of {settings.tokenizer or settings.name_or_path} has no chat template to write them as text; "
        f"set {field}.chat_template to chatml (or to a Jinja template)")
