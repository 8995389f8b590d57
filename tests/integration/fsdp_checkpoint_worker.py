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

* ``final OUT GPT2 LLAMA``: the end of a run, :meth:`alignment.recipes.base.Recipe.save` itself,
  for a tiny GPT-2 (tied embeddings) and a tiny Llama under LoRA, each sharded inside a wrapper
  as a recipe's ``train_module`` is and trained two steps; every process calls the save. Writes
  ``OUT/<name>/`` (the run folder: ``final/``, ``summary.json``) and, from the main process,
  ``OUT/<name>-weights.safetensors`` (the full weights gathered by torch directly) and
  ``OUT/<name>-logits.safetensors`` (the sharded model's logits on fixed inputs).
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
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.config import DPOConfig, LoraSettings
from alignment.models import apply_lora, hf_model
from alignment.recipes.base import Recipe
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


LOGIT_IDS = torch.tensor([[5, 9, 14, 22, 31, 7, 40, 12], [8, 8, 19, 27, 3, 33, 16, 50]])
"""Fixed inputs whose logits the test compares with the saved models' (ids below every tiny vocab)."""


class Policy(nn.Module):
    """What accelerate shards: the recipe's ``train_module``, a wrapper whose child is ``Recipe.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


class Run:
    """The parts of a recipe that :meth:`Recipe.save` reads."""

    def __init__(self, output_dir: Path, accelerator: Accelerator, model: nn.Module, tokenizer) -> None:
        self.output_dir, self.accelerator, self.model, self.tokenizer = output_dir, accelerator, model, tokenizer
        self.config = DPOConfig(model={"name_or_path": "unused"}, keep_checkpoints_after_finish=True)

    def summary(self, finished: bool) -> dict:
        return {"finished": finished}


def final(out: str, gpt2_dir: str, llama_dir: str) -> None:
    acc = Accelerator(cpu=True)
    rank, mesh = acc.process_index, init_device_mesh("cpu", (acc.num_processes,))
    for name, model_dir, lora in (("plain", gpt2_dir, None), ("lora", llama_dir, ["q_proj", "v_proj"])):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if lora:
            model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=lora), "CAUSAL_LM")
        policy = Policy(model)
        blocks = set(hf_model(model)._no_split_modules)  # accelerate's FSDP2 auto-wrap: the decoder blocks
        for module in list(policy.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        for number in (1, 2):
            ids = torch.randint(4, hf_model(model).config.vocab_size, (2, 12),
                                generator=torch.Generator().manual_seed(100 * number + rank))
            policy(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        run = Run(Path(out, name), acc, model, AutoTokenizer.from_pretrained(model_dir))
        Recipe.save(run, finished=True)  # every process: the gather is a collective
        with torch.no_grad():
            logits = policy(input_ids=LOGIT_IDS).logits
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if acc.is_main_process:
            save_file({k: v.clone() for k, v in full.items()}, str(Path(out, f"{name}-weights.safetensors")))
            save_file({"logits": logits.contiguous()}, str(Path(out, f"{name}-logits.safetensors")))
        acc.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "final":
        final(*sys.argv[2:5])
    else:
        main(*sys.argv[1:4])
    # Every output is written and the process group destroyed; skip interpreter finalization, where gloo's
    # worker threads can still hold tensors and abort the process ("terminate called without an active
    # exception", seen once in four full runs on a loaded 2-core machine; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
