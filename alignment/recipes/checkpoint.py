"""The ``checkpoints/`` folder of a recipe run: writing, finding, checking and restoring checkpoints.

:class:`Checkpointer` is the one owner of that layout (ARCHITECTURE.md, "Recipe run folder").
``checkpoints/step-NNNNNN/`` holds

* the *trainable* weights of each module a recipe names (``model.safetensors``, or
  ``adapter_model.safetensors`` under LoRA, plus e.g. ``value.safetensors``; frozen weights come
  from ``model.name_or_path`` again), full (unsharded) tensors under FSDP as well;
* ``optimizer``, ``scheduler``, ``extra`` (recipe state such as a KL controller) and ``rng``
  (python, numpy, torch, cuda; ``rng-<rank>`` for each other process), each as a *state pair*:
  ``<name>.json`` plus, when the state holds tensors, ``<name>.safetensors``;
* ``state.json`` (step, data position, tokens seen, training time, process count, recipe) and
  ``config.json`` (the run's whole config).

No file is a pickle (the design rule: persisted state is JSON, Parquet or safetensors). A state
pair's JSON is the state's structure with each tensor replaced by ``{"__tensor__": key, "device":
...}``, where ``key`` is its dotted path (``state.0.exp_avg``) in the safetensors file (which keeps
its dtype); tuples, dicts with non-string keys (the optimizer's param ids) and non-finite floats
carry tags too, so a restored state equals the saved one exactly (types included: fused AdamW's
``step`` stays a float32 tensor and goes back to the run's device, a CPU tensor stays on the CPU).
Anything else (an arbitrary object) is refused with TypeError at save time rather than pickled.

Sharded models (FSDP2 ``fully_shard``, whose parameters are DTensors, or accelerate's FSDP) are
written in the same format: ``torch.distributed.checkpoint.state_dict``'s
``get_model_state_dict`` / ``get_optimizer_state_dict`` (``full_state_dict=True,
cpu_offload=True``: a collective on every process) gather full tensors on the main process, which
writes them (weights as safetensors, the optimizer as a state pair keyed by parameter names instead
of ids); every process waits at a barrier. On load the main process reads the files and
``set_model_state_dict`` / ``set_optimizer_state_dict`` (``broadcast_from_rank0=True``) shard them
again over the processes. The same files serve any later sharding of the same process count.

Checkpoints of older versions (``optimizer.pt`` etc., torch pickles, or accelerate's ``fsdp/``
``save_state`` folder of pickled ``*.bin``/``*.pkl``) are refused with
:class:`ResumeConfigError` naming the folder, never unpickled: resuming across that change is
rare, and starting over (``resume: false`` or a new ``output_dir``) is the way on.

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
import math
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

__all__ = ["RESUME_IGNORED_FIELDS", "Checkpointer", "ResumeConfigError", "gather_state_dict", "is_sharded",
           "write_json"]

RESUME_IGNORED_FIELDS = frozenset({"output_dir", "resume", "num_workers", "log_every", "keep_checkpoints",
                                   "keep_checkpoints_after_finish", "overlap_steps"})
"""Config fields that may change between a run and its resumption (they do not change the math)."""


class ResumeConfigError(ConfigError):
    """The newest checkpoint was written with a different config; the message lists the differences."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """The run folder's JSON style: indented, sorted keys, trailing newline. Atomic (written
    beside, then renamed): a crash leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _rng_name(rank: int) -> str:
    return "rng" if rank == 0 else f"rng-{rank}"


