"""Training stages as Prefect tasks: SFT, reward model, and the policy update (DPO family, PPO,
GRPO). Each builds its recipe config from the pipeline config and upstream records, runs the
recipe in its own process (:func:`tasks.launcher.run_recipe`), streams metrics into a child
MLflow run, and returns a :class:`~tasks.records.ModelRecord`.

Caching: the key (:func:`train_key`) hashes the dataset digest, the starting model's digest,
the recipe settings and the code version of the ``alignment/`` modules the recipe imports. The
run folder is named by the same key, so a crashed run resumes from its last checkpoint, and a
finished one is taken as it is (after a change to code the recipe does not run, too: the Prefect
task's own cache key follows all of ``alignment/``, the run folder does not).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from alignment.config import RECIPE_CONFIGS, ModelSettings, TrainSettings
from tasks import tracking
from tasks.config import PipelineConfig
from tasks.data.extra_pairs import ExtraPairs, check_extra_pairs, extra_pairs_digest
from tasks.launcher import device_env, resolve_device, run_recipe
from tasks.methods import method
from tasks.preflight import check_batch_fits, check_chat_template
from tasks.records import ModelRecord
from tasks.stages import slots
from tasks.stages.cached import cached_stage
from tasks.versioning import code_version, digest_of, recipe_code_version


def _model_settings(template: ModelSettings | None, path: str, *, keep_lora: bool) -> ModelSettings:
    """The pipeline's model settings pointed at ``path`` (an upstream stage's output folder)."""
    base = template or ModelSettings(name_or_path=path)
    update: dict[str, Any] = {"name_or_path": path}
    if not keep_lora:
        update["lora"] = None
    if Path(path).exists():
        update["revision"] = None
    return base.model_copy(update=update)


def _has_rows(path: str | None) -> bool:
    """True when a Parquet file exists and holds rows (small builds can leave a split empty)."""
    if not path or not Path(path).exists():
        return False
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows > 0


def distinct_reference(init: ModelRecord, reference: ModelRecord | None) -> ModelRecord | None:
    """``reference`` when it is another model than ``init``, else None (the usual DPO reference)."""
    return reference if reference is not None and reference.path != init.path else None


def recipe_settings(cfg: PipelineConfig, stage: str, data: dict[str, str], init: ModelRecord,
                    reward: ModelRecord | None = None,
                    reference: ModelRecord | None = None) -> tuple[str, TrainSettings]:
    """The recipe name and its full settings for ``stage`` (sft, reward, or a method name).

    ``reference`` (DPO family only) is the model the implicit reward is measured against when it
    is not ``init`` (``pipeline.dpo_reference: base``); None: the starting policy.

    ``data`` maps file roles (``pairs-train``, ``pairs-validation``, ``prompts-train``,
    ``prompts-validation``, ``demonstrations-train``, ``demonstrations-validation``) to paths.
    Raises ValueError when a role the stage needs is missing.
    """
    row = method(stage)
    section = getattr(cfg, row.section)
    raw = section.model_dump()
    raw.pop("enabled", None)
    train_path, eval_path = row.files(data)
    raw["train_path"] = train_path
    raw["eval_path"] = eval_path if _has_rows(eval_path) else None
    if "seed" not in section.model_fields_set:  # a seed the section sets itself is kept
        raw["seed"] = cfg.pipeline.seed
    if "keep_checkpoints_after_finish" not in section.model_fields_set:
        raw["keep_checkpoints_after_finish"] = False  # a finished stage needs none; rounds would pile them up
    if row.backbone == "reward":
        template = cfg.model.reward or cfg.model.policy
        raw["model"] = _model_settings(template, cfg.model.reward.name_or_path if cfg.model.reward else init.path,
                                       keep_lora=cfg.model.reward is not None and cfg.model.reward.lora is not None)
    else:
        raw["model"] = _model_settings(cfg.model.policy, init.path, keep_lora=True)
    if row.loss_type is not None:
        raw["loss_type"] = row.loss_type
    if row.implicit_reward:
        raw["ref_cache_dir"] = raw.get("ref_cache_dir") or str(cfg.home / "cache" / "reference-logps")
        reference = distinct_reference(init, reference)
        if reference is not None:
            raw["reference_model"] = _model_settings(cfg.model.policy, reference.path, keep_lora=False)
    if row.needs_reward_model:
        if reward is None and not raw.get("reward_fn"):
            raise ValueError(f"method {stage} needs a reward model (enable the reward stage) or "
                             f"{row.section}.reward_fn")
        if reward is not None and not raw.get("reward_fn"):
            raw["reward_model"] = reward.path
    for field in ("model", "reference_model"):
        if isinstance(raw.get(field), ModelSettings):
            raw[field] = raw[field].model_dump()
    return row.recipe, RECIPE_CONFIGS[row.recipe].model_validate(raw)


def extra_pairs(cfg: PipelineConfig, settings: TrainSettings) -> ExtraPairs | None:
    """The checked extra training pairs of a reward recipe's settings (None: none); raises
    :class:`~tasks.data.extra_pairs.ExtraPairsError` naming the file, row and field of a bad one."""
    return check_extra_pairs(list(getattr(settings, "extra_train_paths", None) or []), cfg.preferences)


def run_dir_for(cfg: PipelineConfig, stage: str, key: str) -> Path:
    """Deterministic run folder for a stage's cache key (resume finds its checkpoints here)."""
    return cfg.home / "runs" / cfg.pipeline.name / f"{stage}-{key}"


