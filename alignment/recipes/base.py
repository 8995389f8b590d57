"""The recipe lifecycle shared by every trainer: setup, train, save, cleanup.

A recipe is one training algorithm. :class:`Recipe` owns everything that is the same for
all of them, so each algorithm file only says what is different:

* **lifecycle** — :meth:`Recipe.run` = :meth:`setup` → :meth:`train` → :meth:`save` →
  :meth:`cleanup` (cleanup always runs).
* **accelerate** — one :class:`accelerate.Accelerator` (CPU, one GPU, DDP or FSDP under
  ``accelerate launch``); bf16/fp16 autocast from ``precision``; AdamW (fused on CUDA) and
  warmup + linear/cosine schedule; gradient accumulation (``no_sync`` on all but the last
  micro-batch); clipping with the global grad norm logged every step.
* **the NaN/inf guard** — a non-finite loss or grad norm raises
  :class:`~alignment.logprobs.NonFiniteError` naming the step, and the optimizer never applies
  that step, so the weights (in memory and on disk) are never poisoned. With a fused optimizer
  (CUDA) the default step does not wait for the device to decide: the finiteness flag goes to
  the optimizer as ``found_inf`` (the kernel skips the update on the device) and is read with the
  step's metrics, one host sync per step instead of three.
* **prefetch** — the default step collates the next micro-batch right after queuing the
  backward pass, so the CPU work overlaps the device's; a checkpoint records the data position
  *before* a prefetched batch, which is collated again on resume.
* **data order** — a seeded, length-grouped :class:`~alignment.batching.LengthGroupedSampler`
  (sharded over processes) whose position is part of every checkpoint.
* **metrics** — one record per step (``phase="train"``) and per evaluation (``phase="eval"``,
  names prefixed ``eval/``) is appended to ``metrics.jsonl`` (flushed per line) and passed to
  each callback. Always present: ``loss``, ``grad_norm``, ``lr``, ``tokens_per_s``,
  ``samples_per_s``. Recipes know nothing of trackers.
* **checkpoints** — every ``save_every`` steps, at the end, and when :meth:`train` is stopped
  early with ``until_step``: ``checkpoints/step-NNNNNN/`` holds the *trainable* weights
  (``model.safetensors``, or ``adapter_model.safetensors`` under LoRA: frozen weights come
  from ``model.name_or_path`` again), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (python,
  numpy, torch, cuda; ``rng-<rank>.pt`` for other processes), ``state.json`` (step, sampler
  position, tokens seen), ``extra.pt`` (:meth:`extra_state`) and ``config.json``. A folder is
  written under a ``.tmp`` name and renamed, so a crash never leaves a half checkpoint.
* **resume** — with ``resume: true`` and a checkpoint in ``output_dir``, setup restores all
  of the above and training continues exactly as if never stopped (same batches, same
  dropout masks, same learning rates). A checkpoint whose config differs (apart from
  :data:`RESUME_IGNORED_FIELDS`) is refused with :class:`ResumeConfigError` listing each
  difference. ``resume: false`` deletes the run folder's old checkpoints and metrics.

Extension surface (what a subclass writes)
-----------------------------------------
``build_models()``
    Set ``self.model`` (the HF model, or peft model, that :meth:`save` writes) and
    ``self.tokenizer``. Optionally set ``self.train_module``: the ``nn.Module`` whose
    ``forward`` computes what the loss needs (e.g. a log-prob wrapper around ``self.model``).
    It is what goes to ``accelerator.prepare`` — under DDP/FSDP every trained forward must go
    through it. Frozen helpers (reference, reward model) go on ``self.device`` themselves.
``build_data()``
    Return ``(train_set, eval_set or None)``, :class:`~alignment.batching.ExampleSet` s.
``compute_loss(batch)``
    One micro-batch (a collated dict already on ``self.device``, inside autocast) →
    :class:`StepOutput`. Called with grad for training and under ``no_grad`` (module in eval
    mode) for evaluation.

Optional hooks: ``on_prepared()`` (after the optimizer exists and models are on the device,
before a checkpoint is loaded: e.g. precompute reference log-probs from the *initial*
policy); ``train_step()`` (replace the default accumulate-and-step, e.g. PPO's rollout plus
several epochs of minibatches: call :meth:`next_batch`, :meth:`backward`,
:meth:`optimizer_step` and return the step's metrics); ``steps_per_epoch()``,
``sampler_batch_size()``, ``optimizer_steps_per_step()`` (for RL: one *step* is one
rollout+update iteration); ``extra_state()``/``load_extra_state()`` (e.g. a KL controller);
``checkpoint_modules()`` (e.g. a value head); ``save_final()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from alignment.batching import ExampleSet, LengthGroupedSampler, Truncation, to_device
from alignment.config import ConfigError, TrainSettings, config_diff
from alignment.fast_paths import (
    compile_layers,
    sdpa_backends,
    set_causal_padding,
    set_varlen_attention,
    usable_fast_paths,
)
from alignment.logprobs import check_finite
from alignment.models import is_peft, packing_supported, save_model_folder, shared_prompt_supported
from alignment.recipes.pending import PendingStep
from alignment.recipes.state import load_trainable_state, lr_lambda, rng_state, set_rng_state, trainable_state

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, Any]], None]
"""Receives each metrics record: ``{"step", "phase", "time", <metric>: float, ...}``."""

RESUME_IGNORED_FIELDS = frozenset({"output_dir", "resume", "num_workers", "log_every", "keep_checkpoints",
                                   "overlap_steps"})
"""Config fields that may change between a run and its resumption (they do not change the math)."""

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ResumeConfigError(ConfigError):
    """The newest checkpoint was written with a different config; the message lists the differences."""


@dataclass
class StepOutput:
    """What :meth:`Recipe.compute_loss` returns for one micro-batch.

    ``loss`` is the differentiable mean over the micro-batch (the base divides by
    ``grad_accum``); ``metrics`` are detached scalar tensors (means over the micro-batch; kept
    as tensors so nothing synchronises with the GPU until the step ends); ``tokens`` counts
    non-padding tokens forwarded (for ``tokens_per_s``) and ``samples`` the examples (pairs for
    DPO and reward models).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0


