"""GPU training and generation speed: our trainers against TRL, side by side in one run (issue 6).

    python3 benchmarks/gpu_bench.py --shapes qwen0.5b --groups ceilings,train,gen,check --out $OUT
    python3 benchmarks/gpu_bench.py --shapes llama1b --groups train --cases trl_dpo,ours_dpo_compile
    python3 benchmarks/gpu_bench.py --shapes qwen0.5b,llama1b --groups scale,rl
    .venv/bin/python benchmarks/gpu_bench.py --device cpu --shapes tiny --steps 2 --warmup 1   # dry run

Models are the Qwen2.5-0.5B and Llama-3.2-1B *shapes* built from config with random weights (no
downloads), saved once in fp32 with a word-level tokenizer of the same vocabulary size. Data is
synthetic with a spread of lengths at sequence length L: prompt U[L/16, L/4] tokens, each
response U[L/16, L - prompt - 1] (+ EOS), so batches are ragged as real preference data is.

Matched settings for every training case (ours and TRL): fp32 weights under bf16 autocast, no
gradient checkpointing (except the ``_gc`` variant), no dropout, fused AdamW, constant lr,
clipping at 1.0, the same pairs per step and the same data. Steps are timed after ``--warmup``
untimed ones with a device sync at each step end. tokens/s counts the non-padding tokens of both
sequences of every pair (prompt + response, twice), for TRL from its ``non_padding`` token
counter: the same definition. Peak memory is ``torch.cuda.max_memory_allocated`` of the case.
MFU counts 6N FLOPs per trained token plus 2N per reference-forward token (N = all parameters,
the LM head / tied embedding included, as in the issue), against the bf16 matmul rate measured
in the same run (``ceilings``) and against 989 TFLOP/s. LoRA cases get no MFU (not 6N work).

Groups: ``ceilings`` (bf16 8192^3 matmul, device copy), ``train`` (DPO full/LoRA and reward
model, ours and TRL), ``check`` (optimized vs plain path: losses and gradients, pass/fail, see
benchmarks/gpu_bench_check.py), ``gen`` (batch 64 x 128-token prompts x 256 new tokens: ours vs
``model.generate``), ``rl`` (PPO and GRPO steps: rollout generation and update separately),
``scale`` (our DPO over sequence length 512-4096). Results go to ``--out``/results.jsonl as each
case ends; a markdown table prints last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_DATASHEET = 989e12
SHAPES = {
    # Qwen2.5-0.5B: 24 x 896, GQA 14/2, vocab 151936, tied embeddings, qkv bias (Qwen2 attention).
    "qwen0.5b": dict(kind="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                     seq=1024, pairs=8),
    # Llama-3.2-1B: 16 x 2048, GQA 32/8, vocab 128256, tied embeddings.
    "llama1b": dict(kind="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                    seq=2048, pairs=4),
    # Llama-3.1-8B: 32 x 4096, GQA 32/8, MLP 14336, vocab 128256, untied embeddings; saved in bf16
    # (16 GB; fp32 would be 32 GB on disk and on the card), for LoRA/QLoRA on one GPU (issue 16 point 3).
    "llama8b": dict(kind="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                    seq=2048, pairs=4, tie=False, save_dtype="bfloat16", positions=131072),
    # CPU dry runs.
    "tiny": dict(kind="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=1e4, seq=128, pairs=4),
}
TRAIN_CASES = ["trl_dpo", "ours_dpo", "ours_dpo_cudnn", "ours_dpo_padded", "ours_dpo_compile", "ours_dpo_refcopy",
               "ours_dpo_gc", "trl_dpo_lora", "ours_dpo_lora", "ours_dpo_lora_compile", "trl_rm", "ours_rm",
               "ours_rm_compile", "trl_dpo_nocudnn", "ours_dpo_compile_causalpad", "ours_dpo_compile_varlen",
               "ours_rm_compile_causalpad", "ours_rm_compile_varlen", "ours_dpo_lora_compile_varlen",
               "ours_dpo_compile_shared", "ours_rm_compile_shared"]
"""Case names: ``trl_*`` TRL, ``ours_*`` our recipes; ``_lora`` LoRA r16 all-linear, ``_compile``
regional torch.compile, ``_padded`` no packing, ``_refcopy`` reference forward every step (a
frozen copy, as TRL does), ``_gc`` gradient checkpointing, ``_causalpad`` right-padded batches without the padding mask
(causal flash attention; ``TrainSettings.causal_padding``), ``_varlen`` packed batches through variable-length
flash attention (``TrainSettings.varlen_attention``), ``_shared`` each pair's prompt once
(``TrainSettings.share_prompt``), ``_nooverlap`` metrics read at the end of each step
(``overlap_steps: false``; the default overlaps on CUDA), ``ours_*_cudnn`` allows cuDNN attention
(our default leaves it off), ``trl_*_nocudnn`` TRL with cuDNN attention off."""
BASELINE = {"dpo": "trl_dpo", "dpo_lora": "trl_dpo_lora", "rm": "trl_rm"}


def length_reward(prompts, responses):
    """RL cases' reward function: response length in words / 100 (cheap, deterministic)."""
    return [len(r.split()) / 100.0 for r in responses]


