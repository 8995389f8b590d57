"""The demo's base model: a small causal LM pretrained on the review corpus, built once, cached.

The build is a recipe with a fixed lifecycle: load the corpus, train the tokenizer, pretrain
(next-token loss on packed ``<|bos|> review <|eos|>`` sequences, AdamW, warmup then cosine),
evaluate on the held-out documents, save. The result is an ordinary Hugging Face folder
(``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files) plus
``build.json`` with the digest, metrics and timings.

Caching: the folder is ``<cache>/base-<digest>`` where the digest covers the corpus checksum
and every tokenizer, model and pretraining setting, the resolved precision and the code's
format version. A finished folder is returned as is (no work); a build writes to a temporary
folder and renames it at the end, so an interrupted build leaves no half-written model.
Deterministic: the same settings, corpus and machine give bit-identical weights (fixed step
count, seeded init and data order), unless ``pretrain.max_minutes`` cuts the run short.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from alignment.config import config_digest
from tasks.demo.corpus import Corpus, demo_cache_dir, load_corpus
from tasks.demo.settings import DemoSettings, ModelShape, PretrainSettings
from tasks.demo.tokenizer import encode_documents, train_tokenizer, unused_token_ids

BUILD_FORMAT = 2  # bump when the build's code changes what it produces
IGNORE = -100


@dataclass(frozen=True)
class BaseModelInfo:
    """A built base model: where it is, what identifies it, how good and how costly it was."""

    path: str
    digest: str
    corpus_checksum: str
    parameters: int
    steps: int
    tokens_seen: int
    train_loss: float
    heldout_loss: float
    heldout_perplexity: float
    heldout_bits_per_char: float
    heldout_word_perplexity: float
    """exp(held-out NLL per word, EOS counted as a word): comparable across tokenizers, unlike
    the per-token perplexity."""
    build_seconds: float
    cpu_seconds: float
    precision: str
    cached: bool = False


def resolve_precision(pretrain: PretrainSettings) -> str:
    """``auto`` → bf16 where the CPU has native bf16 dot products (avx512_bf16 or AMX), else fp32."""
    if pretrain.precision != "auto":
        return pretrain.precision
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def base_model_digest(settings: DemoSettings, corpus_checksum: str) -> str:
    """Cache key of the base model: corpus checksum + tokenizer, model and pretraining settings."""
    return config_digest({
        "format": BUILD_FORMAT,
        "corpus": corpus_checksum,
        "tokenizer": settings.tokenizer.model_dump(mode="json"),
        "model": settings.model.model_dump(mode="json"),
        # fields added later only when set away from their defaults: built models keep their keys
        "pretrain": settings.pretrain.model_dump(mode="json", exclude={"threads"} | {
            k for k, default in (("attention", "sdpa"), ("fused_optimizer", False))
            if getattr(settings.pretrain, k) == default}),
        "precision": resolve_precision(settings.pretrain),
    })  # fmt: skip


def make_model(shape: ModelShape, vocab_size: int, special: dict[str, int], dropout: float) -> PreTrainedModel:
    """A freshly initialised causal LM of ``shape`` (call under a seed for reproducible init)."""
    if shape.architecture == "llama":
        width = shape.intermediate_size or 32 * math.ceil(shape.n_embd * 8 / 3 / 32)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=shape.n_embd, intermediate_size=width,
            num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
            num_key_value_heads=shape.n_head, max_position_embeddings=shape.context_length,
            tie_word_embeddings=shape.tie_embeddings, attention_dropout=dropout, **special,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=shape.n_head,
        n_positions=shape.context_length, n_inner=shape.intermediate_size or 4 * shape.n_embd,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        tie_word_embeddings=shape.tie_embeddings, **special,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def pack(documents: list[list[int]], context_length: int) -> torch.Tensor:
    """Concatenate documents and cut the stream into rows of ``context_length`` (the tail is
    dropped when shorter than a row). Shape ``[rows, context_length]``."""
    stream = torch.tensor([i for doc in documents for i in doc], dtype=torch.long)
    rows = len(stream) // context_length
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one sequence of {context_length}")
    return stream[: rows * context_length].view(rows, context_length)


def _labels(rows: torch.Tensor, bos_id: int) -> torch.Tensor:
    # BOS always follows EOS: predicting it is free and would flatter the loss.
    return rows.masked_fill(rows == bos_id, IGNORE)


def _epoch_rows(documents: list[list[int]], context_length: int, generator: torch.Generator) -> torch.Tensor:
    order = torch.randperm(len(documents), generator=generator).tolist()
    return pack([documents[i] for i in order], context_length)


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, rows: torch.Tensor, bos_id: int, batch_size: int, dtype) -> tuple[float, int]:
    """Mean next-token loss (nats) over all target tokens of ``rows`` and the number of targets."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        labels = _labels(batch, bos_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(input_ids=batch).logits
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total += nll.item()
        count += int((targets != IGNORE).sum())
    model.train()
    return total / max(count, 1), count


