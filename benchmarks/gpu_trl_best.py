"""Ours against TRL at its best, the reference pass counted over one epoch (issue 16, point 1).

    python3 benchmarks/gpu_trl_best.py --shapes llama1b --dists hh,uniform --repeats 3 --out $OUT
    .venv/bin/python benchmarks/gpu_trl_best.py --device cpu --shapes tiny --dists hh --repeats 1 --steps 2 --warmup 1
    python3 benchmarks/gpu_trl_best.py --shapes qwen0.5b --dists hh4 --families rm,dpo --ours-groups --out $OUT

For each shape, data distribution and family (DPO full, DPO LoRA r16 all-linear, reward model) it
runs, in one process on one device: TRL once untimed-for-the-ratio ("cold": it builds cuDNN
attention plans for every new padded width, which a long run amortises), then ours and TRL
alternately ``--repeats`` times. Every run is a fresh trainer over the same rows: ``--warmup``
steps, then ``--steps`` timed steps (device sync at each step end, as in gpu_bench.py).

TRL's configuration is its best that runs here (TRL 1.16): ``precompute_ref_log_probs=True``
(DPO), ``use_liger_kernel=True`` (Liger's RMSNorm, RoPE and SwiGLU kernels; fused linear
cross-entropy off, as TRL forces for DPO and as the reward model's head needs), and
``padding_free=True`` passed to DPO, where TRL 1.16 warns and falls back to padding (the reward
trainer has no such option). A TRL run that fails with Liger is retried without it and says so.
Ours: ``compile``, ``packing``, ``varlen_attention`` (the best configuration in RESULTS.md),
precomputed reference.

One-epoch tokens/s counts the reference pass: each token is trained once and goes through the
reference pass once, so ``1 / (1/train + 1/ref)`` with both rates in steady state (the first
``--warmup`` reference batches, which compile or build plans, are left out of the reference rate
and reported apart with the other one-off costs). The reward model has no reference pass.

Data: ``uniform`` is gpu_bench.make_pairs (prompt U[L/16, L/4], responses U[L/16, L-prompt-1]);
``hh`` draws prompt and response token counts from log-normal laws with the means of Anthropic
HH-RLHF (helpful) in Llama 2's Table 6 (arXiv:2307.09288): 251.5 tokens per example of which
88.4 are the response, so 163.1 for the prompt with its earlier turns; the spread (sigma 0.8 of
the log) is an assumption, not a published figure. Token counts are clipped to L/2 (prompt) and
L - prompt - 1 (response); the clipped share is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_bench import (  # noqa: E402
    PEAK_DATASHEET,
    SHAPES,
    _trl_common,
    build_shape,
    ceilings,
    make_pairs,
    make_recipe,
    n_params,
    peak_gib,
    rate,
    reset_accelerate,
    reset_memory,
    sync,
    tokenizer_dir,
    words,
    write_rows,
)

DISTS = {"hh": {"prompt_mean": 251.5 - 88.4, "response_mean": 88.4, "sigma": 0.8},
         "hh4": {"prompt_mean": 251.5 - 88.4, "response_mean": 88.4, "sigma": 0.8, "ranked": 4}}
"""Log-normal token-count laws: the means from Llama 2's Table 6 (Anthropic Helpful), sigma assumed;
``hh4``: the same lengths as rankings of 4 responses per prompt in all 6 pairs (UltraFeedback's shape)."""
PAIRS = {("hh", "qwen0.5b"): 16, ("hh", "llama1b"): 8, ("hh", "llama8b"): 8, ("hh", "tiny"): 4}
"""Pairs per step on the real-length data: about the tokens per step of the uniform data's
settings (SHAPES' pairs), within TRL's memory on an 80 GB card (it pads every batch to its longest)."""
FAMILIES = ("dpo", "dpo_lora", "rm")
"""The default families; ``dpo_qlora`` (LoRA on a 4-bit NF4 base, bitsandbytes) is asked for by name."""
LORA_FAMILIES = ("dpo_lora", "dpo_qlora")
LIGER_MODULES = ("transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2")


def lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    """A token count >= 1 from the log-normal law of this mean and log-sigma."""
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)))


