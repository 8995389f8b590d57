"""FSDP checkpoints are JSON + safetensors like every other (issue 14, point 4: no pickles), and a
run killed after one resumes to the numbers of an uninterrupted run.

FSDP2 (``fully_shard``) runs on CPU with gloo in torch 2.13, so two real processes shard a tiny
Llama (tests/integration/fsdp_checkpoint_worker.py): an uninterrupted reference, a run SIGKILLed
one step after its checkpoint, and a restart that restores it (on spoiled weights) and finishes.
accelerate itself does not switch to FSDP on CPU (it stays MULTI_CPU, i.e. DDP), so the worker
shards the model as accelerate's FSDP2 plugin does and calls the same Checkpointer.

The end of such a run: ``Recipe.save`` on every process writes ``final/`` from the gathered full
weights, the very files an unsharded model with those weights gives (LoRA: adapter + merged/).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.config import LoraSettings
from alignment.models import apply_lora, save_model_folder
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _launch(mode: str, out: Path, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Two processes of the worker in ``mode``, writing under ``out`` (the elastic agent's folder too)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(Path(out) / "elastic"),
         "-m", "tests.integration.fsdp_checkpoint_worker", mode, str(out), *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _files(folder: Path) -> dict[str, bytes]:
    """Each file's bytes; adapter_config.json's ``target_modules`` sorted (peft keeps a set, whose
    order follows the process's string hash seed)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if "adapter_config.json" in files:
        config = json.loads(files["adapter_config.json"])
        config["target_modules"] = sorted(config["target_modules"])
        files["adapter_config.json"] = json.dumps(config).encode()
    return files


def _lora(model_dir: Path):
    return apply_lora(AutoModelForCausalLM.from_pretrained(model_dir),
                      LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "CAUSAL_LM")


def _losses(out: Path, mode: str) -> dict:
    return {rank: json.loads((out / f"losses-{mode}-{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.slow
def test_an_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_numbers_with_no_pickles(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama")
    reference, chain = tmp_path / "reference", tmp_path / "chain"
    done = _launch("reference", reference, model)
    assert done.returncode == 0, done.stderr[-4000:]
    crashed = _launch("crash", chain, model)
    assert crashed.returncode != 0 and "exitcode: -9" in crashed.stderr, crashed.stderr[-4000:]  # SIGKILL
    assert not (chain / "final-crash.safetensors").exists()
    resumed = _launch("resume", chain, model)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    want, got = load_file(str(reference / "final-reference.safetensors")), load_file(str(chain / "final-resume.safetensors"))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    before = load_file(str(model / "model.safetensors"))
    assert any(not torch.equal(want[n], before[n]) for n in before)  # it trained
    for rank in (0, 1):  # the steps after the checkpoint see the same losses
        ref, res = _losses(reference, "reference")[rank], _losses(chain, "resume")[rank]
        assert list(res) == ["3", "4"] and res == {k: ref[k] for k in res}

    ckpt = chain / "checkpoints" / "step-000002"
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                                       "state.json", "config.json", "rng.json", "rng-1.json", "rng-1.safetensors"}
    for path in files:  # nothing but JSON and safetensors: no pickle anywhere
        assert path.suffix in (".json", ".safetensors"), path
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_file(str(path)) is not None
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".pt", ".bin", ".pkl") or p.name == "fsdp"]
    weights = load_file(str(ckpt / "model.safetensors"))
    assert {n: t.shape for n, t in weights.items()} == {n: t.shape for n, t in before.items()}  # full, not shards
    optimizer = json.loads((ckpt / "optimizer.json").read_text())
    assert set(optimizer["state"]) == set(before)  # keyed by parameter names, not ids


def test_an_earlier_fsdp_checkpoint_of_accelerate_pickles_is_refused_unread(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch import nn

    from alignment.config import TrainSettings
    from alignment.recipes.checkpoint import Checkpointer, ResumeConfigError, is_sharded

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc, config = Accelerator(cpu=True), TrainSettings(output_dir=str(tmp_path))
        model = nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        assert not is_sharded({"m.safetensors": model}, acc)  # one process: the plain path
        ckpt = Checkpointer(tmp_path, acc, config)
        path = ckpt.save(1, {"m.safetensors": model}, optimizer, scheduler, {}, {"step": 1})
        (path / "fsdp").mkdir()
        torch.save({"x": 1}, path / "fsdp" / "optimizer.bin")  # what accelerate's save_state wrote before
        with pytest.raises(ResumeConfigError, match=r"it holds fsdp/, torch pickles"):
            ckpt.load(path, {"m.safetensors": model}, optimizer, scheduler, torch.device("cpu"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_the_final_save_of_an_fsdp_run_writes_the_full_weights_as_an_unsharded_model_would(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from tests.integration.fsdp_checkpoint_worker import LOGIT_IDS

    gpt2, llama = make_tiny_model(tmp_path / "gpt2", "gpt2"), make_tiny_model(tmp_path / "llama", "llama")
    out = tmp_path / "out"
    # Every process saves; one left out of the gather (the old main-process-only save) hangs: TimeoutExpired.
    done = _launch("final", out, gpt2, llama, timeout=150)
    assert done.returncode == 0, done.stderr[-4000:]

    # GPT-2 (tied embeddings): final/ is an ordinary HF folder of the full trained weights.
    want, final = load_file(str(out / "plain-weights.safetensors")), out / "plain" / "final"
    before = load_file(str(gpt2 / "model.safetensors"))
    assert any(not torch.equal(want[n], before[n]) for n in before)  # it trained
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    sharded_logits = load_file(str(out / "plain-logits.safetensors"))["logits"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=LOGIT_IDS).logits, sharded_logits, rtol=1e-5, atol=1e-5)
    unsharded = AutoModelForCausalLM.from_pretrained(gpt2)
    unsharded.load_state_dict(want)
    save_model_folder(unsharded, AutoTokenizer.from_pretrained(gpt2), tmp_path / "unsharded-plain")
    assert _files(final) == _files(tmp_path / "unsharded-plain")  # byte for byte: tied weight once, no DTensor
    assert json.loads((out / "plain" / "summary.json").read_text()) == {"finished": True}

    # Llama under LoRA: the adapter (its weights only, PEFT's names) and merged/ full weights.
    want, final = load_file(str(out / "lora-weights.safetensors")), out / "lora" / "final"
    unsharded = _lora(llama)
    unsharded.load_state_dict(want)  # strict: the gathered names are the peft model's own
    adapter, expected = load_file(str(final / "adapter_model.safetensors")), get_peft_model_state_dict(unsharded)
    assert set(adapter) == set(expected) and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in adapter)
    assert all(torch.equal(adapter[n], expected[n]) for n in expected)
    assert all(adapter[n].abs().sum() > 0 for n in adapter)  # trained: lora_B starts at zero
    sharded_logits = load_file(str(out / "lora-logits.safetensors"))["logits"]
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    assert not [n for n in merged.state_dict() if "lora" in n]
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=LOGIT_IDS).logits, sharded_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=LOGIT_IDS).logits, sharded_logits, rtol=1e-5, atol=1e-5)
    save_model_folder(unsharded, AutoTokenizer.from_pretrained(llama), tmp_path / "unsharded-lora")
    assert _files(final) == _files(tmp_path / "unsharded-lora")


def test_save_model_folder_from_a_given_state_dict_writes_what_the_model_itself_writes(tmp_path):
    """The sharded path (weights handed over, LoRA merged on a copy built from the config) and the
    single-process one write the same bytes: GPT-2's tied embeddings, Llama, plain and LoRA."""
    for kind in ("gpt2", "llama"):
        src = make_tiny_model(tmp_path / kind, kind)
        tokenizer = AutoTokenizer.from_pretrained(src)
        torch.manual_seed(0)
        lora = apply_lora(AutoModelForCausalLM.from_pretrained(src),
                          LoraSettings(r=4, alpha=8, target_modules=["c_attn" if kind == "gpt2" else "q_proj"]),
                          "CAUSAL_LM")
        with torch.no_grad():  # a trained adapter: the merge changes the weights
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        for tag, model in (("plain", AutoModelForCausalLM.from_pretrained(src)), ("lora", lora)):
            own = save_model_folder(model, tokenizer, tmp_path / f"{kind}-{tag}-own")
            given = save_model_folder(model, tokenizer, tmp_path / f"{kind}-{tag}-given",
                                      state_dict=copy.deepcopy(model).state_dict())  # ties kept, model untouched
            assert _files(own) == _files(given), (kind, tag)
        merged, base = load_file(str(own / "merged" / "model.safetensors")), load_file(str(src / "model.safetensors"))
        assert set(merged) == set(base) and any(not torch.equal(merged[n], base[n]) for n in base)
