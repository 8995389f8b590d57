"""Batched sampling with a KV cache, for rollouts, evaluation and the demo simulator.

:func:`generate` left-pads the prompts, runs one prefill forward and then one forward per new
token over the model's KV cache (our own loop, not ``model.generate``), samples with
temperature / top-k / top-p from a seeded ``torch.Generator`` and stops each row at EOS.
Same model, prompts, settings, seed and batch size give the same samples.

The loop is split so a faster decoder can replace its parts (GPU issue): :class:`KVDecoder`
owns the cache and the two forwards (``prefill``, ``step``), with the attention mask
preallocated at its final length and positions advanced in place, so a static cache and a
CUDA-graph-captured ``step`` fit behind the same interface; :func:`sample_next` is a pure
function of the logits. ``backend="hf"`` runs ``model.generate`` instead (the reference,
and a fallback for models whose forward the loop does not support).

Prompts are encoded exactly as the trainers encode them (:func:`alignment.batching.encode_prompt`:
plain strings with the tokenizer's special tokens, chat message lists through the chat template
with the generation prompt). Prompts longer than ``max_prompt_length`` keep their end (the part
next to the response) and a leading BOS.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, StaticCache

from alignment import triton_sampling
from alignment.batching import Prompt, Truncation, encode_prompt
from alignment.config import GenerationSettings
from alignment.fast_generation import GraphDecoder
from alignment.logprobs import selective_log_softmax

__all__ = [
    "GenerationResult",
    "KVDecoder",
    "generate",
    "left_pad",
    "sample_next",
]

@dataclass
class GenerationResult:
    """Prompts and sampled responses of one :func:`generate` call, row i for prompt i.

    Tensors live on CPU. Prompts are left-padded and responses right-padded with ``pad_token_id``,
    so ``torch.cat([prompt_ids, response_ids], 1)`` is each prompt followed directly by its
    response (see :meth:`sequences`).
    """

    prompt_ids: torch.Tensor
    """[B, P] prompt tokens, left-padded."""
    prompt_mask: torch.Tensor
    """[B, P] 1 on prompt tokens, 0 on padding."""
    response_ids: torch.Tensor
    """[B, R] generated tokens, right-padded after EOS."""
    response_mask: torch.Tensor
    """[B, R] 1 on generated tokens up to and including EOS, 0 after."""
    hit_eos: torch.Tensor
    """[B] bool: the response ended with an EOS token (False: cut at ``max_new_tokens``)."""
    texts: list[str]
    """Decoded responses without special tokens."""
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def response_lengths(self) -> torch.Tensor:
        """[B] number of generated tokens per row (EOS included)."""
        return self.response_mask.sum(dim=1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of prompt + response, ``[B, P + R]``, for scoring forwards.

        Feed ``position_ids = attention_mask.cumsum(1) - 1`` (clamped at 0) so left padding does
        not shift positions; response token j of row b sits at column ``P + j``.
        """
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask

    @staticmethod
    def concat(parts: list[GenerationResult]) -> GenerationResult:
        """Stack results of several batches, re-padding prompts (left) and responses (right)."""
        if len(parts) == 1:
            return parts[0]
        pad = parts[0].pad_token_id
        P = max(p.prompt_ids.shape[1] for p in parts)
        R = max(p.response_ids.shape[1] for p in parts)

        def lpad(x, width, value):
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def rpad(x, width, value):
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return GenerationResult(
            prompt_ids=torch.cat([lpad(p.prompt_ids, P, pad) for p in parts]),
            prompt_mask=torch.cat([lpad(p.prompt_mask, P, 0) for p in parts]),
            response_ids=torch.cat([rpad(p.response_ids, R, pad) for p in parts]),
            response_mask=torch.cat([rpad(p.response_mask, R, 0) for p in parts]),
            hit_eos=torch.cat([p.hit_eos for p in parts]),
            texts=[t for p in parts for t in p.texts],
            pad_token_id=pad,
        )