def _optimizer(model: PreTrainedModel, pretrain: PretrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": pretrain.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=pretrain.lr, betas=(0.9, 0.95), eps=1e-8, fused=pretrain.fused_optimizer or None)


def lr_at(step: int, pretrain: PretrainSettings) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < pretrain.warmup_steps:
        return pretrain.lr * (step + 1) / pretrain.warmup_steps
    span = max(pretrain.steps - pretrain.warmup_steps, 1)
    progress = min((step - pretrain.warmup_steps) / span, 1.0)
    floor = pretrain.lr * pretrain.min_lr_ratio
    return floor + (pretrain.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_model(
    model: PreTrainedModel,
    documents: list[list[int]],
    settings: DemoSettings,
    bos_id: int,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place on packed ``documents`` for ``pretrain.steps`` steps.

    Each epoch shuffles the documents (seeded) and packs them anew. Raises FloatingPointError
    naming the step when the loss stops being finite. Returns train loss (mean of the last
    10% of steps), steps done and tokens seen.
    """
    cfg, ctx = settings.pretrain, settings.model.context_length
    precision = resolve_precision(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = _optimizer(model, cfg)
    model.train()
    rows, cursor, epoch = _epoch_rows(documents, ctx, generator), 0, 0
    recent: list[float] = []
    started, step = time.monotonic(), 0
    bar = tqdm(total=cfg.steps, desc="pretraining demo base model", unit="step", disable=not progress)
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(rows):
            rows, cursor, epoch = _epoch_rows(documents, ctx, generator), 0, epoch + 1
        batch = rows[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, labels=_labels(batch, bos_id)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}; lower demo.pretrain.lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-max(cfg.steps // 10, 1) :]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
        if cfg.max_minutes is not None and time.monotonic() - started > 60 * cfg.max_minutes:
            break
    bar.close()
    steps_done = step + 1
    return {"train_loss": sum(recent) / len(recent), "steps": steps_done, "tokens_seen": steps_done * cfg.batch_size * ctx}


def build_base_model(
    settings: DemoSettings, *, corpus: Corpus | None = None, progress: bool = True, isolated: bool = True
) -> BaseModelInfo:
    """Return the cached base model for ``settings``, building it first if needed.

    The corpus is fetched here (so its errors keep their types); the pretraining itself runs
    in a child process (``isolated``; not with a given ``corpus``) with passive OpenMP waiting
    (spin-waiting threads on two busy cores ran 3 to 10 times slower) and a heap that keeps its
    memory (see ``CHILD_ENV``).
    ``corpus`` replaces the fetched one (tests train on small hand-made text); the cache key
    then uses its checksum. Raises CorpusChecksumError / CorpusFetchError (fetching the corpus),
    FloatingPointError (pretraining diverged, in-process) or RuntimeError (the child failed; its
    traceback is on stderr).
    """
    cache = demo_cache_dir(settings)
    given = corpus is not None
    corpus = corpus or load_corpus(settings.corpus, cache)
    digest = base_model_digest(settings, corpus.checksum)
    folder = cache / f"base-{digest}"
    if (folder / "build.json").exists():
        info = json.loads((folder / "build.json").read_text())
        return BaseModelInfo(**{**info, "path": str(folder), "cached": True})
    if isolated and not given:
        return _build_in_child(settings.model_copy(update={"cache_dir": str(cache)}), progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".base-{digest}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        info = _build(settings, corpus, digest, tmp, progress=progress)
        (tmp / "build.json").write_text(json.dumps(asdict(info), indent=2))
        if folder.exists():  # another process finished the same build meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BaseModelInfo(**{**asdict(info), "path": str(folder)})


# Set for the child only (they act at process start); the user's own values win.
CHILD_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP workers sleep instead of spinning on busy cores
    # Keep freed memory in the heap: the step's large logits buffers were mmapped and unmapped
    # every step (~100k page faults a step, 40% of the CPU time in the kernel). Measured on 2
    # cores: 226 -> 121 ms a step with this, 144 ms with passive waiting too.
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
}


def _build_in_child(settings: DemoSettings, progress: bool) -> BaseModelInfo:
    env = {**CHILD_ENV, **os.environ}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "settings.json", Path(tmp) / "info.json"
        cfg.write_text(settings.model_dump_json())
        cmd = [sys.executable, "-m", "tasks.demo.base_model", str(cfg), str(out)] + ([] if progress else ["--quiet"])
        code = subprocess.run(cmd, env=env).returncode
        if code != 0 or not out.exists():
            raise RuntimeError(f"building the demo base model failed in its process (exit code {code}); see its output above")
        return BaseModelInfo(**json.loads(out.read_text()))


def _build(settings: DemoSettings, corpus: Corpus, digest: str, out: Path, *, progress: bool) -> BaseModelInfo:
    started_wall, started_cpu = time.monotonic(), time.process_time()
    threads_before = torch.get_num_threads()
    if settings.pretrain.threads:
        torch.set_num_threads(settings.pretrain.threads)
    try:
        tokenizer = train_tokenizer(corpus.train, settings.tokenizer)
        train_docs = encode_documents(tokenizer, corpus.train)
        heldout_docs = encode_documents(tokenizer, corpus.heldout)
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        with torch.random.fork_rng():  # seed the init without touching the caller's RNG
            torch.manual_seed(settings.pretrain.seed)
            model = make_model(settings.model, len(tokenizer), special, settings.pretrain.dropout)
        if settings.pretrain.attention != "sdpa":
            model.set_attn_implementation(settings.pretrain.attention)  # the build's only: not saved
        stats = pretrain_model(model, train_docs, settings, tokenizer.bos_token_id, progress=progress)
        precision = resolve_precision(settings.pretrain)
        heldout_rows = pack(heldout_docs, settings.model.context_length)
        loss, _ = evaluate_loss(model, heldout_rows, tokenizer.bos_token_id, 64, precision)
        chars = sum(len(d) + 1 for d in corpus.heldout)  # +1: the EOS "character" per document
        words = sum(len(d.split()) + 1 for d in corpus.heldout)
        total_nll = loss * sum(len(d) - 1 for d in heldout_docs)  # targets: all but BOS per document
        model.generation_config = GenerationConfig(
            do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=24,
            suppress_tokens=[i for i in unused_token_ids(tokenizer, train_docs) if i != tokenizer.eos_token_id],
            **special,
        )  # fmt: skip
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        torch.set_num_threads(threads_before)
    return BaseModelInfo(
        path=str(out),
        digest=digest,
        corpus_checksum=corpus.checksum,
        parameters=sum(p.numel() for p in model.parameters()),
        steps=int(stats["steps"]),
        tokens_seen=int(stats["tokens_seen"]),
        train_loss=round(stats["train_loss"], 4),
        heldout_loss=round(loss, 4),
        heldout_perplexity=round(math.exp(loss), 2),
        heldout_bits_per_char=round(total_nll / chars / math.log(2), 4),
        heldout_word_perplexity=round(math.exp(total_nll / words), 1),
        build_seconds=round(time.monotonic() - started_wall, 1),
        cpu_seconds=round(time.process_time() - started_cpu, 1),
        precision=precision,
    )


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m tasks.demo.base_model SETTINGS_JSON INFO_JSON [--quiet]``."""
    args = sys.argv[1:] if argv is None else argv
    settings = DemoSettings.model_validate_json(Path(args[0]).read_text())
    info = build_base_model(settings, progress="--quiet" not in args, isolated=False)
    Path(args[1]).write_text(json.dumps(asdict(info)))


if __name__ == "__main__":
    main()