# ---------------------------------------------------------------------------- fixtures
def tokenizer_dir(folder: Path) -> Path:
    """The tokenizer's own folder: next to the model, since AutoTokenizer would pick the model type's
    tokenizer class (e.g. Qwen2's BPE) for a folder with a config.json and mangle the word-level one."""
    return folder.with_name(folder.name + "-tokenizer")


def build_shape(work: Path, name: str, device: torch.device) -> Path:
    """Save the random-weight model of shape ``name`` (fp32) to ``work/name`` and a word-level
    tokenizer of the same vocabulary to :func:`tokenizer_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    folder = work / name
    if (folder / "config.json").exists():
        return folder
    spec = SHAPES[name]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"])}
    vocab.update({f"w{i}": i + 4 for i in range(spec["vocab_size"] - 4)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rope_theta")
    common = {k: spec[k] for k in keys} | dict(max_position_embeddings=max(8192, spec.get("positions", 0)),
                                                tie_word_embeddings=spec.get("tie", True),
                                                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if spec["kind"] == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, spec.get("save_dtype", "float32")))  # built in it: no fp32 copy
    try:
        with torch.device(device):
            model = cls(cfg(**common))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    tok.save_pretrained(tokenizer_dir(folder))
    del model
    return folder


def words(rng: random.Random, n: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(n))


def make_pairs(n: int, seq: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Preference rows at sequence length ``seq`` with the module docstring's length spread."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = rng.randint(seq // 16, seq // 4)
        c, r = (rng.randint(seq // 16, seq - p - 1) for _ in range(2))
        rows.append({"prompt": words(rng, p, vocab_size), "is_chat": False, "chosen": " " + words(rng, c, vocab_size),
                     "rejected": " " + words(rng, r, vocab_size), "weight": 1.0})
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def n_params(folder: Path) -> int:
    """All parameters of the causal LM (tied embedding counted once): the N of 6N."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- measuring helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons so the next case builds its own state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def rate(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float, int]:
    """(tokens/s, s/step, timed steps) from per-step (time, cumulative tokens) stamps."""
    (t0, n0), (t1, n1) = stamps[warmup - 1], stamps[-1]
    steps = len(stamps) - warmup
    return (n1 - n0) / (t1 - t0), (t1 - t0) / steps, steps


def _cuda_median_s(fn, reps: int = 10) -> float:
    """Median CUDA-event time of ``fn`` in seconds over ``reps`` runs, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_tbps(device: torch.device, numel: int = 2**30) -> float:
    """Device-to-device copy TB/s of ``numel`` bf16 elements (read + written bytes), median of 10."""
    bufs = [torch.randn(numel, device=device, dtype=torch.bfloat16)]
    bufs.append(torch.empty_like(bufs[0]))
    seconds = _cuda_median_s(lambda: bufs[1].copy_(bufs[0]))
    return 2 * numel * bufs[0].element_size() / seconds / 1e12


def ceilings(device: torch.device) -> dict:
    """bf16 8192^3 matmul TFLOP/s and device-to-device copy TB/s of 2 GiB (read + written bytes), medians of 10."""
    n = 8192
    mats = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2)]
    mm = _cuda_median_s(lambda: torch.mm(*mats))
    mats.clear()
    props = torch.cuda.get_device_properties(device)
    return {"matmul_tflops": 2 * n**3 / mm / 1e12, "copy_tbps": copy_tbps(device), "gpu": props.name,
            "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30}


def decode_step_bytes(model, batch: int, avg_len: float) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decode step reads at best: the weights once in bf16, and K and V
    of ``batch`` sequences of ``avg_len`` tokens in bf16 (the memory-bandwidth bound's numerator)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    return sum(p.numel() for p in model.parameters()) * 2, batch * avg_len * kv_per_token


# ---------------------------------------------------------------------------- our trainers
def make_recipe(recipe: str, folder: Path, data: Path, args, *, pairs: int, seq: int, lora: bool = False,
                compile: bool = False, packing: bool = True, reference: str = "precomputed", gc_: bool = False,
                extra: dict | None = None):
    """One of our recipes on the benchmark's matched settings (not set up yet)."""
    from alignment.config import RECIPE_CONFIGS
    from alignment.recipes import get_recipe

    model = {"name_or_path": str(folder), "tokenizer": str(tokenizer_dir(folder)), "gradient_checkpointing": gc_,
             "dtype": getattr(args, "base_dtype", "float32")}
    if lora:
        model["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
                         "quantize_4bit": bool(getattr(args, "qlora", False))}
    cfg = {"model": model, "train_path": str(data), "batch_size": pairs, "max_steps": args.warmup + args.steps,
           "max_length": seq, "max_prompt_length": seq // 4, "precision": args.precision, "packing": packing,
           "compile": compile, "optim": {"lr": 1e-6, "schedule": "constant", "max_grad_norm": 1.0}, "seed": 0}
    if recipe == "dpo":
        cfg["reference"] = reference
    cfg.update(extra or {})
    return get_recipe(recipe)(RECIPE_CONFIGS[recipe](**cfg))