def _final_paths(run_dir: Path) -> tuple[str, str | None]:
    """(serving folder, adapter folder or None) of a finished recipe run."""
    final = run_dir / "final"
    merged = final / "merged"
    if (final / "adapter_config.json").exists():
        return str(merged if merged.exists() else final), str(final)
    return str(final), None


def train_key(cfg: PipelineConfig, stage: str, data: dict[str, str], dataset_digest: str, init: ModelRecord,
              reward: ModelRecord | None = None, reference: ModelRecord | None = None, **_: Any) -> str:
    """A training stage's key: its run folder's name and its Prefect cache key.

    Hashes the stage, the dataset and upstream models' digests, the recipe settings but the
    paths that follow from them and the fields that do not change the math (those a resumed run
    may change, ``RESUME_IGNORED_FIELDS``), and the code version of the part of ``alignment/`` the
    recipe runs (:func:`tasks.versioning.recipe_code_version`)."""
    # torch and accelerate: loaded when a key is made, not when this module is imported
    from alignment.recipes.checkpoint import RESUME_IGNORED_FIELDS

    recipe, settings = recipe_settings(cfg, stage, data, init, reward, reference)
    reference = distinct_reference(init, reference)
    extra = getattr(settings, "extra_train_paths", None)
    return digest_of(stage, dataset_digest, init.digest, reward.digest if reward else None,
                     *([reference.digest] if reference else []),  # absent: keys of runs without one stay valid
                     *([extra_pairs_digest(extra)] if extra else []),  # the extra pairs by content, not by path
                     settings.model_dump(mode="json", exclude={"output_dir", "train_path", "eval_path", "model",
                                                                "extra_train_paths", *RESUME_IGNORED_FIELDS}),
                     settings.model.model_dump(mode="json", exclude={"name_or_path"}) if settings.model else None,
                     recipe_code_version(recipe))


