"""The ``checkpoints/`` folder of a recipe run: writing, finding, checking and restoring checkpoints.

:class:`Checkpointer` is the one owner of that layout (ARCHITECTURE.md, "Recipe run folder").
``checkpoints/step-NNNNNN/`` holds

* the *trainable* weights of each module a recipe names (``model.safetensors``, or
  ``adapter_model.safetensors`` under LoRA, plus e.g. ``value.safetensors``; frozen weights come
  from ``model.name_or_path`` again), or under FSDP accelerate's sharded ``fsdp/`` state;
* ``optimizer.pt``, ``scheduler.pt``, ``extra.pt`` (recipe state such as a KL controller);
* ``rng.pt`` (python, numpy, torch, cuda; ``rng-<rank>.pt`` for each other process);
* ``state.json`` (step, data position, tokens seen, training time, process count, recipe) and
  ``config.json`` (the run's whole config).

Every ``.pt`` file holds tensors and plain values only and is read with ``weights_only=True``.

Atomicity: a checkpoint is written under ``step-NNNNNN.tmp`` and renamed when complete, so a
crash never leaves a half checkpoint under a real name; a ``.tmp`` folder is never chosen to
resume from and is replaced by the next save of that step. After a save only the newest
``keep`` checkpoints remain.

Resume semantics: :meth:`Checkpointer.load` refuses (:class:`ResumeConfigError`, listing every
difference) a checkpoint whose config differs from the run's, apart from
:data:`RESUME_IGNORED_FIELDS`, or one written by a different number of processes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn

from alignment.config import ConfigError, TrainSettings, config_diff
from alignment.recipes.state import load_trainable_state, rng_state, set_rng_state, trainable_state

__all__ = ["RESUME_IGNORED_FIELDS", "Checkpointer", "ResumeConfigError", "write_json"]

RESUME_IGNORED_FIELDS = frozenset({"output_dir", "resume", "num_workers", "log_every", "keep_checkpoints",
                                   "overlap_steps"})
"""Config fields that may change between a run and its resumption (they do not change the math)."""


class ResumeConfigError(ConfigError):
    """The newest checkpoint was written with a different config; the message lists the differences."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """The run folder's JSON style: indented, sorted keys, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _rng_name(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


class Checkpointer:
    """Checkpoints of one run under ``<output_dir>/checkpoints``.

    Collective: under several processes every process calls :meth:`save`, :meth:`load` and
    :meth:`clear`; the main process writes the shared files, each process its RNG file.
    """

    def __init__(self, output_dir: Path, accelerator: Accelerator, config: TrainSettings) -> None:
        self.folder = Path(output_dir) / "checkpoints"
        self.accelerator = accelerator
        self.config = config

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}"

    def latest(self) -> Path | None:
        """Newest complete checkpoint, or None. A ``.tmp`` folder is one a crash interrupted before
        its rename (which is what completes a checkpoint): never chosen."""
        found = sorted(p for p in self.folder.glob("step-*")
                       if not p.name.endswith(".tmp") and (p / "state.json").exists())
        return found[-1] if found else None

    def clear(self) -> None:
        """Delete every checkpoint (``resume: false`` starts over in the same folder)."""
        if self.accelerator.is_main_process and self.folder.exists():
            shutil.rmtree(self.folder)

    def save(self, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             scheduler: Any, extra: dict[str, Any], state: dict[str, Any]) -> Path:
        """Write ``step-NNNNNN`` atomically (``state`` goes to state.json with the process count),
        then keep the newest ``keep_checkpoints``; returns the folder."""
        acc = self.accelerator
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.distributed_type == DistributedType.FSDP:
            acc.save_state(str(tmp / "fsdp"))  # sharded model + optimizer; gathered by accelerate
        elif acc.is_main_process:
            for fname, module in modules.items():
                save_file(trainable_state(module), str(tmp / fname))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if acc.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(extra, tmp / "extra.pt")
            # state.json before config.json: a torn folder is recognisable by a missing config.
            write_json(tmp / "state.json", {**state, "num_processes": acc.num_processes})
            write_json(tmp / "config.json", self.config.model_dump(mode="json"))
        torch.save(rng_state(), tmp / _rng_name(acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def load(self, path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             scheduler: Any, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore weights, optimizer, scheduler and this process's RNG from ``path``; returns
        ``(state, extra)`` (state.json and extra.pt) for the caller to restore the rest.

        Raises ResumeConfigError if the checkpoint's config differs (see RESUME_IGNORED_FIELDS)
        or it was written by a different number of processes.
        """
        acc = self.accelerator
        self.check_config(path)
        state = json.loads((path / "state.json").read_text())
        if state["num_processes"] != acc.num_processes:
            raise ResumeConfigError(
                f"cannot resume from {path}: written by {state['num_processes']} processes, now {acc.num_processes}"
            )
        if acc.distributed_type == DistributedType.FSDP:
            acc.load_state(str(path / "fsdp"))
        else:
            for fname, module in modules.items():
                load_trainable_state(module, load_file(str(path / fname)), str(path / fname))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        extra = torch.load(path / "extra.pt", weights_only=True)
        set_rng_state(torch.load(path / _rng_name(acc.process_index), weights_only=True))
        return state, extra

    def check_config(self, path: Path) -> None:
        """Raise ResumeConfigError listing each difference between ``path``'s config and the run's."""
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

    def _prune(self) -> None:
        found = sorted(p for p in self.folder.glob("step-*") if not p.name.endswith(".tmp"))
        for old in found[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