def run_ours(recipe: str, folder: Path, data: Path, args, *, pairs: int, seq: int, lora: bool = False,
             compile: bool = False, packing: bool = True, reference: str = "precomputed", gc_: bool = False,
             extra: dict | None = None) -> dict:
    """One of our recipes for ``warmup + steps`` steps; per-step stamps from its metrics callback."""
    device = args.device_t
    run = make_recipe(recipe, folder, data, args, pairs=pairs, seq=seq, lora=lora, compile=compile, packing=packing,
                      reference=reference, gc_=gc_, extra=extra)
    stamps: list[tuple[float, float]] = []
    records: list[dict] = []

    def stamp(record):
        # No device sync here: a step's record is emitted once its metrics were read on the
        # host, which waits for the step's last kernel (its metrics are queued after the
        # optimizer). With overlap_steps that is while the next step runs, and a sync here would
        # wait for that one too (and serialise the overlap away).
        if record["phase"] == "train":
            stamps.append((time.perf_counter(), run.tokens_seen))
            records.append(record)

    run.callbacks.append(stamp)
    timing = {"prepared_s": 0.0, "ref_s": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(device)
            started = time.perf_counter()
            result = fn(*a, **k)
            sync(device)
            timing[name] += time.perf_counter() - started
            return result
        return wrapper

    # on_prepared = digests for the cache key (hashes the weight files) + the reference pass itself.
    run.on_prepared = timed("prepared_s", run.on_prepared)
    if hasattr(run, "_compute_reference"):
        run._compute_reference = timed("ref_s", run._compute_reference)
    reset_memory(device)
    started = time.perf_counter()
    try:
        run.setup()
        setup_s = time.perf_counter() - started
        run.train()
        ref_tokens = sum(run.train_set.lengths) if recipe == "dpo" and reference == "precomputed" else 0
    finally:
        run.cleanup()
    tps, step_s, steps = rate(stamps, args.warmup)
    out = {"tokens_per_s": tps, "samples_per_s": pairs / step_s, "step_s": step_s, "timed_steps": steps,
           "setup_s": setup_s, "peak_gib": peak_gib(device), "packing": run.packing,
           "tokens_per_step": (stamps[-1][1] - stamps[args.warmup - 1][1]) / steps,
           "last": {k: v for k, v in records[-1].items() if isinstance(v, float)}}
    if ref_tokens:
        out["ref_pass_s"] = timing["ref_s"]
        out["ref_setup_s"] = timing["prepared_s"] - timing["ref_s"]
        out["ref_pass_tokens_per_s"] = ref_tokens / max(timing["ref_s"], 1e-9)
        # Precompute amortised over one epoch: each token costs one training and one reference-pass share.
        out["tokens_per_s_incl_ref_pass"] = 1 / (1 / tps + 1 / out["ref_pass_tokens_per_s"])
    return out


# ---------------------------------------------------------------------------- TRL
def _trl_common(args, pairs: int, seq: int, work: Path) -> dict:
    return dict(output_dir=str(work / "trl_out"), per_device_train_batch_size=pairs,
                max_steps=args.warmup + args.steps, learning_rate=1e-6, lr_scheduler_type="constant",
                max_grad_norm=1.0, max_length=seq, gradient_checkpointing=False, bf16=args.precision == "bf16",
                use_cpu=args.device_t.type == "cpu", logging_steps=10**6, save_strategy="no", report_to="none",
                seed=0, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
                optim="adamw_torch_fused" if args.device_t.type == "cuda" else "adamw_torch", disable_dropout=True)


def run_trl(kind: str, folder: Path, rows: list[dict], args, *, pairs: int, seq: int, lora: bool = False) -> dict:
    """TRL's DPOTrainer (``kind="dpo"``) or RewardTrainer (``"rm"``) on the same model and rows."""
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    device = args.device_t
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            sync(device)
            stamps.append((time.perf_counter(), state.num_input_tokens_seen))

    frame = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(folder))
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM" if kind == "dpo" else "SEQ_CLS")
    reset_memory(device)
    started = time.perf_counter()
    common = _trl_common(args, pairs, seq, args.work)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=frame,
                             processing_class=tok, peft_config=peft_config, callbacks=[Stamp()])
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=frame, processing_class=tok,
                                peft_config=peft_config, callbacks=[Stamp()])
    setup_s = time.perf_counter() - started
    try:
        trainer.train()
    finally:
        trainer.accelerator.free_memory()
        del trainer, model
    tps, step_s, steps = rate(stamps, args.warmup)
    return {"tokens_per_s": tps, "samples_per_s": pairs / step_s, "step_s": step_s, "timed_steps": steps,
            "setup_s": setup_s, "peak_gib": peak_gib(device),
            "tokens_per_step": (stamps[-1][1] - stamps[args.warmup - 1][1]) / steps}


