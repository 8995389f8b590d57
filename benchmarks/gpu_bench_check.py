"""Optimized against plain training path on the same batch: losses and gradients (issue 6, item 5).

Used by ``benchmarks/gpu_bench.py --groups check``. For DPO and the reward model, one batch of
ragged pairs goes through:

* ``fp32``       — the plain path without autocast: padded batch, the model's own forward with
  full logits, ``log_softmax`` over the vocabulary (DPO) or the model's own last-token pooling
  (reward model). The reference for the errors below.
* ``plain_bf16`` — the same plain path under bf16 autocast: what "bf16 tolerance" means here.
* ``opt_eager``  — our path: packed batch (restarting position ids, no padding), label
  log-probs from hidden states with the chunked LM head (DPO) / head on the last hidden state
  of each sequence (reward model), under bf16 autocast.
* ``opt_compiled`` — the same with :func:`alignment.fast_paths.compile_layers` (compiled decoder
  layers and log-prob blocks).
* ``opt_causalpad`` — the padded batch *without* its padding mask
  (``TrainSettings.causal_padding``: causal flash attention) and compiled, as above.
* ``opt_varlen`` — the packed batch through variable-length flash attention
  (``TrainSettings.varlen_attention``) and compiled.
* ``opt_shared`` — each pair's prompt once (``TrainSettings.share_prompt``,
  :mod:`alignment.prompt_sharing`: SDPA with the sharing mask) and compiled.

The DPO loss uses fixed reference log-probs (the fp32 log-probs plus seeded offsets), so it is
not the trivial ln 2 of a policy equal to its reference, and both paths see the same reference.
Errors: relative L2 ``|x - x_fp32| / |x_fp32|`` of per-sequence log-probs (rewards), of the
loss, and of the flattened gradient of every parameter. An optimized path PASSES when each of
its errors is within 3x the plain bf16 path's error (or under a small floor: 1e-3 for
log-probs and loss, 1e-2 for gradients).
"""

from __future__ import annotations

import gc

import torch

from alignment.batching import Truncation, collate_pairs, to_device, tokenize_pairs
from alignment.fast_paths import compile_layers, set_causal_padding, set_varlen_attention
from alignment.losses import dpo_loss, reward_loss
from alignment.models import CausalLMLogps, ScalarReward
from benchmarks.gpu_bench import tokenizer_dir

FLOORS = {"values": 1e-3, "loss": 1e-3, "grad": 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _grads(model) -> torch.Tensor:
    flat = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return flat


def _compare(results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """Errors of every path against ``fp32`` and the pass/fail verdict of the optimized ones."""
    ref_v, ref_l, ref_g = results["fp32"]
    out: dict = {}
    for name, (values, loss, grad) in results.items():
        if name == "fp32":
            continue
        out[name] = {"values": _rel(values, ref_v), "loss": _rel(loss, ref_l), "grad": _rel(grad, ref_g),
                     "grad_cos": float(torch.nn.functional.cosine_similarity(grad.double(), ref_g.double(), dim=0))}
    plain = out["plain_bf16"]
    for name in [n for n in out if n.startswith("opt")]:
        limits = {k: max(3 * plain[k], FLOORS[k]) for k in FLOORS}
        out[name]["pass"] = all(out[name][k] <= limits[k] for k in FLOORS)
        out[name]["limits"] = limits
    return out


PATHS = ("fp32", "plain_bf16", "opt_eager", "opt_compiled", "opt_causalpad", "opt_varlen", "opt_shared")


def _batch_of(path: str, padded: dict, packed: dict, shared: dict) -> dict:
    return padded if path == "opt_causalpad" else shared if path == "opt_shared" else packed


def _batches(tok, rows, seq: int, device, append_eos: bool):
    examples, _ = tokenize_pairs(tok, rows, Truncation(seq, seq // 4, "truncate", tok.bos_token_id),
                                 append_eos=append_eos)
    padded = collate_pairs(examples, pad_id=tok.pad_token_id, packing=False, pad_to_multiple_of=8)
    packed = collate_pairs(examples, pad_id=tok.pad_token_id, packing=True)
    shared = collate_pairs(examples, pad_id=tok.pad_token_id, packing=True, share_prompt=True)
    return to_device(padded, device), to_device(packed, device), to_device(shared, device)


def dpo_check(folder, rows, seq: int, device: torch.device, chunk_size: int = 512) -> dict:
    """DPO loss, per-sequence log-probs and gradients: plain paths vs our optimized ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    padded, packed, shared = _batches(tok, rows, seq, device, append_eos=True)
    n = len(rows)
    gen = torch.Generator().manual_seed(0)
    offsets = (5 * torch.randn(2 * n, generator=gen)).to(device)
    ref: dict[str, torch.Tensor] = {}

    def plain(autocast: bool) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        labels = padded["labels"]
        valid = labels != -100
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        return (logp * valid).sum(-1)  # one sequence per row: chosen rows, then rejected rows

    def loss_of(seq_logps: torch.Tensor) -> torch.Tensor:
        if not ref:
            base = seq_logps.detach() + offsets
            ref["c"], ref["r"] = base[:n], base[n:]
        losses, _, _ = dpo_loss(seq_logps[:n], seq_logps[n:], ref["c"], ref["r"], beta=0.1, loss_type="sigmoid")
        return losses.mean()

    results = {}
    for name in PATHS:
        if name.startswith("opt"):
            module = CausalLMLogps(model, chunk_size)
            set_causal_padding(module, name == "opt_causalpad")
            set_varlen_attention(module, name == "opt_varlen")
            if name != "opt_eager":
                compile_layers(module)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                seq_logps = module(_batch_of(name, padded, packed, shared))["seq_logps"]
        else:
            seq_logps = plain(autocast=name == "plain_bf16")
        loss = loss_of(seq_logps)
        loss.backward()
        results[name] = (seq_logps.detach().float(), loss.detach().float(), _grads(model))
    out = _compare(results)
    out["loss_fp32"] = float(results["fp32"][1])
    results.clear()
    gc.collect()
    return out


def rm_check(folder, rows, seq: int, device: torch.device) -> dict:
    """Bradley-Terry loss, rewards and gradients: HF's padded forward vs our packed one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(folder))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = model.to(device).train()
    padded, packed, shared = _batches(tok, rows, seq, device, append_eos=False)
    n = len(rows)
    results = {}
    for name in PATHS:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name != "fp32"):
            if name.startswith("opt"):
                module = ScalarReward(model)
                set_causal_padding(module, name == "opt_causalpad")
                set_varlen_attention(module, name == "opt_varlen")
                if name != "opt_eager":
                    compile_layers(module)
                rewards = module(_batch_of(name, padded, packed, shared))
            else:
                rewards = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, 0]
        rewards = rewards.float()
        loss = reward_loss(rewards[:n], rewards[n:], None, center_coef=0.0).mean()
        loss.backward()
        results[name] = (rewards.detach(), loss.detach(), _grads(model))
    out = _compare(results)
    out["loss_fp32"] = float(results["fp32"][1])
    del model, results
    gc.collect()
    return out
