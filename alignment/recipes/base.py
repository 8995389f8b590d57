"""The recipe lifecycle: setup, train, save, cleanup — and nothing an algorithm decides.

A recipe is one training algorithm. Two families implement this lifecycle side by side:
:class:`~alignment.recipes.supervised.SupervisedRecipe` (SFT, reward model, DPO family: a loss
per collated micro-batch) and :class:`~alignment.recipes.rl_base.RLRecipe` (PPO, GRPO: one step
is a rollout plus minibatch updates). :class:`Recipe` holds what both share and composes the
parts that have their own module:

* **lifecycle** — :meth:`Recipe.run` = :meth:`setup` → :meth:`train` → :meth:`save` →
  :meth:`cleanup` (cleanup always runs).
* **accelerate** — one :class:`accelerate.Accelerator` (CPU, one GPU, DDP or FSDP under
  ``accelerate launch``); bf16/fp16 autocast from ``precision``; the GPU fast paths
  (:mod:`alignment.fast_paths`) where the device supports them.
* **optimizer** — AdamW, warmup + schedule and the guarded update (:mod:`alignment.recipes.optim`).
* **data order** — :class:`~alignment.recipes.feed.BatchFeed`: a seeded, length-grouped sampler
  whose position is part of every checkpoint.
* **metrics** — :class:`~alignment.recipes.metrics_log.MetricsLog`: one record per step
  (``phase="train"``; always ``loss``, ``grad_norm``, ``lr``, ``tokens_per_s``,
  ``samples_per_s``) and per evaluation (``phase="eval"``, names prefixed ``eval/``) in
  ``metrics.jsonl`` and to each callback.
* **checkpoints** — :class:`~alignment.recipes.checkpoint.Checkpointer`: every ``save_every``
  steps, at the end, and when :meth:`train` stops early at ``until_step``; with
  ``keep_checkpoints_after_finish: false`` deleted once ``final/`` and ``summary.json`` are written.
* **resume** — with ``resume: true`` and a checkpoint in ``output_dir``, setup restores
  weights, optimizer, schedule, RNG streams, data position and recipe state, and training
  continues exactly as if never stopped; a checkpoint of a different config is refused with
  :class:`~alignment.recipes.checkpoint.ResumeConfigError` listing each difference.
  ``resume: false`` deletes the run folder's old checkpoints and metrics.

What a family writes: ``build_models()`` (set ``self.model`` — what :meth:`save` writes — and
``self.tokenizer``; optionally ``self.train_module``, the ``nn.Module`` that goes to
``accelerator.prepare`` and through which every trained forward must go under DDP/FSDP),
``build_data()`` → ``(train_set, eval_set or None)``, ``train_step()`` (one step's metrics,
or a :class:`~alignment.recipes.pending.PendingStep` still on the device),
``eval_metrics()`` and the sizes ``sampler_batch_size()``, ``steps_per_epoch()`` and
``optimizer_steps_per_step()``. Extra state is data, not hooks: ``self.extra_modules`` (file
name → module whose trainable weights a checkpoint also holds) and ``self.stateful`` (name →
object with ``state_dict``/``load_state_dict``, saved in the checkpoint's ``extra`` JSON +
safetensors pair: tensors, numbers, strings, lists, tuples and dicts only). ``on_prepared()`` runs
once the models are on the device, before a checkpoint is loaded (e.g. to precompute reference
log-probs from the *initial* policy).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from alignment.batching import ExampleSet, LengthGroupedSampler, Truncation
from alignment.config import ConfigError, TrainSettings
from alignment.fast_paths import (
    compile_layers,
    sdpa_backends,
    set_causal_padding,
    set_varlen_attention,
    usable_fast_paths,
)
from alignment.models import is_peft, packing_supported, save_model_folder, shared_prompt_supported
from alignment.recipes.checkpoint import Checkpointer, gather_state_dict, is_sharded, write_json
from alignment.recipes.feed import BatchFeed
from alignment.recipes.metrics_log import MetricsCallback, MetricsLog
from alignment.recipes.optim import build_optimizer, build_scheduler, guarded_step, skips_on_device
from alignment.recipes.pending import PendingStep

log = logging.getLogger(__name__)

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ONE_ROW_MULTIPLE = 64
"""One-row packed batches (varlen attention) are padded to a multiple of this many tokens."""


class Recipe(ABC):
    """The lifecycle every trainer runs; see the module docstring for what a family writes."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[TrainSettings]] = TrainSettings
    released_on_cleanup: ClassVar[tuple[str, ...]] = ("train_module", "optimizer", "scheduler", "model")
    """Attributes dropped by :meth:`cleanup` so their (device) memory can be freed."""

    def __init__(self, config: TrainSettings, callbacks: Sequence[MetricsCallback] = (),
                 accelerator: Accelerator | None = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.metrics_log = MetricsLog(callbacks)
        self.callbacks = self.metrics_log.callbacks  # the same list: appending adds a callback
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir) if config.output_dir else None
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.train_module: nn.Module | None = None
        self.extra_modules: dict[str, nn.Module] = {}
        self.stateful: dict[str, Any] = {}
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: str | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.packing = False
        self.share_prompt = False
        self.data_stats: dict[str, dict[str, int]] = {}
        self._train_time = 0.0
        self._started: float | None = None
        self._sdpa = None

    # ------------------------------------------------------------------ what a family writes
    @abstractmethod
    def build_models(self) -> None:
        """Set ``self.model`` and ``self.tokenizer`` (optionally ``self.train_module``)."""

    @abstractmethod
    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        """Return the tokenized training set and the evaluation set (or None)."""

    @abstractmethod
    def train_step(self) -> dict[str, float] | PendingStep:
        """One training step; its metrics include ``loss``, ``grad_norm``, ``tokens`` and ``samples``."""

    @abstractmethod
    def eval_metrics(self) -> dict[str, float]:
        """Metrics over the eval set, prefixed ``eval/`` ({} when there is none)."""

    @abstractmethod
    def sampler_batch_size(self) -> int:
        """Examples each process draws per batch."""

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Training steps in one pass over the data."""

    @abstractmethod
    def optimizer_steps_per_step(self) -> int:
        """Optimizer (and scheduler) steps inside one training step; sizes the lr schedule."""

    def on_prepared(self) -> None:
        """Called once models are on the device and before a checkpoint is loaded."""
        return None

    def sampler_groups(self) -> list[int] | None:
        """A group id per training example that the sampler keeps together in batches
        (:class:`~alignment.batching.LengthGroupedSampler`'s ``groups``); None: examples are shuffled alone.
        Pair recipes under ``share_responses``: a pair's group is its prompt (token ids), so pairs that
        share a prompt share batches."""
        if not (self.share_prompt and self.config.share_responses):
            return None
        ids: dict[tuple[int, ...], int] = {}
        return [ids.setdefault(tuple(e["prompt"]), len(ids)) for e in self.train_set.examples]

    def own_lrs(self) -> dict[int, float]:
        """Peak learning rates of parameters that do not use ``optim.lr``, keyed by ``id(param)``
        (PPO's value function: ``value_lr``); the schedule scales them alike. {}: one lr."""
        return {}

    # ------------------------------------------------------------------ lifecycle
    def run(self, until_step: int | None = None) -> dict[str, Any]:
        """setup → train → save (``final/`` only if training finished) → cleanup; returns the summary."""
        try:
            self.setup()
            finished = self.train(until_step=until_step)
            self.save(finished)
            return self.summary(finished)
        finally:
            self.cleanup()

    def setup(self) -> None:
        """Build models and data, the optimizer and schedule; resume from a checkpoint if any."""
        cfg = self.config
        self._started = time.time()
        if cfg.max_prompt_length >= cfg.max_length:
            raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be below max_length ({cfg.max_length})")
        if cfg.share_responses and not cfg.share_prompt:
            raise ConfigError(f"{self.name}.share_responses runs a prompt's responses after one copy of it: "
                              "set share_prompt too")
        if self.accelerator is None:
            # accelerate keeps one process-wide precision and refuses a second one; a library user
            # may run recipes of different precisions one after another in one process. The
            # process group (PartialState) is kept.
            AcceleratorState._reset_state(reset_partial_state=False)
            # cpu=True on GPU-less hosts makes torchrun/accelerate launch use DDP over gloo.
            self.accelerator = Accelerator(mixed_precision=_PRECISION[cfg.precision], cpu=not torch.cuda.is_available())
        acc = self.accelerator
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != acc.num_processes:
            raise RuntimeError(f"launched as {world} processes but accelerate sees {acc.num_processes}")
        set_seed(cfg.seed)
        # Attention kernels for the recipe's lifetime (setup to cleanup); see TrainSettings.cudnn_attention.
        self._sdpa = sdpa_backends(cfg.cudnn_attention)
        self._sdpa.__enter__()
        self.build_models()
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.build_models() must set self.model and self.tokenizer")
        self.train_module = self.train_module or self.model
        self.train_set, self.eval_set = self.build_data()
        sampler = LengthGroupedSampler(self.train_set.lengths, self.sampler_batch_size(), seed=cfg.seed,
                                       num_replicas=acc.num_processes, rank=acc.process_index,
                                       group_by_length=cfg.length_grouping, groups=self.sampler_groups())
        self.feed = BatchFeed(self.train_set, sampler)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch()))
        self.optimizer = build_optimizer(self.train_module, cfg.optim, self.device, type(self).__name__,
                                         self.own_lrs())
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps * self.optimizer_steps_per_step())
        self._enable_fast_paths()
        self.train_module, self.optimizer = acc.prepare(self.train_module, self.optimizer)
        self.on_prepared()
        self._open_run_folder()

    def train(self, until_step: int | None = None) -> bool:
        """Run steps until ``total_steps`` (or ``until_step``: stop early, as if interrupted,
        after writing a checkpoint). Returns True when training finished.

        A step may return its metrics still pending on the device (overlapped steps): they are
        read, checked and emitted while the next step runs; before an evaluation, a checkpoint
        or the end the step is finished first, so records, checks and checkpoints keep their order.
        """
        cfg = self.config
        self.train_module.train()
        previous: tuple | None = None
        while self.step < self.total_steps and (until_step is None or self.step < until_step):
            lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses (RL: its first update)
            started = time.perf_counter()
            out = self.train_step()
            self.step += 1
            if previous is not None:  # this step's work is queued: now wait for the last one's numbers
                self._finish_step(*previous)
                previous = None
            elapsed = time.perf_counter() - started
            self._train_time += elapsed
            record = (self.step, lr, elapsed, out)
            eval_due = cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps
            save_due = cfg.save_every and self.step % cfg.save_every == 0
            if isinstance(out, PendingStep) and not (eval_due or save_due):
                previous = record
                continue
            self._finish_step(*record)
            if eval_due:
                self.evaluate()
            if save_due:
                self.save_checkpoint()
            if self.stop_early():  # a budget says stop: this step ends the run, finished
                self.total_steps = self.step
        if previous is not None:
            self._finish_step(*previous)
        finished = self.step >= self.total_steps
        if finished:
            self.evaluate()
        if self.output_dir and not self.checkpointer.path(self.step).exists():
            self.save_checkpoint()
        return finished

    def stop_early(self) -> bool:
        """Whether training should end after the step just finished (e.g. a drift budget,
        :meth:`alignment.recipes.dpo.DPORecipe.stop_early`); the run then ends as finished."""
        return False

    def _finish_step(self, step: int, lr: float, elapsed: float, out: dict[str, float] | PendingStep) -> None:
        """Read (and check) a step's metrics, count its tokens and emit its record."""
        metrics = out.resolve() if isinstance(out, PendingStep) else out
        tokens, samples = metrics.pop("tokens"), metrics.pop("samples")
        self.tokens_seen += int(tokens)
        metrics.update(lr=lr, tokens_per_s=tokens / elapsed, samples_per_s=samples / elapsed)
        self.last_metrics = metrics
        if step % self.config.log_every == 0 or step == self.total_steps:
            self.emit(metrics, "train", step=step)

    def evaluate(self) -> dict[str, float]:
        """Evaluate now (:meth:`eval_metrics`), record the result in ``last_eval`` and emit it."""
        metrics = self.eval_metrics()
        if metrics:
            self.last_eval = metrics
            self.emit(metrics, "eval")
        return metrics

    def save(self, finished: bool = True) -> None:
        """Write ``final/`` when ``finished`` and ``summary.json`` always (main process); then, when
        finished with ``keep_checkpoints_after_finish`` off, delete ``checkpoints/``.

        Collective: every process calls it. When the model is sharded (FSDP) every process takes
        part in gathering its full weights, which the main process writes (the same files as an
        unsharded model's)."""
        if self.output_dir is None:
            return
        acc = self.accelerator
        acc.wait_for_everyone()
        if finished:
            model = acc.unwrap_model(self.model)
            full = gather_state_dict(model) if is_sharded({"model": model}, acc) else None
            if acc.is_main_process:
                final = self.output_dir / "final"
                shutil.rmtree(final, ignore_errors=True)
                # An ordinary HF folder (LoRA: the adapter plus merged/ full weights).
                save_model_folder(model, self.tokenizer, final, state_dict=full)
        if acc.is_main_process:
            write_json(self.output_dir / "summary.json", self.summary(finished))
            # after the summary: a crash before this line leaves the checkpoints a re-run resumes from
            if finished and not self.config.keep_checkpoints_after_finish:
                self.checkpointer.clear()
        acc.wait_for_everyone()

    def cleanup(self) -> None:
        """Close files and free models and device memory (always runs)."""
        if self._sdpa is not None:
            self._sdpa.__exit__(None, None, None)
            self._sdpa = None
        self.metrics_log.close()
        for attr in self.released_on_cleanup:
            if hasattr(self, attr):
                setattr(self, attr, None)
        if self.accelerator is not None:
            self.accelerator.free_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def summary(self, finished: bool) -> dict[str, Any]:
        """Final metrics, steps, wall time, throughput and resume origin."""
        return {
            "recipe": self.name,
            "finished": finished,
            "steps": self.step,
            "total_steps": getattr(self, "total_steps", None),
            "wall_time_s": round(time.time() - self._started, 3) if self._started else None,
            "train_time_s": round(self._train_time, 3),
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": self.tokens_seen / self._train_time if self._train_time else None,
            "resumed_from": self.resumed_from,
            "packing": self.packing,
            "share_prompt": self.share_prompt,
            "share_responses": self.share_prompt and bool(self.config.share_responses),
            "data": self.data_stats,
            "metrics": {**self.last_metrics, **self.last_eval},
        }

    # ------------------------------------------------------------------ shared by both families
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def emit(self, metrics: dict[str, float], phase: str, step: int | None = None) -> None:
        """Send one record (of ``step``, default the current one) to metrics.jsonl and the
        callbacks (main process only)."""
        if self.accelerator.is_main_process:
            self.metrics_log.emit(self.step if step is None else step, getattr(self, "total_steps", None), phase,
                                  metrics)

    def optimizer_step(self, losses: torch.Tensor | None = None, defer_check: bool = False) -> torch.Tensor:
        """The guarded update of step ``self.step + 1`` (:func:`alignment.recipes.optim.guarded_step`)."""
        return guarded_step(self.accelerator, self.train_module, self.optimizer, self.scheduler,
                            self.config.optim.max_grad_norm, self.step + 1, losses, defer_check)

    def _skips_on_device(self) -> bool:
        return skips_on_device(self.optimizer, self.accelerator)

    def truncation(self) -> Truncation:
        """The configured truncation policy for this recipe's tokenizer."""
        cfg = self.config
        return Truncation(cfg.max_length, cfg.max_prompt_length, cfg.truncation, self.tokenizer.bos_token_id)

    def token_layout(self, model: nn.Module, can_pack: bool = True, can_share: bool = False) -> dict[str, Any]:
        """Collator keywords: pad id, and packing when configured *and* verified on ``model``
        (:func:`alignment.models.packing_supported`); otherwise padding, to a multiple of 8 on GPU.
        Pair recipes pass ``can_share``: then ``share_prompt`` when configured and verified
        (:func:`alignment.models.shared_prompt_supported`)."""
        packing = self.config.packing and can_pack
        if packing and not packing_supported(model):
            log.warning("%s: this model does not give equal results packed and padded; using padding", self.name)
            packing = False
        self.packing = packing
        multiple = 8 if self.device.type == "cuda" and not packing else None
        layout = {"pad_id": self.tokenizer.pad_token_id, "packing": packing, "pad_to_multiple_of": multiple}
        share = self.config.share_prompt and can_share
        if share and not shared_prompt_supported(model):
            log.warning("%s: this model does not give equal results with shared prompts; computing them twice",
                        self.name)
            share = False
        if share:
            layout["share_prompt"] = True
            if self.config.share_responses:
                layout["share_responses"] = True
        elif packing and self._uses_varlen(model):
            # varlen attention flattens the rows: pack one row, no row tails (alignment.batching)
            layout |= {"one_row": True, "pad_to_multiple_of": ONE_ROW_MULTIPLE}
        self.share_prompt = share
        return layout

    def _uses_varlen(self, model: nn.Module) -> bool:
        """Whether :meth:`_enable_fast_paths` will switch on varlen attention for packed batches."""
        cfg = self.config
        dtype = _AUTOCAST_DTYPES.get(cfg.precision) or next(model.parameters()).dtype
        return usable_fast_paths(cfg.compile, cfg.varlen_attention, self.device, dtype)[1]

    def note_data(self, split: str, stats: dict[str, int], kept: int) -> None:
        """Record (and log) how many examples a split kept, truncated and dropped."""
        self.data_stats[split] = {"examples": kept, **stats}
        if stats.get("truncated") or stats.get("dropped"):
            log.info("%s %s data: %d examples, %d truncated, %d dropped", self.name, split, kept,
                     stats.get("truncated", 0), stats.get("dropped", 0))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """File name → module whose trainable parameters a checkpoint holds."""
        policy = ("adapter_model" if is_peft(self.model) else "model") + ".safetensors"
        return {policy: self.model, **self.extra_modules}

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNN`` (see :class:`~alignment.recipes.checkpoint.Checkpointer`)."""
        if self.output_dir is None:
            return None
        state = {"step": self.step, "sampler": self.feed.position(), "tokens_seen": self.tokens_seen,
                 "train_time_s": self._train_time, "recipe": self.name}
        extra = {name: obj.state_dict() for name, obj in self.stateful.items()}
        return self.checkpointer.save(self.step, self.checkpoint_modules(), self.optimizer, self.scheduler, extra,
                                      state)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote. Raises ResumeConfigError on a
        different config or process count."""
        state, extra = self.checkpointer.load(path, self.checkpoint_modules(), self.optimizer, self.scheduler,
                                              self.device)
        for name, obj in self.stateful.items():
            obj.load_state_dict(extra[name])
        self.feed.load_position(state["sampler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._train_time = state["train_time_s"]
        self.resumed_from = str(path)

    def _open_run_folder(self) -> None:
        """Resume (or clear a stale run), then open metrics.jsonl for appending."""
        if self.output_dir is None:
            return
        acc = self.accelerator
        self.checkpointer = Checkpointer(self.output_dir, acc, self.config)
        latest = self.checkpointer.latest()
        if latest is not None and self.config.resume:
            self.load_checkpoint(latest)
        else:
            self.checkpointer.clear()  # resume: false starts over in this folder
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.metrics_log.open(self.output_dir, self.step)

    def _enable_fast_paths(self) -> None:
        """Causal padding, varlen attention and regional compile, as configured and where usable."""
        cfg = self.config
        if cfg.causal_padding and not self.packing:
            set_causal_padding(self.train_module, True)
        weights_dtype = next(self.train_module.parameters()).dtype
        use_compile, use_varlen, notes = usable_fast_paths(
            cfg.compile, cfg.varlen_attention and self.packing, self.device,
            _AUTOCAST_DTYPES.get(cfg.precision) or weights_dtype)
        for note in notes:
            log.warning(note)
        if use_varlen:
            set_varlen_attention(self.train_module, True)
        if use_compile:
            self.train_module = compile_layers(self.train_module)