# ---------------------------------------------------------------------------- training cases
def train_case(case: str, shape: str, args, *, seq: int | None = None, pairs: int | None = None) -> dict:
    """Run one training case; adds FLOP accounting (``flops_per_token``) to the result."""
    spec = SHAPES[shape]
    seq, pairs = seq or spec["seq"], pairs or spec["pairs"]
    folder = build_shape(args.work, shape, args.device_t)
    n_rows = pairs * (args.warmup + args.steps)
    rows = make_pairs(n_rows, seq, spec["vocab_size"])
    data = write_rows(rows, args.work / f"data-{shape}-{seq}-{n_rows}.parquet")
    lora = "lora" in case
    N = n_params(folder)
    if case.startswith("trl_"):
        kind = "rm" if case.startswith("trl_rm") else "dpo"
        if case.endswith("_nocudnn"):  # TRL with the attention-kernel choice our recipes make
            torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            out = run_trl(kind, folder, rows, args, pairs=pairs, seq=seq, lora=lora)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(True)
        fpt = None if lora else (8 if kind == "dpo" else 6) * N
    else:
        recipe = "reward" if case.startswith("ours_rm") else "dpo"
        # Our recipes leave cuDNN attention off unless cudnn_attention: "_cudnn" cases turn it on.
        causal_pad = "causalpad" in case
        opts = dict(pairs=pairs, seq=seq, lora=lora, compile="compile" in case,
                    packing="padded" not in case and not causal_pad, gc_=case.endswith("_gc"),
                    reference="copy" if "refcopy" in case else "precomputed",
                    extra={"cudnn_attention": case.endswith("_cudnn"), "causal_padding": causal_pad,
                           "varlen_attention": "varlen" in case, "share_prompt": "shared" in case,
                           "overlap_steps": False if "nooverlap" in case else None})
        out = run_ours(recipe, folder, data, args, **opts)
        fpt = None if lora else (8 if "refcopy" in case else 6) * N
        if "shared" in case:  # tokens/s counts each prompt twice (the data); the model ran it once
            out["model_flops_note"] = "TFLOP/s and MFU from the plain layout's token count: effective, not executed"
    out.update(shape=shape, seq=seq, pairs=pairs, params=N, flops_per_token=fpt)
    if fpt:
        out["tflops"] = out["tokens_per_s"] * fpt / 1e12
        if "tokens_per_s_incl_ref_pass" in out:
            out["tflops_incl_ref_pass"] = out["tokens_per_s_incl_ref_pass"] * 8 * N / 1e12
    return out


