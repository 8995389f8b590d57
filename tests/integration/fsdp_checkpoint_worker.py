"""One process of tests/integration/test_fsdp_checkpoint.py, launched by ``torch.distributed.run``.

A tiny Llama sharded with FSDP2 (``fully_shard`` per decoder layer and at the root, gloo on CPU)
trains with AdamW and an lr schedule; :class:`alignment.recipes.checkpoint.Checkpointer` writes and
restores its checkpoints. Modes:

* ``reference OUT``: steps 1-4 uninterrupted (a checkpoint at step 2), then the final weights;
* ``crash OUT``: steps 1-3 with a checkpoint at step 2, then every process SIGKILLs itself;
* ``resume OUT``: a model whose weights are spoiled first, restored from OUT's newest checkpoint,
  then the steps after it and the final weights.

Each writes ``OUT/losses-<mode>.json`` (step -> this process's loss) and, at the end, the gathered
full weights to ``OUT/final-<mode>.safetensors`` (main process).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from alignment.config import DPOConfig
from alignment.recipes.checkpoint import Checkpointer

STEPS, SAVE_AT = 4, 2


def build(model_dir: str, world: int):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + s))
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, number: int, rank: int) -> float:
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(100 * number + rank))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def main(mode: str, out: str, model_dir: str) -> None:
    acc = Accelerator(cpu=True)  # MULTI_CPU: gloo process group, main process, barriers
    rank = acc.process_index
    model, optimizer, scheduler = build(model_dir, acc.num_processes)
    config = DPOConfig(model={"name_or_path": model_dir}, output_dir=out, keep_checkpoints=3)
    checkpointer = Checkpointer(Path(out), acc, config)
    modules = {"model.safetensors": model}
    first = 1
    if mode == "resume":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # spoiled: only a real restore gives the reference's numbers back
        latest = checkpointer.latest()
        state, _ = checkpointer.load(latest, modules, optimizer, scheduler, torch.device("cpu"))
        first = state["step"] + 1
    losses = {}
    for number in range(first, STEPS + 1):
        losses[number] = step(model, optimizer, scheduler, number, rank)
        if number == SAVE_AT and mode != "resume":
            checkpointer.save(number, modules, optimizer, scheduler, {}, {"step": number})
        if mode == "crash" and number == SAVE_AT + 1:
            Path(out, f"losses-{mode}-{rank}.json").write_text(json.dumps(losses))
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup
    Path(out, f"losses-{mode}-{rank}.json").write_text(json.dumps(losses))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in full.items()}, str(Path(out, f"final-{mode}.safetensors")))
    acc.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