class Recipe(ABC):
    """Base of all trainers; see the module docstring for the lifecycle and the extension surface."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[TrainSettings]] = TrainSettings
    released_on_cleanup: ClassVar[tuple[str, ...]] = ("train_module", "optimizer", "scheduler", "model")
    """Attributes dropped by :meth:`cleanup` so their (device) memory can be freed."""

    def __init__(
        self,
        config: TrainSettings,
        callbacks: Sequence[MetricsCallback] = (),
        accelerator: Accelerator | None = None,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.callbacks = list(callbacks)
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir) if config.output_dir else None
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.train_module: nn.Module | None = None
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: str | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._metrics_file = None
        self._train_time = 0.0
        self._started: float | None = None
        self._prefetched: tuple[dict[str, int], dict[str, Any]] | None = None
        self.packing = False
        self.share_prompt = False
        self.data_stats: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ extension surface
    @abstractmethod
    def build_models(self) -> None:
        """Set ``self.model`` and ``self.tokenizer`` (optionally ``self.train_module``)."""

    @abstractmethod
    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        """Return the tokenized training set and the evaluation set (or None)."""

    @abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        """Loss and metrics of one collated micro-batch (already on ``self.device``)."""

    def on_prepared(self) -> None:
        """Called once models are on the device and before a checkpoint is loaded."""
        return None

    def sampler_batch_size(self) -> int:
        """Examples each process draws per :meth:`next_batch` (RL: prompts per rollout)."""
        return self.config.batch_size

    def steps_per_epoch(self) -> int:
        """Training steps in one pass over the data."""
        return max(1, len(self.sampler) // self.config.grad_accum)

    def optimizer_steps_per_step(self) -> int:
        """Optimizer (and scheduler) steps inside one training step; sizes the lr schedule."""
        return 1

    def extra_state(self) -> dict[str, Any]:
        """Recipe state beyond weights/optimizer/RNG to checkpoint (tensors and plain values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        return None

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """File name → module whose trainable parameters a checkpoint holds."""
        return {("adapter_model" if is_peft(self.model) else "model") + ".safetensors": self.model}

    def save_final(self, path: Path) -> None:
        """Write the trained model as an ordinary HF folder (LoRA: adapter plus ``merged/``)."""
        save_model_folder(self.accelerator.unwrap_model(self.model), self.tokenizer, path)

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
        if self.accelerator is None:
            # cpu=True on GPU-less hosts makes torchrun/accelerate launch use DDP over gloo.
            self.accelerator = Accelerator(mixed_precision=_PRECISION[cfg.precision], cpu=not torch.cuda.is_available())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise RuntimeError(f"launched as {world} processes but accelerate sees {self.accelerator.num_processes}")
        set_seed(cfg.seed)
        # Attention kernels for the recipe's lifetime (setup to cleanup); see TrainSettings.cudnn_attention.
        self._sdpa = sdpa_backends(cfg.cudnn_attention)
        self._sdpa.__enter__()
        self.build_models()
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.build_models() must set self.model and self.tokenizer")
        self.train_module = self.train_module or self.model
        self.train_set, self.eval_set = self.build_data()
        acc = self.accelerator
        self.sampler = LengthGroupedSampler(
            self.train_set.lengths,
            self.sampler_batch_size(),
            seed=cfg.seed,
            num_replicas=acc.num_processes,
            rank=acc.process_index,
            group_by_length=cfg.length_grouping,
        )
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch()))
        self.optimizer = self._make_optimizer()
        sched_steps = self.total_steps * self.optimizer_steps_per_step()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim.warmup_steps, sched_steps, cfg.optim.schedule)
        )
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
        self.train_module, self.optimizer = acc.prepare(self.train_module, self.optimizer)
        self.on_prepared()
        self._open_run_folder()

    def train(self, until_step: int | None = None) -> bool:
        """Run steps until ``total_steps`` (or ``until_step``: stop early, as if interrupted,
        after writing a checkpoint). Returns True when training finished.

        With overlapping steps (:meth:`overlaps_steps`) a step's metrics are read, checked and
        emitted while the next step runs; before an evaluation, a checkpoint or the end, the
        step is finished first, so records, checks and checkpoints keep their order.
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
        if previous is not None:
            self._finish_step(*previous)
        finished = self.step >= self.total_steps
        if finished:
            self.evaluate()
        if self.output_dir and not (self._checkpoint_dir(self.step)).exists():
            self.save_checkpoint()
        return finished

    def _finish_step(self, step: int, lr: float, elapsed: float, out: dict[str, float] | PendingStep) -> None:
        """Read (and check) a step's metrics, count its tokens and emit its record."""
        metrics = out.resolve() if isinstance(out, PendingStep) else out
        tokens, samples = metrics.pop("tokens"), metrics.pop("samples")
        self.tokens_seen += int(tokens)
        metrics.update(lr=lr, tokens_per_s=tokens / elapsed, samples_per_s=samples / elapsed)
        self.last_metrics = metrics
        if step % self.config.log_every == 0 or step == self.total_steps:
            self.emit(metrics, "train", step=step)

    def overlaps_steps(self) -> bool:
        """Whether the default step leaves its metrics pending until the next step is queued
        (``TrainSettings.overlap_steps``; None: on one CUDA device with a fused optimizer)."""
        choice = self.config.overlap_steps
        if choice is None:
            choice = self.device.type == "cuda"
        return bool(choice) and self._skips_on_device() and self.accelerator.num_processes == 1

    def save(self, finished: bool = True) -> None:
        """Write ``final/`` when ``finished`` and ``summary.json`` always (main process)."""
        if self.output_dir is None:
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if finished:
                final = self.output_dir / "final"
                shutil.rmtree(final, ignore_errors=True)
                self.save_final(final)
            self._write_json(self.output_dir / "summary.json", self.summary(finished))
        self.accelerator.wait_for_everyone()

    def cleanup(self) -> None:
        """Close files and free models and device memory (always runs)."""
        if getattr(self, "_sdpa", None) is not None:
            self._sdpa.__exit__(None, None, None)
            self._sdpa = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
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
            "data": self.data_stats,
            "metrics": {**self.last_metrics, **self.last_eval},
        }

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

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
        self.share_prompt = share
        return layout

    def note_data(self, split: str, stats: dict[str, int], kept: int) -> None:
        """Record (and log) how many examples a split kept, truncated and dropped."""
        self.data_stats[split] = {"examples": kept, **stats}
        if stats.get("truncated") or stats.get("dropped"):
            log.info("%s %s data: %d examples, %d truncated, %d dropped", self.name, split, kept,
                     stats.get("truncated", 0), stats.get("dropped", 0))

    def next_batch(self) -> dict[str, Any]:
        """The next training micro-batch for this process, collated and on the device."""
        if self._prefetched is not None:
            batch, self._prefetched = self._prefetched[1], None
        else:
            batch = self._collate_next()
        return to_device(batch, self.device)

    def prefetch(self) -> None:
        """Collate the next micro-batch now (on the CPU) while the device runs queued work.

        The sampler position before it is kept: :meth:`save_checkpoint` records that one, so a
        resumed run collates the same batch again. Nothing is prefetched after the last step.
        """
        if self._prefetched is None and self.step + 1 < self.total_steps:
            position = self.sampler.state_dict()
            self._prefetched = (position, self._collate_next())

    def _collate_next(self) -> dict[str, Any]:
        indices = self.sampler.next_batch()
        return self.train_set.collate([self.train_set[i] for i in indices])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through accelerate (loss scaling under fp16)."""
        self.accelerator.backward(loss)

    def optimizer_step(self, losses: torch.Tensor | None = None, defer_check: bool = False) -> torch.Tensor:
        """Guard, clip, step optimizer and schedule, zero grads; returns the global grad norm.

        Raises NonFiniteError naming the step (``self.step + 1``) when ``losses`` or the grad
        norm is NaN/inf; the optimizer has not stepped then. With ``defer_check`` and an
        optimizer that can skip on the device (:meth:`_skips_on_device`), nothing syncs here:
        the update is skipped on the device when either is non-finite, and the caller must
        check them itself (the default :meth:`train_step` does, with its metrics).
        """
        step = self.step + 1
        deferred = defer_check and self._skips_on_device()
        if losses is not None and not deferred:
            check_finite("loss", losses, step)
        max_norm = self.config.optim.max_grad_norm or float("inf")
        norm = self.accelerator.clip_grad_norm_(self.train_module.parameters(), max_norm)
        if deferred:
            bad = ~torch.isfinite(norm.detach())
            if losses is not None:
                bad = bad | ~torch.isfinite(losses.detach()).all()
            self._inner_optimizer().found_inf = bad.float().reshape(())
        else:
            check_finite("grad_norm", norm, step)
        self.optimizer.step()
        if deferred:
            del self._inner_optimizer().found_inf  # a flag for this step only
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self) -> dict[str, float]:
        """Default step: ``grad_accum`` micro-batches (no DDP sync but on the last), one update.

        Returns means over micro-batches and processes of ``loss`` and the recipe metrics,
        ``grad_norm``, and the summed ``tokens`` and ``samples`` of all processes.
        """
        accum = self.config.grad_accum
        losses, outs = [], []
        for i in range(accum):
            batch = self.next_batch()
            sync = contextlib.nullcontext() if i == accum - 1 else self.accelerator.no_sync(self.train_module)
            with sync:
                with self.accelerator.autocast():
                    out = self.compute_loss(batch)
                self.backward(out.loss / accum)
            self.prefetch()  # the backward is queued on the device; collate meanwhile
            losses.append(out.loss.detach().float())
            outs.append(out)
        losses = torch.stack(losses)
        norm = self.optimizer_step(losses, defer_check=True)
        pending = self._reduce_step(losses, outs, norm)
        # Reading the metrics is the step's one host sync (and its NaN/inf check: a deferred
        # update was skipped on the device, so raising then leaves the weights intact). With
        # overlapping steps the caller reads them after queuing the next step.
        return pending if self.overlaps_steps() else pending.resolve()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and recipe metrics over the eval set (sharded over processes), prefixed ``eval/``."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        acc, bs = self.accelerator, self.config.batch_size
        chunks = [list(range(i, min(i + bs, len(self.eval_set)))) for i in range(0, len(self.eval_set), bs)]
        mine = chunks[acc.process_index :: acc.num_processes]
        # Every process runs the same number of forwards (FSDP needs all ranks in each one).
        rounds = math.ceil(len(chunks) / acc.num_processes)
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.device)
        self.train_module.eval()
        try:
            for r in range(rounds):
                idx, weight = (mine[r], 1.0) if r < len(mine) else (chunks[0], 0.0)
                batch = to_device(self.eval_set.collate([self.eval_set[i] for i in idx]), self.device)
                with acc.autocast():
                    out = self.compute_loss(batch)
                n = out.samples * weight
                for k, v in {"loss": out.loss, **out.metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
                count += n
        finally:
            self.train_module.train()
        keys = sorted(sums)
        vec = torch.stack([sums[k] for k in keys] + [count])
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        values = vec.tolist()
        metrics = {f"eval/{k}": v / max(values[-1], 1e-12) for k, v in zip(keys, values[:-1], strict=True)}
        self.last_eval = metrics
        self.emit(metrics, "eval")
        return metrics

    def emit(self, metrics: dict[str, float], phase: str, step: int | None = None) -> None:
        """Send one record (of ``step``, default the current one) to metrics.jsonl and the
        callbacks (main process only)."""
        if not self.accelerator.is_main_process:
            return
        record = {"step": self.step if step is None else step, "total_steps": getattr(self, "total_steps", None), "phase": phase,
                  "time": time.time(), **metrics}
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        for callback in self.callbacks:
            callback(record)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNN`` atomically and prune old ones; returns its path."""
        if self.output_dir is None:
            return None
        acc = self.accelerator
        final = self._checkpoint_dir(self.step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.distributed_type == DistributedType.FSDP:
            acc.save_state(str(tmp / "fsdp"))  # sharded model + optimizer; gathered by accelerate
        elif acc.is_main_process:
            for fname, module in self.checkpoint_modules().items():
                save_file(trainable_state(module), str(tmp / fname))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        if acc.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(self.extra_state(), tmp / "extra.pt")
            state = {
                "step": self.step,
                "sampler": self._prefetched[0] if self._prefetched else self.sampler.state_dict(),
                "tokens_seen": self.tokens_seen,
                "train_time_s": self._train_time,
                "num_processes": acc.num_processes,
                "recipe": self.name,
            }
            self._write_json(tmp / "state.json", state)
            self._write_json(tmp / "config.json", self.config.model_dump(mode="json"))
        torch.save(rng_state(), tmp / _rng_name(acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, RNG, data position and recipe state from ``path``.

        Raises ResumeConfigError if the checkpoint's config differs (see RESUME_IGNORED_FIELDS)
        or it was written by a different number of processes.
        """
        acc = self.accelerator
        saved = json.loads((path / "config.json").read_text())
        now = self.config.model_dump(mode="json")
        for key in RESUME_IGNORED_FIELDS:
            saved.pop(key, None)
            now.pop(key, None)
        diff = config_diff(saved, now)
        if diff:
            raise ResumeConfigError(
                f"cannot resume from {path}: the config differs from the one it was written with:\n  "
                + "\n  ".join(diff)
                + "\nRun with the original config, or set resume: false (or a new output_dir) to start over."
            )
        state = json.loads((path / "state.json").read_text())
        if state["num_processes"] != acc.num_processes:
            raise ResumeConfigError(
                f"cannot resume from {path}: written by {state['num_processes']} processes, now {acc.num_processes}"
            )
        if acc.distributed_type == DistributedType.FSDP:
            acc.load_state(str(path / "fsdp"))
        else:
            for fname, module in self.checkpoint_modules().items():
                load_trainable_state(module, load_file(str(path / fname)), str(path / fname))
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.load_extra_state(torch.load(path / "extra.pt", weights_only=True))
        self.sampler.load_state_dict(state["sampler"])
        self._prefetched = None
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._train_time = state["train_time_s"]
        set_rng_state(torch.load(path / _rng_name(acc.process_index), weights_only=True))
        self.resumed_from = str(path)

    def latest_checkpoint(self) -> Path | None:
        """Newest complete checkpoint folder in ``output_dir``, or None. A ``.tmp`` folder is one a
        crash interrupted before its rename (which is what completes a checkpoint): never chosen."""
        if self.output_dir is None:
            return None
        found = sorted(p for p in (self.output_dir / "checkpoints").glob("step-*")
                       if not p.name.endswith(".tmp") and (p / "state.json").exists())
        return found[-1] if found else None

    # ------------------------------------------------------------------ internals
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def _skips_on_device(self) -> bool:
        """True when the optimizer takes a device-side ``found_inf`` flag (fused AdamW) and no
        loss scaler (fp16) owns that flag."""
        fused = bool(self._inner_optimizer().defaults.get("fused"))
        return fused and self.accelerator.scaler is None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        opt = self.config.optim
        params = [p for p in self.train_module.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__}: the model has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
        groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = opt.fused if opt.fused is not None else self.device.type == "cuda"
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=fused or None
        )

    def _reduce_step(self, losses: torch.Tensor, outs: list[StepOutput], norm: torch.Tensor) -> PendingStep:
        keys = sorted(outs[0].metrics)
        means = [losses.mean()] + [torch.stack([o.metrics[k].float() for o in outs]).mean() for k in keys]
        means.append(norm.float())
        counts = torch.tensor([sum(o.tokens for o in outs), sum(o.samples for o in outs)], dtype=torch.float64)
        vec = torch.stack([m.to(self.device) for m in means])
        acc = self.accelerator
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
            counts = acc.reduce(counts.to(self.device), reduction="sum")
        tokens, samples = counts.tolist()
        return PendingStep.start(self.step + 1, keys, vec, tokens, samples, copy_async=self.overlaps_steps())

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"step-{step:06d}"

    def _prune_checkpoints(self) -> None:
        found = sorted(p for p in (self.output_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
        for old in found[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _open_run_folder(self) -> None:
        """Resume (or clear a stale run), then open metrics.jsonl for appending."""
        if self.output_dir is None:
            return
        acc = self.accelerator
        latest = self.latest_checkpoint()
        if latest is not None and self.config.resume:
            self.load_checkpoint(latest)
        elif acc.is_main_process and (self.output_dir / "checkpoints").exists():
            shutil.rmtree(self.output_dir / "checkpoints")  # resume: false starts over in this folder
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "metrics.jsonl"
            # Drop records past the resumed step: they belong to steps that will run again.
            keep = []
            if self.step and path.exists():
                keep = [ln for ln in path.read_text().splitlines() if _record_step(ln) <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))
            self._metrics_file = path.open("a")

    @staticmethod
    def _write_json(path: Path, data: dict[str, Any]) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _rng_name(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a torn or foreign line (a crash mid-write)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