KERNEL_KINDS = (("attention", ("fmha", "flash", "attention", "efficient")),
                ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
                ("optimizer", ("adam", "multi_tensor")), ("triton (compiled)", ("triton",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other (eager elementwise etc.)")


def profile_train(case: str, shape: str, args, steps: int = 2) -> dict:
    """Where one training step's time goes: GPU kernel time by kind vs wall time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    spec = SHAPES[shape]
    folder = build_shape(args.work, shape, args.device_t)
    n_rows = spec["pairs"] * (args.warmup + steps + 1)
    data = write_rows(make_pairs(n_rows, spec["seq"], spec["vocab_size"]), args.work / f"prof-{shape}.parquet")
    causal_pad = "causalpad" in case
    run = make_recipe("reward" if "_rm" in case else "dpo", folder, data, args, pairs=spec["pairs"], seq=spec["seq"],
                      compile="compile" in case, packing=not causal_pad,
                      extra={"causal_padding": causal_pad, "varlen_attention": "varlen" in case})
    try:
        run.setup()
        run.train_module.train()
        for _ in range(args.warmup):
            run.train_step()
        sync(args.device_t)
        started = time.perf_counter()
        cuda = args.device_t.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run.train_step()
            sync(args.device_t)
        wall = (time.perf_counter() - started) / steps
    finally:
        run.cleanup()

    def spent(e):  # kernel time on the GPU; self time of ops in a CPU dry run
        return e.device_time_total if cuda else e.self_cpu_time_total

    kinds: dict[str, float] = {}
    events = [e for e in prof.key_averages() if spent(e) > 0]
    for e in events:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + spent(e) / steps / 1000
    events.sort(key=lambda e: -spent(e))
    return {"shape": shape, "wall_ms_per_step": 1000 * wall, "gpu_ms_per_step": sum(kinds.values()),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [(e.key[:70], e.count // steps, round(spent(e) / steps / 1000, 2)) for e in events[:12]]}


# ---------------------------------------------------------------------------- generation
def gen_case(shape: str, args, batch: int = 64, prompt_len: int = 128, new_tokens: int = 256) -> dict:
    """Ours (dynamic KV loop, and static cache + CUDA graph) vs ``model.generate`` on a bf16 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.config import GenerationSettings
    from alignment.generation import generate

    device = args.device_t
    folder = build_shape(args.work, shape, device)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    model.generation_config.pad_token_id = 0
    rng = random.Random(1)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = [words(rng, prompt_len, vocab) for _ in range(batch)]
    ids = torch.tensor([tok(p)["input_ids"] for p in prompts], device=device)
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=batch, do_sample=True)
    paths = {
        "model.generate": lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                 pad_token_id=0),
        "ours_kv": lambda: generate(model, tok, prompts, settings, seed=0, eos_token_ids=[-1]),
        "ours_graph": lambda: generate(model, tok, prompts, settings.model_copy(update={"cuda_graphs": True}), seed=0,
                                       eos_token_ids=[-1]),
        # the first run compiles (best of 3 is a warm one)
        "ours_graph_compiled": lambda: generate(
            model, tok, prompts, settings.model_copy(update={"cuda_graphs": True, "compile_step": True}), seed=0,
            eos_token_ids=[-1]),
    }
    reps = {"model.generate": args.gen_reps, "ours_kv": 1, "ours_graph": 3, "ours_graph_compiled": 3}
    out: dict = {"shape": shape, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
    for name, fn in paths.items():
        times = []
        for _ in range(reps[name]):
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - started)
        out[name] = {"runs_s": times, "best_s": min(times), "ms_per_step": 1000 * min(times) / new_tokens,
                     "new_tokens_per_s": batch * new_tokens / min(times)}
    if device.type == "cuda":
        out["decode_profile"] = profile_decode(model, ids)
        out["decode_profile_compiled"] = profile_decode(model, ids, compile_step=True)
    # Memory-bandwidth bound of one decode step: bf16 weights once + the KV cache of the average length.
    step_bytes = sum(decode_step_bytes(model, batch, prompt_len + new_tokens / 2))
    out["bound_ms_per_step"] = 1000 * step_bytes / (args.copy_tbps * 1e12)
    for name in paths:
        out[name]["fraction_of_bound"] = out["bound_ms_per_step"] / out[name]["ms_per_step"]
    base = out["model.generate"]["ms_per_step"]
    out["speedup_graph_vs_generate"] = base / out["ours_graph"]["ms_per_step"]
    first = out["model.generate"]["runs_s"][0] / new_tokens * 1000
    out["speedup_graph_vs_generate_first_run"] = first / out["ours_graph"]["ms_per_step"]
    out["speedup_compiled_vs_generate"] = base / out["ours_graph_compiled"]["ms_per_step"]
    out["speedup_compiled_vs_generate_first_run"] = first / out["ours_graph_compiled"]["ms_per_step"]
    return out


def profile_decode(model, ids: torch.Tensor, steps: int = 8, compile_step: bool = False) -> dict:
    """Kernels of ``steps`` replayed CUDA-graph decode steps: count per step and the top ones by time."""
    from torch.profiler import ProfilerActivity, profile

    from alignment.fast_generation import GraphDecoder

    dec = GraphDecoder(model, compile_step=compile_step)
    with torch.no_grad():
        logits = dec.prefill(ids, torch.ones_like(ids), steps + 4 + 20)
        for _ in range(3):  # eager, capture, replay
            logits = dec.step(logits.argmax(-1))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                logits = dec.step(logits.argmax(-1))
            torch.cuda.synchronize()
        # Replays alone (no sampling, no host sync per step): the graph's own GPU time.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            dec.graph.replay()
        end.record()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    return {"captured": dec.captured, "replay_ms": start.elapsed_time(end) / 20, "kernels_per_step": sum(e.count for e in events) / steps,
            "gpu_ms_per_step": total / steps / 1000,
            "top": [(e.key[:80], e.count // steps, round(e.device_time_total / steps, 1)) for e in events[:12]]}


# ---------------------------------------------------------------------------- RL
def rl_case(case: str, shape: str, args, cuda_graphs: bool = True) -> dict:
    """PPO or GRPO steps at 64 samples x 128-token prompts x 256 new tokens; rollout and update timed apart.

    ``case`` is the recipe (``ppo``, ``grpo``), or the recipe + ``_fast``: rollouts with
    ``fuse_projections`` and ``compile_step`` (compute-dtype decode weights, compiled graph step).
    """
    recipe, _, variant = case.partition("_")
    fast = {"fuse_projections": True, "compile_step": True} if variant == "fast" else {}
    folder = build_shape(args.work, shape, args.device_t)
    tiny = shape == "tiny"
    prompt_len, new_tokens, samples = (16, 16, 8) if tiny else (128, 256, 64)
    rng = random.Random(2)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = write_rows([{"prompt": words(rng, prompt_len, vocab), "is_chat": False} for _ in range(4 * samples)],
                         args.work / f"prompts-{shape}.parquet")
    group = 4
    extra = {"train_path": str(prompts), "reward_fn": "benchmarks.gpu_bench:length_reward",
             "rollout_batch_size": samples // group if recipe == "grpo" else samples,
             "generation": {"max_new_tokens": new_tokens, "batch_size": samples, "cuda_graphs": cuda_graphs, **fast},
             "minibatch_size": samples, "update_epochs": 1, "max_prompt_length": prompt_len}
    if recipe == "grpo":
        extra["group_size"] = group
    out = run_ours(recipe, folder, prompts, args, pairs=16 if not tiny else 4, seq=prompt_len + new_tokens,
                   extra=extra)
    last = out["last"]
    out.update(shape=shape, recipe=recipe, case=case, cuda_graphs=cuda_graphs, samples=samples,
               generate_tokens_per_s=last.get("generate_tokens_per_s"), rollout_s=last.get("rollout_s"),
               update_s=last.get("update_s"))
    N = n_params(folder)
    # Update: one policy forward + backward (6N) over prompt + response tokens of every sample.
    tokens = samples * (prompt_len + new_tokens)
    if out["update_s"]:
        out["update_tokens_per_s"] = tokens / out["update_s"]
        out["update_tflops"] = out["update_tokens_per_s"] * 6 * N / 1e12
    return out


# ---------------------------------------------------------------------------- driver
def fmt(x, spec=",.0f"):
    return "" if x is None else format(x, spec)


def table(results: list[dict], ceil: dict) -> str:
    """Markdown tables of every case in ``results`` (training with ours/TRL ratios, generation, RL, checks)."""
    mm = ceil.get("matmul_tflops")
    lines = []
    train = [r for r in results if r["group"] in ("train", "scale") and "error" not in r]
    if train:
        trl = {(r["shape"], r["case"]): r for r in train if r["case"].startswith("trl_")}
        lines += ["| case | shape | seq | pairs/step | tokens/s | samples/s | peak GiB | TFLOP/s | MFU (meas.) | "
                  "MFU (989) | tok/s vs TRL | mem vs TRL | tok/s incl. ref pass |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            case = r["case"]
            fam = "rm" if "_rm" in case else ("dpo_lora" if "lora" in case else "dpo")
            base = trl.get((r["shape"], BASELINE[fam])) if r["group"] == "train" and r["seq"] == SHAPES[r["shape"]][
                "seq"] else None
            tf = r.get("tflops")
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and base is not r else ""
            mem = (f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and base is not r and r.get("peak_gib")
                   else "")
            lines.append(f"| {case} | {r['shape']} | {r['seq']} | {r['pairs']} | {fmt(r['tokens_per_s'])} | "
                         f"{fmt(r['samples_per_s'], '.2f')} | {fmt(r.get('peak_gib'), '.1f')} | {fmt(tf, '.0f')} | "
                         f"{fmt(tf and mm and 100 * tf / mm, '.1f')}{'%' if tf and mm else ''} | "
                         f"{fmt(tf and 100e12 * tf / PEAK_DATASHEET, '.1f')}{'%' if tf else ''} | {ratio} | {mem} | "
                         f"{fmt(r.get('tokens_per_s_incl_ref_pass'))} |")
    for r in results:
        if r["group"] == "gen" and "error" not in r:
            lines += ["", f"generation, {r['shape']}, batch {r['batch']} x {r['prompt_len']}-token prompts x "
                          f"{r['new_tokens']} new tokens (bf16 weights); bandwidth bound "
                          f"{r['bound_ms_per_step']:.2f} ms/step",
                      "| path | runs (s) | ms/step (best) | new tokens/s | fraction of bound |", "|---|---|---|---|---|"]
            for name in ("model.generate", "ours_kv", "ours_graph", "ours_graph_compiled"):
                p = r[name]
                runs = ", ".join(f"{t:.2f}" for t in p["runs_s"])
                lines.append(f"| {name} | {runs} | {p['ms_per_step']:.2f} | {p['new_tokens_per_s']:,.0f} | "
                             f"{100 * p['fraction_of_bound']:.1f}% |")
            lines.append(f"ours_graph vs model.generate: {r['speedup_graph_vs_generate']:.1f}x (best runs), "
                         f"{r['speedup_graph_vs_generate_first_run']:.1f}x (against generate's first run); "
                         f"compiled step: {r['speedup_compiled_vs_generate']:.1f}x, "
                         f"{r['speedup_compiled_vs_generate_first_run']:.1f}x")
            prof = r.get("decode_profile")
            if prof:
                lines.append(f"graph decode step: {prof['kernels_per_step']:.0f} kernels, "
                             f"{prof['gpu_ms_per_step']:.2f} ms of kernel time, one replay {prof['replay_ms']:.2f} ms"
                             "; top (name, per step, us): "
                             + "; ".join(f"{n} x{c} {t}" for n, c, t in prof["top"][:6]))
            prof = r.get("decode_profile_compiled")
            if prof:
                lines.append(f"compiled graph decode step: {prof['kernels_per_step']:.0f} kernels, "
                             f"{prof['gpu_ms_per_step']:.2f} ms of kernel time, one replay {prof['replay_ms']:.2f} ms")
    rl = [r for r in results if r["group"] == "rl" and "error" not in r]
    if rl:
        lines += ["", "| RL case | shape | samples | step tokens/s | generate new tok/s | rollout s | update s | "
                      "update tok/s | update TFLOP/s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rl:
            lines.append(f"| {r['case']} | {r['shape']} | {r['samples']} | {fmt(r['tokens_per_s'])} | "
                         f"{fmt(r['generate_tokens_per_s'])} | {fmt(r['rollout_s'], '.2f')} | {fmt(r['update_s'], '.2f')} | "
                         f"{fmt(r.get('update_tokens_per_s'))} | {fmt(r.get('update_tflops'), '.0f')} | "
                         f"{fmt(r.get('peak_gib'), '.1f')} |")
    for r in results:
        if r["group"] == "check" and "error" not in r:
            lines += ["", f"check {r['case']} {r['shape']} (relative errors vs fp32; loss fp32 {r['loss_fp32']:.4f})",
                      "| path | values | loss | grad | grad cos | verdict |", "|---|---|---|---|---|---|"]
            for name in ("plain_bf16", "opt_eager", "opt_compiled", "opt_causalpad", "opt_varlen", "opt_shared"):
                e = r.get(name)
                if e is None:
                    continue
                verdict = "" if "pass" not in e else ("PASS" if e["pass"] else "FAIL")
                lines.append(f"| {name} | {e['values']:.2e} | {e['loss']:.2e} | {e['grad']:.2e} | {e['grad_cos']:.6f} | "
                             f"{verdict} |")
    for r in results:
        if r["group"] == "profile" and "error" not in r:
            lines += ["", f"profile {r['case']} {r['shape']}: {r['wall_ms_per_step']:.0f} ms/step wall, "
                          f"{r['gpu_ms_per_step']:.0f} ms of kernels; by kind (ms): {json.dumps(r['by_kind_ms'])}",
                      "top kernels (name, count/step, ms/step): " + "; ".join(f"{n} x{c} {t}" for n, c, t in r["top"])]
    errors = [r for r in results if "error" in r]
    for r in errors:
        lines.append(f"ERROR {r['group']}/{r['case']}/{r.get('shape')}: {r['error']}")
    return "\n".join(lines)


def plan(args) -> list[tuple[str, str, str, dict]]:
    """(group, case, shape, kwargs) in run order: for each shape, the ``--groups`` tokens in order.

    A token is a group name, or ``train:case+case`` / ``check:dpo`` to run only those cases.
    """
    todo = []
    for shape in args.shapes.split(","):
        for token in args.groups.split(","):
            group, _, only = token.partition(":")
            picked = only.split("+") if only else None
            if group == "check":
                todo += [("check", c, shape, {}) for c in (picked or ["dpo", "rm"])]
            elif group == "train":
                default = args.cases.split(",") if args.cases else TRAIN_CASES
                todo += [("train", c, shape, {}) for c in (picked or default)]
            elif group == "gen":
                todo.append(("gen", "generation", shape, {}))
            elif group == "rl":
                todo += [("rl", c, shape, {}) for c in (picked or ["ppo", "grpo"])]
            elif group == "scale":
                for seq in (512, 1024, 2048, 4096):
                    todo.append(("scale", args.scale_case, shape, {"seq": seq, "pairs": max(1, 8192 // seq)}))
            elif group == "profile":
                todo += [("profile", c, shape, {}) for c in (picked or ["ours_dpo_compile"])]
            elif group != "ceilings":
                raise SystemExit(f"unknown group {group!r}")
    return todo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="qwen0.5b")
    parser.add_argument("--groups", default="ceilings,train,gen,check")
    parser.add_argument("--cases", default="", help=f"training cases (default all): {','.join(TRAIN_CASES)}")
    parser.add_argument("--scale-case", default="ours_dpo_compile")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per training case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--gen-reps", type=int, default=2, help="model.generate runs (the first pays one-time costs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="/tmp/gpu_bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_bench_out"))
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip cases that would start after this")
    parser.add_argument("--copy-tbps", type=float, default=3.0, help="used when ceilings are not measured")
    parser.add_argument("--matmul-tflops", type=float, default=None, help="used when ceilings are not measured")
    args = parser.parse_args()
    started = time.perf_counter()
    args.device_t = torch.device(args.device)
    args.precision = "bf16" if args.device_t.type == "cuda" else "fp32"
    args.work = Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    results: list[dict] = []
    ceil: dict = {"matmul_tflops": args.matmul_tflops, "copy_tbps": args.copy_tbps}
    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            env[name] = f"missing ({err})"
    print("# env", json.dumps(env), flush=True)
    if "ceilings" in args.groups.split(",") and args.device_t.type == "cuda":
        ceil = ceilings(args.device_t)
        args.copy_tbps = ceil["copy_tbps"]
        print("# ceilings", json.dumps(ceil), flush=True)
    (out_dir / "env.json").write_text(json.dumps({"env": env, "ceilings": ceil}, indent=1))
    log = (out_dir / "results.jsonl").open("a")
    for group, case, shape, kw in plan(args):
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            print(f"# skip {group}/{case}/{shape}: {elapsed:.0f}s > budget", flush=True)
            continue
        t0 = time.perf_counter()
        record = {"group": group, "case": case, "shape": shape}
        try:
            if group == "train" or group == "scale":
                record.update(train_case(case, shape, args, **kw))
            elif group == "gen":
                record.update(gen_case(shape, args))
            elif group == "rl":
                record.update(rl_case(case, shape, args))
            elif group == "profile":
                record.update(profile_train(case, shape, args))
            elif group == "check":
                from benchmarks.gpu_bench_check import dpo_check, rm_check

                folder = build_shape(args.work, shape, args.device_t)
                seq = min(512, SHAPES[shape]["seq"])
                rows = make_pairs(4, seq, SHAPES[shape]["vocab_size"], seed=3)
                record.update((dpo_check if case == "dpo" else rm_check)(folder, rows, seq, args.device_t))
                record["shape"] = shape
        except Exception as err:  # noqa: BLE001 - one failing case must not lose the others
            record["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            reset_accelerate()
            reset_memory(args.device_t)
        record["wall_s"] = time.perf_counter() - t0
        results.append(record)
        log.write(json.dumps(record, default=str) + "\n")
        log.flush()
        brief = {k: record.get(k) for k in ("tokens_per_s", "peak_gib", "tflops", "wall_s", "error") if k in record}
        print(f"# done {group}/{case}/{shape} {json.dumps(brief, default=str)}", flush=True)
    text = table(results, ceil)
    (out_dir / f"table-{int(time.time())}.md").write_text(text + "\n")
    print(f"\n# ceilings {json.dumps(ceil)}\n# total {time.perf_counter() - started:.0f}s\n{text}")


if __name__ == "__main__":
    main()