def _encode(tokenizer, prompt: Prompt, index: int) -> list[int]:
    """:func:`alignment.batching.encode_prompt` with the prompt's index in every error."""
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
        raise TypeError(f"prompt {index} must be a string or a list of role/content dicts, got {type(prompt).__name__}")
    try:
        return encode_prompt(tokenizer, prompt)
    except ValueError as err:
        raise ValueError(f"prompt {index}: {err}") from None


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[B, max_len]`` with each sequence right-aligned (padding on the left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def race_noise(shape: torch.Size | tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) variates (fp32) for the exponential race.

    On CPU ``-log U`` from uniform draws: ``exponential_`` costs 40 ms for ``[128, 16384]`` on two
    cores against 9 ms (it was half of the demo simulator's time). U = 0 gives +inf, which never
    wins the race; U < 1, so no variate is 0. Elsewhere ``exponential_``, one kernel.
    """
    if torch.device(device).type == "cpu":
        return torch.rand(shape, generator=generator, dtype=torch.float32).log_().neg_()
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)


def sample_next(
    logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None, fused: bool = False,
    sampler: triton_sampling.GumbelSampler | None = None,
) -> torch.Tensor:
    """Next token ``[B]`` from last-position ``logits`` ``[B, V]``.

    Greedy (argmax) when ``settings.do_sample`` is False. Otherwise, in fp32: divide by the
    temperature, keep the ``top_k`` largest (0: all; ties at the k-th score: exactly k are
    kept), keep the smallest set of tokens whose probability mass reaches ``top_p`` (always at
    least the most likely token), and draw from the renormalised distribution with ``generator``
    (one Exp(1) variate per kept candidate, :func:`race_noise`). With ``top_k`` the race runs over
    the k candidates only, not the vocabulary. ``fused`` (CUDA, no top-k/top-p): the same draw
    with the arithmetic after the noise as one compiled kernel instead of six passes over
    ``[B, V]`` fp32 (the same tokens up to rounding); with a ``sampler`` too, where it runs
    (:func:`alignment.triton_sampling.supported`), its Triton Gumbel-max kernel instead: the same
    distribution from the sampler's own noise (its key came from a generator when it was made;
    ``generator`` is not used), so other tokens than the race's.
    """
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    if fused and not settings.top_k and settings.top_p >= 1.0:
        if sampler is not None and triton_sampling.supported(logits):
            return sampler(logits, settings.temperature)
        return _compiled_race()(logits, race_noise(logits.shape, logits.device, generator), settings.temperature)
    scores = logits.float() / settings.temperature
    index = None  # candidates' token ids when ``scores`` holds a sorted subset
    if settings.top_k and settings.top_k < scores.shape[-1]:
        scores, index = torch.topk(scores, settings.top_k, dim=-1)  # descending
    elif settings.top_p < 1.0:
        scores, index = torch.sort(scores, dim=-1, descending=True)
    if settings.top_p < 1.0:
        probs = scores.softmax(dim=-1)
        # Drop a candidate when the mass before it (scores are sorted) already reaches top_p.
        scores = scores.masked_fill((probs.cumsum(dim=-1) - probs) >= settings.top_p, float("-inf"))
    probs = scores.softmax(dim=-1)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) is a draw from p (the Gumbel-max trick
    # in another form). Unlike torch.multinomial it is fast on CPU and never syncs on GPU.
    choice = (probs / race_noise(probs.shape, probs.device, generator)).argmax(dim=-1)
    return choice if index is None else index.gather(-1, choice[:, None]).squeeze(-1)


def _tempered_race(logits: torch.Tensor, race: torch.Tensor, temperature: float) -> torch.Tensor:
    """argmax softmax(logits / T) / race: :func:`sample_next`'s draw without top-k/top-p."""
    return ((logits.float() / temperature).softmax(dim=-1) / race).argmax(dim=-1)


@functools.cache
def _compiled_race():
    return torch.compile(_tempered_race, dynamic=False)


def _forward_params(model) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)  # DDP wrapper
    return set(inspect.signature(inner.forward).parameters)


class KVDecoder:
    """Prefill + one-token decode steps over ``model.forward`` with a KV cache.

    ``cache="dynamic"`` grows a ``DynamicCache``; ``cache="static"`` preallocates a
    ``StaticCache`` of the final length (fixed shapes: the precondition for CUDA graphs).
    The attention mask is allocated once at ``prompt_len + max_new_tokens`` columns; each step
    marks one more column valid and advances every row's position by one. With a dynamic cache
    and no padding in the batch, no mask is passed at all (as ``model.generate`` does): the
    model then skips building one per step and attention can take its causal fast path.
    """

    def __init__(self, model, cache: Literal["dynamic", "static"] = "dynamic") -> None:
        self.model = model
        self.cache_kind = cache
        params = _forward_params(model)
        # transformers 5.x renamed past_key_values -> cache; support both spellings.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params

    def _forward(self, ids, mask, positions):
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keep_last:
            # the last position's index, not the int 1: the prompt's last hidden states are then
            # gathered contiguously and the LM head is one plain matrix product (a strided slice's
            # took about eight times as long on CPU, same logits)
            last = ids.shape[1] - 1
            kwargs["logits_to_keep"] = torch.tensor([last], device=ids.device) if last else 1
        if not self.needs_mask:
            mask = None
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :]

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts; returns the logits ``[B, V]`` for the first new token."""
        B, P = prompt_ids.shape
        total = P + max_new_tokens
        config = self.model.config
        if self.cache_kind == "static":
            self.cache = StaticCache(config=config, max_cache_len=total)
        else:
            self.cache = DynamicCache(config=config)
        # Static caches keep the mask (it also marks the unwritten slots for some kernels).
        self.needs_mask = self.cache_kind == "static" or not bool(prompt_mask.all())
        self.mask = torch.zeros(B, total, dtype=prompt_mask.dtype, device=prompt_mask.device)
        self.mask[:, :P] = prompt_mask
        self.length = P
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp_min(0)
        self.next_position = positions[:, -1:] + 1
        return self._forward(prompt_ids, self.mask[:, :P], positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B]``; returns the logits ``[B, V]`` for the following token."""
        self.mask[:, self.length] = 1
        self.length += 1
        logits = self._forward(tokens[:, None], self.mask[:, : self.length], self.next_position)
        self.next_position = self.next_position + 1
        return logits