def train_stage(cfg: PipelineConfig, stage: str, data: dict[str, str], dataset_digest: str, init: ModelRecord,
                parent_run_id: str | None, reward: ModelRecord | None = None,
                reference: ModelRecord | None = None) -> ModelRecord:
    """Run one training stage end to end (also used without Prefect, e.g. from tests)."""
    recipe, settings = recipe_settings(cfg, stage, data, init, reward, reference)
    if method(stage).data != "prompts" and settings.train_path and Path(settings.train_path).is_file():
        import pyarrow.parquet as pq

        check_batch_fits(method(stage).section, settings.batch_size, cfg.pipeline.processes,
                         pq.ParquetFile(settings.train_path).metadata.num_rows, settings.train_path)
    if settings.train_path and Path(settings.train_path).is_file() and settings.model is not None:
        field = "model.reward" if stage == "reward" and cfg.model.reward is not None else "model.policy"
        check_chat_template(field, settings.model, settings.train_path)
    extra = extra_pairs(cfg, settings)  # a bad extra file fails here, before the recipe starts
    # a reward model started from one trained on other pairs (the demo's offline reward model)
    warm = (init.summary or {}).get("extra_train") if recipe == "reward" else None
    key = train_key(cfg, stage, data, dataset_digest, init, reward, reference)
    run_dir = run_dir_for(cfg, stage, key)
    tags = {"alignflow.dataset_digest": dataset_digest, "alignflow.init_digest": init.digest,
            "alignflow.code_version": code_version(), "alignflow.config_digest": cfg.digest()}
    with tracking.stage_run(parent_run_id, stage, tags) as run_id:
        if run_id:
            tracking.log_params(run_id, tracking.flatten(settings.model_dump(mode="json")))
            _log_inputs(run_id, cfg, settings, dataset_digest)
            if extra is not None:
                tracking.log_params(run_id, {"extra_train.pairs": extra.pairs, "extra_train.digest": extra.digest})
            if warm is not None:
                tracking.log_params(run_id, {"warm_start.pairs": warm["pairs"], "warm_start.digest": warm["digest"],
                                             "warm_start.model": init.path})
        summary = run_recipe(recipe, settings, run_dir, mlflow_run_id=run_id,
                             processes=cfg.pipeline.processes, accelerate_config=cfg.pipeline.accelerate_config,
                             timeout_s=cfg.pipeline.stage_timeout_s,
                             stall_warning_s=cfg.pipeline.stall_warning_s, description=f"train {stage}",
                             progress_every_s=cfg.pipeline.progress_log_s,
                             extra_env=device_env(cfg.pipeline.device))
        if recipe == "reward" and settings.eval_path:  # the judge's record: accuracy, interval, calibration
            summary = {**summary, "judge": _judge_reliability(cfg, settings, run_dir, run_id)}
        if extra is not None:  # registration tags the reward version with these
            summary = {**summary, "extra_train": extra.to_dict()}
        if warm is not None:
            summary = {**summary, "warm_start": {**warm, "model": init.path}}
        if run_id:
            final_metrics = {f"final/{k}": v for k, v in (summary.get("metrics") or summary).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}
            tracking.log_metrics(run_id, final_metrics, step=int(summary.get("step", 0) or 0))
            for name in ("summary.json", "train.log", f"{recipe}.yaml"):
                if (run_dir / name).exists():
                    tracking.log_artifact(run_id, run_dir / name, "run")
    path, adapter = _final_paths(run_dir)
    return ModelRecord(stage=stage, path=path, adapter_path=adapter, digest=key, run_id=run_id,
                       base=init.path, summary=summary)


def _log_inputs(run_id: str, cfg: PipelineConfig, settings: TrainSettings, dataset_digest: str) -> None:
    """The files the recipe reads, as the run's dataset inputs (MLflow's "Datasets" column)."""
    for path, context in ((settings.train_path, "training"), (settings.eval_path, "validation")):
        if path and Path(path).is_file():
            tracking.log_dataset(run_id, path, context=context, name=f"{cfg.pipeline.name}-{Path(path).stem}",
                                 digest=dataset_digest[:36])
    for path in getattr(settings, "extra_train_paths", None) or []:  # extra reward pairs, by their own digest
        if Path(path).is_file():
            tracking.log_dataset(run_id, path, context="training-extra", name=f"{cfg.pipeline.name}-extra-pairs",
                                 digest=extra_pairs_digest([path]))


def _judge_reliability(cfg: PipelineConfig, settings: TrainSettings, run_dir: Path,
                       run_id: str | None) -> dict[str, Any] | None:
    """The trained reward model's held-out (validation) accuracy with its Wilson interval and
    calibration error, logged on the reward run as ``judge/...`` metrics; registration tags the
    reward-model version with them."""
    from tasks.evaluation.judge import reward_model_reliability

    device = resolve_device(cfg.pipeline.device)
    rel = reward_model_reliability(_final_paths(run_dir)[0], settings.eval_path, split="validation",
                                   max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
                                   confidence=cfg.evaluation.confidence, batch_size=cfg.evaluation.score_batch_size,
                                   device=device)
    if rel is None:
        return None
    if run_id:
        tracking.log_metrics(run_id, rel.metrics())
    return rel.model_dump()


def _train_holding_gpu(cfg: PipelineConfig, stage: str, data: dict[str, str], dataset_digest: str,
                       init: ModelRecord, parent_run_id: str | None, reward: ModelRecord | None = None,
                       reference: ModelRecord | None = None) -> ModelRecord:
    """:func:`train_stage` holding ``pipeline.processes`` slots of the global concurrency limit
    ``gpu`` where it exists (tasks/stages/slots.py). Training on the CPU shares no GPU: no slot."""
    on_gpu = resolve_device(cfg.pipeline.device) == "cuda"
    gpu = slots.held(slots.GPU, occupy=cfg.pipeline.processes) if on_gpu else contextlib.nullcontext()
    with gpu:
        return train_stage(cfg, stage, data, dataset_digest, init, parent_run_id, reward, reference)


train_task = cached_stage("train", key=train_key, task_run_name="train-{stage}")(_train_holding_gpu)
"""Prefect task of a training stage, cached on :func:`train_key` (run it with
:func:`tasks.stages.cached.run_cached` and ``ModelRecord.exists``)."""