def real_pairs(n: int, seq: int, vocab: int, law: dict, seed: int = 0, ranked: int = 0) -> tuple[list[dict], dict]:
    """Rows with prompt/response lengths from ``law`` (clipped to fit ``seq``) and their statistics;
    ``ranked`` K > 1: K responses per prompt compared in all their pairs (the first ``n`` pairs)."""
    rng = random.Random(seed)
    rows, clipped, lens = [], 0, {"prompt": [], "response": []}
    while len(rows) < n:
        p0 = lognormal(rng, law["prompt_mean"], law["sigma"])
        p = min(p0, seq // 2)
        r0 = [lognormal(rng, law["response_mean"], law["sigma"]) for _ in range(max(ranked, 2))]
        r = [min(x, seq - p - 1) for x in r0]
        clipped += (p != p0) + sum(a != b for a, b in zip(r, r0, strict=True))
        lens["prompt"].append(p)
        lens["response"] += r
        prompt, texts = words(rng, p, vocab), [" " + words(rng, x, vocab) for x in r]
        rows += [{"prompt": prompt, "is_chat": False, "chosen": texts[i], "rejected": texts[j], "weight": 1.0}
                 for i in range(len(texts)) for j in range(i + 1, len(texts))]
    rows = rows[:n]
    stats = {k: {"mean": sum(v) / len(v), "max": max(v)} for k, v in lens.items()}
    stats["clipped_share"] = clipped / (len(lens["prompt"]) + len(lens["response"]))
    return rows, stats


# ---------------------------------------------------------------------------- ours
def run_ours(family: str, folder: Path, data: Path, args, *, pairs: int, seq: int) -> dict:
    """Our recipe (best GPU configuration) for warmup + steps steps; steady reference rate per batch."""
    device = args.device_t
    gpu = device.type == "cuda"
    extra = {"varlen_attention": gpu, "max_prompt_length": seq // 2}
    if getattr(args, "ours_groups", False):  # each response of a prompt once a batch (masked attention, not varlen)
        extra |= {"share_prompt": True, "share_responses": True}
    args.qlora = family == "dpo_qlora"
    run = make_recipe("reward" if family == "rm" else "dpo", folder, data, args, pairs=pairs, seq=seq,
                      lora=family in LORA_FAMILIES, compile=gpu and not getattr(args, "ours_eager", False),
                      packing=True, gc_=getattr(args, "gc", False),
                      extra=extra)
    stamps: list[tuple[float, float]] = []
    ref_calls: list[float] = []
    graphs: list[int] = []

    def stamp(rec):
        if rec["phase"] == "train":
            stamps.append((time.perf_counter(), run.tokens_seen))
            graphs.append(compiled_graphs())

    run.callbacks.append(stamp)
    recompiles_before = len(RECOMPILES)
    shapes: list[tuple] = []
    if hasattr(run, "build_data"):
        build = run.build_data

        def build_data():  # note each collated batch's input shape (one row under varlen attention)
            train, evals = build()
            collate = train.collate
            train.collate = lambda ex: _noted(collate(ex), shapes)
            return train, evals

        run.build_data = build_data
    if hasattr(run, "_reference_logps"):
        inner = run._reference_logps

        def timed_ref(batch, module=None):
            sync(device)
            t0 = time.perf_counter()
            out = inner(batch, module)
            sync(device)
            ref_calls.append(time.perf_counter() - t0)
            return out

        run._reference_logps = timed_ref
    reset_memory(device)
    started = time.perf_counter()
    try:
        run.setup()
        setup_s = time.perf_counter() - started
        run.train()
        lengths = run.train_set.lengths
    finally:
        run.cleanup()
    tps, step_s, steps = rate(stamps, args.warmup)
    out = {"tokens_per_s": tps, "step_s": step_s, "timed_steps": steps, "setup_s": setup_s,
           "peak_gib": peak_gib(device), "tokens_per_step": (stamps[-1][1] - stamps[args.warmup - 1][1]) / steps,
           "step_times_s": [round(b[0] - a[0], 4) for a, b in zip(stamps, stamps[1:], strict=False)],
           "graphs_compiled_in_timed_steps": graphs[-1] - graphs[args.warmup - 1], "graphs_per_step": graphs,
           "ref_call_s": ref_calls, "recompiles": RECOMPILES[recompiles_before:],
           "batch_shapes": sorted({tuple(s) for s in shapes})[:8], "batch_shape_count": len(set(shapes))}
    if ref_calls and family != "rm":
        per_call = [sum(lengths[i:i + pairs]) for i in range(0, len(lengths), pairs)][:len(ref_calls)]
        out.update(reference_rate(per_call, ref_calls, args.warmup))
    return out


RECOMPILES: list[str] = []
"""torch.compile's recompilation messages (guard failures) so far in this process."""


class _RecompileLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "ecompil" in message:
            RECOMPILES.append(message[:500])


def watch_recompiles() -> None:
    """Collect every recompilation's reason (``torch._logging`` 'recompiles') into RECOMPILES."""
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(_RecompileLog())


def _noted(batch: dict, shapes: list) -> dict:
    shapes.append(tuple(batch["input_ids"].shape))
    return batch


def compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process (a recompile in a timed window shows here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reference_rate(tokens: list[int], seconds: list[float], skip: int) -> dict:
    """Steady reference-pass tokens/s (batches after the first ``skip``) and the one-off rest."""
    skip = min(skip, len(seconds) - 1)
    steady = sum(tokens[skip:]) / sum(seconds[skip:])
    return {"ref_tokens_per_s": steady, "ref_tokens": sum(tokens), "ref_batches": len(seconds), "ref_total_s": sum(seconds),
            "ref_first_batches_s": sum(seconds[:skip])}


def _site(frames: list[dict]) -> str:
    """Where an allocation was asked for: its innermost frame outside torch (``file:line function``)."""
    for f in frames:
        name = f.get("filename", "")
        if "/torch/" not in name and not name.startswith("<"):
            return f"{'/'.join(Path(name).parts[-2:])}:{f.get('line')} {f.get('name')}"
    return "torch internals"


def peak_composition(events: list[dict], top: int = 15) -> dict:
    """The allocations live at the peak of a recorded allocator history, summed by call site.

    ``events``: one device's trace from ``torch.cuda.memory._snapshot()["device_traces"]`` (dicts with
    ``action``, ``addr``, ``size``, ``frames``). Replays ``alloc`` / ``free_completed`` in order, finds
    the event where the live total is largest, and sums the allocations live there by :func:`_site`.
    Assumes the history began with nothing allocated that is freed later (recording started before
    the run) and that no entries were dropped. Returns ``{"peak_gib", "sites": [[site, GiB], ...]}``."""
    live: dict[int, int] = {}
    total = peak = 0
    peak_at = -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = i
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            del live[e["addr"]]
            total -= e["size"]
        if total > peak:
            peak, peak_at = total, i
    live = {}
    for e in events[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    sites: dict[str, int] = {}
    for e in live.values():
        key = _site(e.get("frames") or [])
        sites[key] = sites.get(key, 0) + e["size"]
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])[:top]
    return {"peak_gib": round(peak / 2**30, 3), "sites": [[k, round(v / 2**30, 3)] for k, v in ranked]}


class MemoryHistory:
    """``--memory-peak``: record the CUDA allocator's history (Python frames) around one run and
    summarise the allocations live at its peak (:func:`peak_composition`); kept in memory, nothing
    pickled to disk. Recording slows a run: use it on runs that are not timed."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and torch.cuda.is_available()

    def __enter__(self):
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            traces = snap.get("device_traces") or [[]]
            self.result = peak_composition(traces[torch.cuda.current_device()])
            self.result["events"] = len(traces[torch.cuda.current_device()])


# ---------------------------------------------------------------------------- TRL
class LigerGlobals:
    """Liger patches module globals (RoPE function, RMSNorm/MLP classes) process-wide: put them back."""

    def __enter__(self):
        import importlib

        self.saved = {name: dict(vars(importlib.import_module(name))) for name in LIGER_MODULES}
        return self

    def __exit__(self, *exc):
        import importlib

        for name, before in self.saved.items():
            module = importlib.import_module(name)
            for key, value in before.items():
                if vars(module).get(key) is not value:
                    setattr(module, key, value)


def run_trl(family: str, folder: Path, rows: list[dict], args, *, pairs: int, seq: int, best: bool = True,
            liger: bool = True) -> dict:
    """TRL 1.16 DPOTrainer / RewardTrainer at its best settings (``best``) or its defaults."""
    import datasets
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    device = args.device_t
    stamps: list[tuple[float, float]] = []
    ref_calls: list[tuple[float, int]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            sync(device)
            stamps.append((time.perf_counter(), state.num_input_tokens_seen))

    frame = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(folder))
    lora = family in LORA_FAMILIES
    load = {"dtype": getattr(torch, args.base_dtype)}
    if family == "dpo_qlora":  # the same NF4 settings as alignment.models' QLoRA
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    peft_config = (LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM") if lora else None)
    common = _trl_common(args, pairs, seq, args.work) | {"gradient_checkpointing": getattr(args, "gc", False)}
    if best and liger:
        common |= {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False}}
    original = DPOTrainer.compute_ref_log_probs

    def timed_ref(self, model, inputs):
        sync(device)
        t0 = time.perf_counter()
        out = original(self, model, inputs)
        sync(device)
        ref_calls.append((time.perf_counter() - t0, int(inputs["attention_mask"].sum())))
        return out

    reset_memory(device)
    started = time.perf_counter()
    caught: list[str] = []
    with LigerGlobals(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            if family == "rm":
                model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **load)
                model.config.pad_token_id = tok.pad_token_id
                trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=frame,
                                        processing_class=tok, callbacks=[Stamp()])
            else:
                dpo = {"padding_free": True, "precompute_ref_log_probs": True} if best else {}
                model = AutoModelForCausalLM.from_pretrained(folder, **load)
                DPOTrainer.compute_ref_log_probs = timed_ref
                trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common, **dpo), train_dataset=frame,
                                     processing_class=tok, peft_config=peft_config, callbacks=[Stamp()])
            setup_s = time.perf_counter() - started
            trainer.train()
            padding_free_ran = getattr(trainer, "padding_free", None)
        finally:
            DPOTrainer.compute_ref_log_probs = original
            caught = sorted({str(w.message)[:160] for w in seen if "liger" in str(w.message).lower()
                             or "padding_free" in str(w.message)})
            if "trainer" in locals():
                trainer.accelerator.free_memory()
                del trainer
    tps, step_s, steps = rate(stamps, args.warmup)
    out = {"tokens_per_s": tps, "step_s": step_s, "timed_steps": steps, "setup_s": setup_s,
           "peak_gib": peak_gib(device), "tokens_per_step": (stamps[-1][1] - stamps[args.warmup - 1][1]) / steps,
           "liger": best and liger, "padding_free_ran": padding_free_ran, "trl_warnings": caught}
    if ref_calls:
        out.update(reference_rate([n for _, n in ref_calls], [t for t, _ in ref_calls], args.warmup))
    return out


def trl_best(family, folder, rows, args, *, pairs, seq) -> dict:
    """TRL at its best; if Liger fails here, the same without Liger (the error recorded).

    Out of memory is not a Liger failure: it is raised, not retried. The retry runs after the
    failed run's exception is gone: its traceback holds the frames, and so the model, of that
    run (run 17, RESULTS.md: a retry inside the ``except`` block ran out of memory moving a
    second 8B model to the card)."""
    try:
        return run_trl(family, folder, rows, args, pairs=pairs, seq=seq)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - recorded; the comparison goes on without Liger
        traceback.print_exc()
        liger_error = f"{type(err).__name__}: {err}"[:300]
    reset_accelerate()
    reset_memory(args.device_t)
    out = run_trl(family, folder, rows, args, pairs=pairs, seq=seq, liger=False)
    out["liger_error"] = liger_error
    return out


# ---------------------------------------------------------------------------- longest sequence
def long_pair(length: int, vocab: int, seed: int = 0) -> dict:
    """One pair whose prompt + response is ``length`` tokens: prompt length/4, each response the rest."""
    from benchmarks.gpu_bench import words

    rng = random.Random(seed)
    prompt = length // 4
    response = length - prompt - 1
    return {"prompt": words(rng, prompt, vocab), "is_chat": False, "chosen": " " + words(rng, response, vocab),
            "rejected": " " + words(rng, response, vocab), "weight": 1.0}


def length_probe(family: str, side: str, folder: Path, vocab: int, length: int, args) -> dict:
    """One pair per step of ``length`` tokens (both responses: 2 sequences), 2 steps; peak memory or OOM.

    With ``args.probe_gc`` both sides checkpoint every decoder layer (the usual way to go long). Out of
    memory is ``fits: False``; any other failure is ``fits: None`` with its error (not a size limit)."""
    import copy

    probe = copy.copy(args)
    probe.warmup, probe.steps = 1, 1
    probe.gc = bool(getattr(args, "probe_gc", False))
    rows = [long_pair(length, vocab, seed) for seed in range(2)]
    try:
        if side == "ours":
            path = write_rows(rows, args.work / f"long-{length}.parquet")
            out = run_ours(family, folder, path, probe, pairs=1, seq=length)
        else:
            out = trl_best(family, folder, rows, probe, pairs=1, seq=length)  # a Liger failure retried
        return {"fits": True, "peak_gib": out["peak_gib"], "step_s": out["step_s"], "tokens_per_s": out["tokens_per_s"]}
    except torch.OutOfMemoryError as err:
        return {"fits": False, "error": str(err)[:200]}
    except Exception as err:  # noqa: BLE001 - recorded: a failing probe must not lose the records before it
        traceback.print_exc()
        return {"fits": None, "error": f"{type(err).__name__}: {err}"[:300]}


# ---------------------------------------------------------------------------- driver
def epoch_rate(r: dict) -> float:
    """Tokens/s over one epoch: training plus, where there is one, the precomputed reference pass."""
    ref = r.get("ref_tokens_per_s")
    return 1 / (1 / r["tokens_per_s"] + 1 / ref) if ref else r["tokens_per_s"]


def flops_per_token(family: str, params: int) -> float:
    """Model FLOPs per trained token: 6N for a full fine-tune (forward 2N, backward 4N), 4N under
    LoRA (the frozen base's weight gradients are not computed; the rank-16 adapters' are negligible)."""
    return (4 if family in LORA_FAMILIES else 6) * params


def plan(args) -> list[tuple]:
    """(shape, dist, family, side, repeat) in run order: TRL cold for each family first, then
    repeat by repeat ours/TRL alternating over the families (a budget cut loses repeats, not families).
    ``--repeats 0`` plans nothing (the cold run only warms TRL for timed repeats): the length probes alone."""
    todo = []
    families = args.families.split(",")
    for shape in args.shapes.split(","):
        for dist in args.dists.split(","):
            reps = args.repeats if dist == args.dists.split(",")[0] else args.other_repeats
            if reps == 0:
                continue
            todo += [(shape, dist, family, "trl", "cold") for family in families]
            for rep in range(reps):
                for family in families:
                    todo += [(shape, dist, family, "ours", rep), (shape, dist, family, "trl", rep)]
            if args.trl_default:
                todo.append((shape, dist, "dpo", "trl_default", 0))
    return todo


def summary(results: list[dict], ceil: dict) -> str:
    """Markdown: per (shape, dist, family) median and range of ours and TRL, ratios, memory."""
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else float("nan")

    lines = ["| shape | data | family | side | runs | train tok/s med [min-max] | one-epoch tok/s med [min-max] | "
             "ref tok/s | peak GiB | tok/step | epoch ratio (train ratio) | mem ratio | MFU meas./989 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["shape"], r["dist"], r["family"]) for r in results}, key=str)
    for key in keys:
        group = [r for r in results if (r["shape"], r["dist"], r["family"]) == key and "error" not in r]
        by_side = {}
        for side in ("ours", "trl", "trl_default"):
            runs = [r for r in group if r["side"] == side and r["repeat"] != "cold"]
            if runs:
                by_side[side] = runs
        trl = by_side.get("trl")
        for side, runs in by_side.items():
            tr, ep = [r["tokens_per_s"] for r in runs], [epoch_rate(r) for r in runs]
            ratio = mem = mfu = ""
            if side == "ours" and trl:
                ratio = (f"{med(ep) / med([epoch_rate(r) for r in trl]):.2f}x "
                         f"({med(tr) / med([r['tokens_per_s'] for r in trl]):.2f}x)")
                mem = f"{max(r['peak_gib'] or 0 for r in runs) / max(r['peak_gib'] or 1 for r in trl):.2f}x"
            if side in ("ours", "trl") and ceil.get("matmul_tflops"):
                tf = med(tr) * flops_per_token(key[2], runs[0]["params"]) / 1e12
                mfu = f"{100 * tf / ceil['matmul_tflops']:.1f}% / {100e12 * tf / PEAK_DATASHEET:.1f}%"
            ref = med([r["ref_tokens_per_s"] for r in runs if r.get("ref_tokens_per_s")])
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {side} | {len(runs)} | {med(tr):,.0f} "
                         f"[{min(tr):,.0f}-{max(tr):,.0f}] | {med(ep):,.0f} [{min(ep):,.0f}-{max(ep):,.0f}] | "
                         f"{'' if math.isnan(ref) else f'{ref:,.0f}'} | "
                         f"{max(r['peak_gib'] or 0 for r in runs):.1f} | {med([r['tokens_per_step'] for r in runs]):,.0f}"
                         f" | {ratio} | {mem} | {mfu} |")
    for r in results:
        if "error" in r:
            lines.append(f"ERROR {r['shape']}/{r['dist']}/{r['family']}/{r['side']}/{r['repeat']}: {r['error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama1b")
    parser.add_argument("--dists", default="hh,uniform", help="first gets --repeats, the others --other-repeats")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--other-repeats", type=int, default=1)
    parser.add_argument("--trl-default", action="store_true", help="also TRL DPO in its default configuration")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="/tmp/gpu_bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_bench_out"))
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no run after this many seconds")
    parser.add_argument("--pairs", type=int, default=0, help="pairs per step for every shape (0: PAIRS / SHAPES)")
    parser.add_argument("--base-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights as loaded, both sides (bfloat16 for the 8B shape on one card)")
    parser.add_argument("--lengths", default="", help="after the timed runs: longest sequence probe at these "
                        "token counts (one pair per step), per family and side, up to the first that does not fit")
    parser.add_argument("--ours-groups", action="store_true", help="ours with share_prompt and share_responses "
                        "(response groups; for the ranked data, --dists hh4)")
    parser.add_argument("--ours-eager", action="store_true", help="ours without torch.compile (to tell what the "
                        "compiled graphs cost or save, e.g. memory under QLoRA)")
    parser.add_argument("--probe-sides", default="ours,trl", help="which sides the length probes run (a side "
                        "already probed on the same case need not be paid for again)")
    parser.add_argument("--memory-peak", action="store_true", help="record the allocator's history in each run "
                        "and report what is live at its peak, by call site (slows the runs: not for timings)")
    parser.add_argument("--probe-gc", action="store_true", help="the length probes with gradient checkpointing "
                        "on both sides")
    args = parser.parse_args()
    started = time.perf_counter()
    args.device_t = torch.device(args.device)
    args.precision = "bf16" if args.device_t.type == "cuda" else "fp32"
    args.work = Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    watch_recompiles()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "liger_kernel", "triton"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", None) or __import__("importlib.metadata").metadata.version(
                name.replace("_", "-"))
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            env[name] = f"missing ({err})"
    ceil = ceilings(args.device_t) if args.device_t.type == "cuda" else {}
    print("# env", json.dumps(env), "\n# ceilings", json.dumps(ceil), flush=True)
    log = (out_dir / "trl_best.jsonl").open("a")
    log.write(json.dumps({"env": env, "ceilings": ceil, "argv": sys.argv}) + "\n")
    data_cache: dict = {}
    results = []
    for shape, dist, family, side, rep in plan(args):
        if time.perf_counter() - started > args.budget_s:
            print(f"# skip {shape}/{dist}/{family}/{side}/{rep}: over budget", flush=True)
            continue
        spec = SHAPES[shape]
        seq = spec["seq"]
        law = "hh" if dist == "hh4" else dist  # the same lengths, so the same pairs a step
        pairs = args.pairs or (PAIRS.get((law, shape), spec["pairs"]) if dist != "uniform" else spec["pairs"])
        folder = build_shape(args.work, shape, args.device_t)
        if (shape, dist) not in data_cache:
            n = pairs * (args.warmup + args.steps)
            rows, stats = (make_pairs(n, seq, spec["vocab_size"]), {}) if dist == "uniform" else real_pairs(
                n, seq, spec["vocab_size"], DISTS[dist], ranked=DISTS[dist].get("ranked", 0))
            data_cache[shape, dist] = rows, stats, write_rows(rows, args.work / f"trlbest-{shape}-{dist}-{n}.parquet")
        rows, stats, path = data_cache[shape, dist]
        record = {"shape": shape, "dist": dist, "family": family, "side": side, "repeat": rep, "seq": seq,
                  "pairs": pairs, "params": n_params(folder), "data_stats": stats}
        t0 = time.perf_counter()
        history = MemoryHistory(args.memory_peak)
        try:
            with history:
                if side == "ours":
                    record.update(run_ours(family, folder, path, args, pairs=pairs, seq=seq))
                elif side == "trl":
                    record.update(trl_best(family, folder, rows, args, pairs=pairs, seq=seq))
                else:
                    record.update(run_trl(family, folder, rows, args, pairs=pairs, seq=seq, best=False))
            record["epoch_tokens_per_s"] = epoch_rate(record)
            if history.enabled:
                record["memory_at_peak"] = history.result
        except Exception as err:  # noqa: BLE001 - one failing run must not lose the others
            record["error"] = f"{type(err).__name__}: {err}"[:400]
            traceback.print_exc()
        finally:
            reset_accelerate()
            reset_memory(args.device_t)
        record["wall_s"] = time.perf_counter() - t0
        results.append(record)
        log.write(json.dumps(record, default=str) + "\n")
        log.flush()
        brief = {k: record.get(k) for k in ("tokens_per_s", "epoch_tokens_per_s", "ref_tokens_per_s", "peak_gib",
                                             "wall_s", "graphs_compiled_in_timed_steps", "liger_error", "memory_at_peak",
                                             "error") if record.get(k) is not None}
        print(f"# {shape}/{dist}/{family}/{side}/{rep} {json.dumps(brief, default=str)}", flush=True)
    for family in args.families.split(",") if args.lengths else []:
        shape = args.shapes.split(",")[0]
        folder = build_shape(args.work, shape, args.device_t)
        for side in args.probe_sides.split(","):
            for length in (int(n) for n in args.lengths.split(",")):
                if time.perf_counter() - started > args.budget_s:
                    break
                t0 = time.perf_counter()
                record = {"shape": shape, "family": family, "side": side, "probe_length": length,
                          "gradient_checkpointing": args.probe_gc,
                          **length_probe(family, side, folder, SHAPES[shape]["vocab_size"], length, args)}
                reset_accelerate()
                reset_memory(args.device_t)
                record["wall_s"] = time.perf_counter() - t0
                log.write(json.dumps(record, default=str) + "\n")
                log.flush()
                print(f"# length {json.dumps(record, default=str)}", flush=True)
                if not record["fits"]:
                    break
    text = summary(results, ceil)
    (out_dir / "trl_best_table.md").write_text(text + "\n")
    print(f"\n# ceilings {json.dumps(ceil)}\n# total {time.perf_counter() - started:.0f}s\n{text}")


if __name__ == "__main__":
    main()