def _eos_ids(model, tokenizer, eos_token_ids) -> list[int]:
    if eos_token_ids is not None:
        return list(eos_token_ids)
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    if not ids:
        raise ValueError("no EOS token: the tokenizer and generation config define none; pass eos_token_ids")
    return sorted(ids)


def _suppressed_ids(model, device) -> torch.Tensor | None:
    """``generation_config.suppress_tokens`` (tokens the model must never emit, e.g. ones it
    never saw in training) as a tensor, or None."""
    ids = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device) if ids else None


def _decode_batch(decoder, prompt_ids, prompt_mask, settings, generator, eos, pad_id, suppress=None,
                  triton_sampler=True):
    """Decode one batch: ``[B, steps]`` tokens, their mask and whether each row hit EOS.

    ``pick`` chooses column ``col``'s tokens and records them on fixed buffers without a host
    sync, so a :class:`~alignment.fast_generation.GraphDecoder` captures it with the forward
    (``advance``); other decoders call it, then ``step``. Rows that ended get padding.
    With ``triton_sampler`` the fused draw (CUDA, ``compile_step``, no top-k/top-p) is a
    :class:`~alignment.triton_sampling.GumbelSampler` where Triton runs, made once per batch: its
    key is drawn from ``generator`` after the prefill and its counter advances on the device.
    """
    B = prompt_ids.shape[0]
    n = settings.max_new_tokens
    device = prompt_ids.device
    sync_every = settings.sync_every if device.type == "cuda" else 1
    fused = settings.compile_step and device.type == "cuda"  # the sampler compiled with the step
    out = torch.full((B, n), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((B, n), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(B, dtype=torch.bool, device=device)
    col = torch.zeros(1, dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if suppress is not None:
            logits = logits.index_fill(-1, suppress, float("-inf"))
        tokens = sample_next(logits, settings, generator, fused, sampler)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        out.index_copy_(1, col, tokens[:, None])
        out_mask.index_copy_(1, col, (~finished).long()[:, None])
        is_eos = (tokens[:, None] == eos[None, :]).any(dim=-1) & ~finished
        hit_eos.logical_or_(is_eos)
        finished.logical_or_(is_eos)
        col.add_(1)
        return tokens

    logits = decoder.prefill(prompt_ids, prompt_mask, n)
    plain = settings.do_sample and not settings.top_k and settings.top_p >= 1.0
    sampler = (triton_sampling.GumbelSampler(device, generator)
               if fused and plain and triton_sampler and triton_sampling.supported(logits) else None)
    advance = decoder.advance if getattr(decoder, "use_graph", False) else None
    steps = 0
    for i in range(n):
        last = i == n - 1
        if advance is not None and not last:
            logits = advance(pick, logits, generator)
        else:
            tokens = pick(logits)
        steps = i + 1
        if last or (steps % sync_every == 0 and bool(finished.all())):  # the check syncs
            break
        if advance is None:
            logits = decoder.step(tokens)
    if sync_every > 1:  # cut the columns decoded after the last row ended (all padding)
        live = out_mask[:, :steps].any(dim=0).nonzero()
        steps = int(live.max()) + 1 if len(live) else 1
    return out[:, :steps], out_mask[:, :steps], hit_eos


def _hf_batch(model, prompt_ids, prompt_mask, settings, seed, eos, pad_id):
    """Reference path through ``model.generate``; the global RNG is forked and seeded."""
    kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=eos.tolist(), pad_token_id=pad_id,
                  use_cache=True)  # training loaders switch the config's cache off
    if settings.do_sample:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k or None,
                      top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False)
    devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        seqs = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    resp = seqs[:, prompt_ids.shape[1] :]
    is_eos = torch.isin(resp, eos)
    # Tokens after the first EOS are padding.
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = (~after).long()
    return resp.masked_fill(after, pad_id), mask, is_eos.any(dim=1)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    settings: GenerationSettings,
    seed: int,
    *,
    max_prompt_length: int | None = None,
    eos_token_ids: list[int] | None = None,
    cache: Literal["dynamic", "static"] = "dynamic",
    backend: Literal["kv", "hf"] = "kv",
) -> GenerationResult:
    """Sample one response per prompt, ``settings.batch_size`` prompts per forward batch.

    The model is put in eval mode for the call (dropout off) and restored after. Responses end
    at the first EOS (from ``eos_token_ids``, else the tokenizer's and the generation config's)
    or after ``settings.max_new_tokens``. Padding uses the tokenizer's pad token, or EOS when it
    has none. Raises ValueError/TypeError naming the index of a malformed prompt.
    ``settings.cuda_graphs`` decodes with :class:`~alignment.fast_generation.GraphDecoder`
    (static cache, CUDA-graph step) instead of :class:`KVDecoder` (``cache`` is then ignored).
    """
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    eos_list = _eos_ids(model, tokenizer, eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_list[0]
    device = next(model.parameters()).device
    eos = torch.tensor(eos_list, device=device)
    encoded = [_encode(tokenizer, p, i) for i, p in enumerate(prompts)]
    if max_prompt_length is not None:  # keep the end (and a leading BOS), as the trainers do
        trunc = Truncation(max_prompt_length + 1, max_prompt_length, "truncate", tokenizer.bos_token_id)
        encoded = [trunc.apply(ids, [])[0] for ids in encoded]
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(encoded), settings.batch_size):
            ids, mask = left_pad(encoded[start : start + settings.batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            if backend == "hf":
                resp, resp_mask, hit = _hf_batch(model, ids, mask, settings, seed + start, eos, pad_id)
            else:
                decoder = (GraphDecoder(model, compile_step=settings.compile_step,
                                        fuse_projections=settings.fuse_projections,
                                        triton_attention=settings.triton_attention,
                                        fuse_cache_update=settings.triton_attention)
                           if settings.cuda_graphs else KVDecoder(model, cache))
                resp, resp_mask, hit = _decode_batch(decoder, ids, mask, settings, generator, eos, pad_id,
                                                     _suppressed_ids(model, device))
            resp, resp_mask = resp.cpu(), resp_mask.cpu()
            texts = [
                tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                for row, m in zip(resp, resp_mask, strict=True)
            ]
            parts.append(GenerationResult(ids.cpu(), mask.cpu(), resp, resp_mask, hit.cpu(), texts, pad_id))
    finally:
        model.train(was_training)
    return GenerationResult.concat(parts)


@torch.no_grad()
def response_logps(model, gen: GenerationResult, temperature: float, batch_size: int = 64) -> torch.Tensor:
    """Σ_t log softmax(logits / T)[y_t] over each sampled response's tokens (EOS included), as
    float64 on the CPU, scored from the generated token ids themselves (re-tokenising the text
    would change them). :func:`response_logps_at` at one temperature."""
    return response_logps_at(model, gen, (temperature,), batch_size)[0]


@torch.no_grad()
def response_logps_at(model, gen: GenerationResult, temperatures: Sequence[float],
                      batch_size: int = 64) -> list[torch.Tensor]:
    """:func:`response_logps` at each of ``temperatures`` from one forward pass per batch (the
    evaluation scores the reference's likelihood at the sampling temperature and at 1).

    Logits are computed for the response positions only where the model takes
    ``logits_to_keep``, passed as the positions' indices: transformers then gathers the hidden
    states into a contiguous block, whose LM-head matmul runs as one plain matrix product (an int
    ``logits_to_keep`` slices them, and the strided slice's product took about twice as long on CPU,
    with the same result)."""
    device = next(model.parameters()).device
    ids, mask = gen.sequences()
    P = gen.prompt_ids.shape[1]
    R = ids.shape[1] - P
    keep = "logits_to_keep" in _forward_params(model)
    wanted = torch.arange(P - 1, P - 1 + R, device=device)  # position P-1+j predicts response token j
    out: list[list[torch.Tensor]] = [[] for _ in temperatures]
    for s in range(0, len(gen), batch_size):
        b_ids, b_mask = ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)
        positions = (b_mask.cumsum(1) - 1).clamp_min(0)
        extra = {"logits_to_keep": wanted} if keep else {}
        logits = model(input_ids=b_ids, attention_mask=b_mask, position_ids=positions, **extra).logits
        if not keep:
            logits = logits[:, P - 1 : P - 1 + R]
        labels = gen.response_ids[s : s + batch_size].to(device).masked_fill(
            gen.response_mask[s : s + batch_size].to(device) == 0, -100)
        for got, temperature in zip(out, temperatures, strict=True):
            got.append(selective_log_softmax(logits, labels, temperature=temperature).sum(-1).cpu())
    return [torch.cat(got).double() for got in out]