def _join(key: str, part: Any) -> str:
    return f"{key}.{part}" if key else str(part)


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; its tensors go to ``tensors`` under their dotted path ``key``.
    Raises TypeError on any other kind of object (it would need a pickle)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors would share the key {key!r}")
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses shared
        return {"__tensor__": key, "device": obj.device.type}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, _join(key, i), tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(key, k), tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, _join(key, f"key{i}"), tensors), _encode(v, _join(key, k), tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"state {key or '<root>'} is a {type(obj).__name__}: only tensors, numbers, strings, "
                    "None, lists, tuples and dicts can be saved (no pickles)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], device: torch.device, source: str) -> Any:
    """Inverse of :func:`_encode`; a tensor saved off the CPU goes to ``device``."""
    if isinstance(obj, list):
        return [_decode(v, tensors, device, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"{source}: tensor {obj['__tensor__']!r} is missing from its .safetensors file")
        tensor = tensors[obj["__tensor__"]]
        return tensor if obj["device"] == "cpu" else tensor.to(device)
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, device, source) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors, device, source): _decode(v, tensors, device, source) for k, v in obj["__dict__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: _decode(v, tensors, device, source) for k, v in obj.items()}


def _save_pair(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<name>.json`` (+ ``<name>.safetensors`` when it holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        encoded = _encode(state, "", tensors)
    except (TypeError, ValueError) as err:
        raise type(err)(f"checkpoint {name}.json: {err}") from None
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(encoded, allow_nan=False) + "\n")


def _load_pair(folder: Path, name: str, device: torch.device) -> Any:
    """Read what :func:`_save_pair` wrote; tensors saved off the CPU go to ``device``. Raises
    ValueError naming the file when its JSON is unreadable or names a tensor the pair lacks."""
    tensor_file, json_file = folder / f"{name}.safetensors", folder / f"{name}.json"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    try:
        encoded = json.loads(json_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_file}: not valid JSON ({err})") from None
    return _decode(encoded, tensors, device, str(json_file))


def _refuse_pickles(path: Path) -> None:
    """Raise ResumeConfigError if ``path`` is an old checkpoint with torch pickles (never loaded):
    ``*.pt`` files, or accelerate's ``fsdp/`` folder of an earlier FSDP checkpoint."""
    pickles = sorted(p.name for p in path.glob("*.pt")) + (["fsdp/"] if (path / "fsdp").exists() else [])
    if pickles:
        raise ResumeConfigError(
            f"cannot resume from {path}: it holds {', '.join(pickles)}, torch pickles written by an older "
            "alignflow, which are never loaded. Set resume: false (or a new output_dir) to start over."
        )


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
"""Name parts wrappers add to parameter names, which torch's state-dict FQNs leave out."""


def is_sharded(modules: dict[str, nn.Module], accelerator: Accelerator) -> bool:
    """Whether the modules' parameters are sharded over the processes (FSDP2's DTensors, or
    accelerate's FSDP): then their state is gathered and scattered by torch's state-dict API."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for module in modules.values() for p in module.parameters())


def _fqn(name: str) -> str:
    for part in _WRAPPERS:
        name = name.replace(part, "")
    return name


def _owner(modules: dict[str, nn.Module]) -> nn.Module:
    """The module whose parameter names key a sharded optimizer's state: the only module, or the
    modules side by side (``0.``, ``1.``, ... in the order the recipe names them)."""
    if len(modules) == 1:
        return next(iter(modules.values()))
    return nn.ModuleDict({str(i): module for i, module in enumerate(modules.values())})


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (torch's state-dict API walks its groups)."""
    return getattr(optimizer, "optimizer", optimizer)


def gather_state_dict(module: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of a sharded module by ``state_dict`` name. A collective: every
    process calls it; the result is empty off the main process.

    ``trainable_only``: the trainable parameters (what a checkpoint holds). Otherwise the whole
    ``state_dict()`` — frozen parameters and persistent buffers too, tied parameters (GPT-2's
    ``lm_head.weight`` and ``transformer.wte.weight``) sharing one tensor as they do in the module,
    so ``save_pretrained`` writes them once as for an unsharded model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=trainable_only))
    if trainable_only:
        buffers = {_fqn(n) for n, _ in module.named_buffers()}
        return {n: t.contiguous() for n, t in state.items() if n not in buffers}
    state = {n: t.contiguous() for n, t in state.items()}
    first: dict[int, str] = {}  # parameter -> its first name
    for name, param in module.named_parameters(remove_duplicate=False):
        name = _fqn(name)
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]
    return state


def _scatter_trainable(module: nn.Module, state: dict[str, torch.Tensor], main: bool, source: str) -> None:
    """Inverse of :func:`gather_state_dict` with ``trainable_only`` (collective): ``state`` is read on the main process only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if main:
        trainable = {_fqn(n) for n, p in module.named_parameters() if p.requires_grad}
        unexpected = sorted(set(state) - trainable)
        if unexpected:
            raise ValueError(f"{source}: weights the model does not train: {unexpected[:5]}")
    set_model_state_dict(module, state if main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))


def _gather_optimizer(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter names (collective; empty off the main process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(_owner(modules), _unwrapped(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _scatter_optimizer(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`_gather_optimizer` (collective): ``state`` is read on the main process only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(_owner(modules), _unwrapped(optimizer), state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


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
        if is_sharded(modules, acc):  # every process gathers; the main one writes
            weights = {fname: gather_state_dict(module, trainable_only=True) for fname, module in modules.items()}
            optim = _gather_optimizer(modules, optimizer)
            if acc.is_main_process:
                for fname, tensors in weights.items():
                    save_file(tensors, str(tmp / fname))
                _save_pair(tmp, "optimizer", optim)
        elif acc.is_main_process:
            for fname, module in modules.items():
                save_file(trainable_state(module), str(tmp / fname))
            _save_pair(tmp, "optimizer", optimizer.state_dict())
        if acc.is_main_process:
            _save_pair(tmp, "scheduler", scheduler.state_dict())
            _save_pair(tmp, "extra", extra)
            # state.json before config.json: a torn folder is recognisable by a missing config.
            write_json(tmp / "state.json", {**state, "num_processes": acc.num_processes})
            write_json(tmp / "config.json", self.config.model_dump(mode="json"))
        _save_pair(tmp, _rng_name(acc.process_index), rng_state())
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
        ``(state, extra)`` (state.json and extra) for the caller to restore the rest.

        Raises ResumeConfigError if the checkpoint holds torch pickles (an older version's
        ``.pt`` files, never loaded), its config differs (see RESUME_IGNORED_FIELDS) or it was
        written by a different number of processes.
        """
        acc = self.accelerator
        _refuse_pickles(path)
        self.check_config(path)
        state = json.loads((path / "state.json").read_text())
        if state["num_processes"] != acc.num_processes:
            raise ResumeConfigError(
                f"cannot resume from {path}: written by {state['num_processes']} processes, now {acc.num_processes}"
            )
        if is_sharded(modules, acc):  # the main process reads; every process takes its shards
            main = acc.is_main_process
            for fname, module in modules.items():
                _scatter_trainable(module, load_file(str(path / fname)) if main else {}, main, str(path / fname))
            _scatter_optimizer(modules, optimizer, _load_pair(path, "optimizer", torch.device("cpu")) if main else {})
        else:
            for fname, module in modules.items():
                load_trainable_state(module, load_file(str(path / fname)), str(path / fname))
            optimizer.load_state_dict(_load_pair(path, "optimizer", device))
        scheduler.load_state_dict(_load_pair(path, "scheduler", device))
        extra = _load_pair(path, "extra", device)
        set_rng_state(_load_pair(path, _rng_name(acc.process_index), torch.device("cpu")))
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
