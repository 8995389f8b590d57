"""Loading, wrapping and saving the models a recipe trains or consults.

* :func:`load_tokenizer`, :func:`load_causal_lm`, :func:`load_reward_model`,
  :func:`load_reference` — any hub id or local folder, fp32/bf16, optional LoRA/QLoRA,
  ``trust_remote_code`` only when configured.
* :class:`CausalLMLogps` and :class:`ScalarReward` — the modules recipes hand to
  ``accelerate``: their ``forward`` takes the batch layout of :mod:`alignment.batching` and
  returns per-sequence label log-probs (computed from hidden states chunk-wise, so the full
  ``[tokens, vocab]`` logits never exist) or pooled scalar rewards.
* :func:`save_model_folder` — an ordinary HF folder of safetensors (LoRA: the adapter plus
  ``merged/`` full weights for serving); :func:`score_responses` — reward-model scoring.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignment.batching import (
    Prompt,
    Truncation,
    collate_sequences,
    encode_completion,
    encode_prompt,
    to_device,
)
from alignment.config import LoraSettings, ModelSettings
from alignment.fast_paths import VARLEN_ATTENTION, attention_implementation
from alignment.logprobs import logps_from_hidden, selective_log_softmax
from alignment.losses import entropy_from_hidden, entropy_from_logits, entropy_from_logp
from alignment.prompt_sharing import collate_shared_prompt, shared_prompt_mask

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes of models whose logits are not a plain linear map of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
}
"""Named chat templates for ``ModelSettings.chat_template`` (anything else given is the Jinja template itself)."""


def load_tokenizer(settings: ModelSettings):
    """The model's tokenizer with right padding, a pad token (EOS when it has none) and
    ``settings.chat_template`` when set (:data:`CHAT_TEMPLATES` names, or the template itself).

    Raises ValueError when it has neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        settings.tokenizer or settings.name_or_path, revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )
    if settings.chat_template:
        tok.chat_template = CHAT_TEMPLATES.get(settings.chat_template, settings.chat_template)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {settings.name_or_path} has no pad and no eos token; add a pad token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def import_bitsandbytes():
    """bitsandbytes, imported without the compiled CPU kernel it would fetch from the Hugging Face Hub.

    On a CPU with AVX-512 bf16, importing bitsandbytes (0.50) asks the Hub, through the ``kernels``
    package that transformers installs, for ``kernels-community/quantization-bitsandbytes``, and with a
    network downloads and loads that compiled code. Our 4-bit layers never run it (the loader keeps
    them in their trainable layout, :func:`_keep_4bit_layout`), so the import runs with ``kernels``
    hidden: bitsandbytes falls back to its own kernels (its warning about the missing package is
    silenced) and no code comes from the network. Later imports, transformers' included, reuse the
    module. Raises ImportError when bitsandbytes is not installed."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError inside bitsandbytes
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        cpu_ops.setLevel(level)
        if kernels is missing:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = kernels
    return bitsandbytes


def preload_bitsandbytes() -> None:
    """:func:`import_bitsandbytes` where bitsandbytes is installed: call before peft builds or loads LoRA
    layers (peft imports bitsandbytes whenever it is installed, QLoRA or not) or transformers loads a
    4-bit model."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        import_bitsandbytes()


def _load_kwargs(settings: ModelSettings) -> dict:
    kwargs = {"dtype": _DTYPES[settings.dtype], "revision": settings.revision,
              "trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if settings.lora is not None and settings.lora.quantize_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("lora.quantize_4bit (QLoRA) needs the bitsandbytes package: pip install bitsandbytes")
        import_bitsandbytes()  # before transformers imports it
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif (Path(settings.name_or_path) / "adapter_config.json").is_file():
        preload_bitsandbytes()  # transformers loads an adapter folder through peft
    return kwargs


def same_attention_on_recompute(config):
    """A ``torch.utils.checkpoint`` ``context_fn``: a checkpointed layer is recomputed in the
    backward under the attention implementation its forward ran with.

    :func:`decoder_hidden` switches to varlen attention around the forward only; the backward's
    recomputation ran outside that block, under the model's own attention, which saves other
    tensors, so ``gradient_checkpointing`` with ``varlen_attention`` raised ``CheckpointError``
    (run 17, benchmarks/RESULTS.md). The implementation is read when the layer's forward runs."""

    def context_fn():
        return nullcontext(), attention_implementation(config, config._attn_implementation)

    return context_fn


def enable_checkpointing(model, kwargs: dict) -> None:
    """Activation checkpointing with ``kwargs`` for ``torch.utils.checkpoint``: transformers' new name where it has
    it (``gradient_checkpointing_enable`` warns from 5.2x and goes in v6), the old one before."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _finish(model, settings: ModelSettings, task_type: str, trainable: bool):
    """Training switches shared by policy and reward models: no KV cache, checkpointing, LoRA."""
    model.config.use_cache = False  # a cache during training also disables packed-sequence masks
    if settings.lora is not None and settings.lora.quantize_4bit:
        _keep_4bit_layout(model)
    if not trainable:
        return freeze(model)
    checkpointing = {"use_reentrant": False, "context_fn": same_attention_on_recompute(model.config)}
    if settings.gradient_checkpointing:
        enable_checkpointing(model, checkpointing)
    if settings.lora is not None:
        # QLoRA: no peft.prepare_model_for_kbit_training. It casts every weight that is not 4-bit to
        # fp32, which for the 8B shape is 3.9 GiB of embeddings and LM head instead of 2.0 (run 19's
        # allocation trace, benchmarks/RESULTS.md), and puts fp32 into every layer's residual stream;
        # the matmuls run in bf16 either way, as in plain bf16 LoRA. The freezing it does, apply_lora
        # does, and non-reentrant checkpointing needs no input-gradient hook.
        model = apply_lora(model, settings.lora, task_type)
    return model


def _keep_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit layers in their trainable layout on a CPU.

    On a CPU with AVX-512 bf16, bitsandbytes (0.50) repacks a 4-bit layer's weight for its inference
    kernel at the first forward in eval mode without gradients (an evaluation), and keeps that
    layout when training resumes: the layer then runs a kernel without a backward, and the gradient
    through the frozen base to every earlier adapter is dropped (torch warns that it may be
    "silently incorrect"). Evaluation is slower on the CPU without the repack; training is right."""
    bnb = import_bitsandbytes()

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_causal_lm(settings: ModelSettings, *, trainable: bool = True):
    """An ``AutoModelForCausalLM`` from ``settings`` (LoRA-wrapped when ``settings.lora``).

    ``trainable=False`` gives a frozen eval-mode model and ignores LoRA.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.name_or_path, **_load_kwargs(settings))
    return _finish(model, settings, "CAUSAL_LM", trainable)


def load_reward_model(settings: ModelSettings, tokenizer, *, trainable: bool = True):
    """A scalar reward model: ``AutoModelForSequenceClassification`` with ``num_labels=1`` on a
    causal-LM or encoder backbone (a fresh head on a plain backbone, the trained head on a
    folder written by the reward recipe). ``config.pad_token_id`` is set from the tokenizer so
    the HF forward pools the last non-pad token as :class:`ScalarReward` does."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        settings.name_or_path, num_labels=1, **_load_kwargs(settings)
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, settings, "SEQ_CLS", trainable)


def apply_lora(model, lora: LoraSettings, task_type: str):
    """Wrap ``model`` in peft LoRA adapters; only adapter (and, for SEQ_CLS, head) weights train."""
    preload_bitsandbytes()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no grads: for references and scorers."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference(policy: ModelSettings, reference: ModelSettings | None = None):
    """The frozen reference: ``reference`` if given, else the policy's base weights (no LoRA)."""
    settings = reference or policy.model_copy(update={"lora": None, "gradient_checkpointing": False})
    return load_causal_lm(settings, trainable=False)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is only needed for LoRA
        return False
    return isinstance(model, PeftModel)


def hf_model(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected), or ``model``."""
    return model.get_base_model() if is_peft(model) else model


def adapter_disabled(model):
    """Context in which a peft model runs as its base model; a no-op for other models."""
    return model.disable_adapter() if is_peft(model) else nullcontext()


def hidden_path_ok(model) -> bool:
    """True when label log-probs can come from the last hidden state and the head weight:
    a plain ``nn.Linear`` head (not LoRA-wrapped) and no logit scaling or soft-capping."""
    inner = hf_model(model)
    head = inner.get_output_embeddings()
    return type(head) is nn.Linear and not any(getattr(inner.config, a, None) for a in _LOGIT_TRANSFORMS)


def decoder_hidden(inner, batch: dict, *, causal_padding: bool = False, varlen: bool = False) -> torch.Tensor:
    """Last hidden states ``[R, T, H]`` of a collated batch through the decoder ``inner.base_model``.

    Padded batches use their mask (none with ``causal_padding``: right padding never reaches a
    real token under causal attention). Packed batches go through transformers' block-diagonal
    mask, or, with ``varlen`` (and the batch's ``cu_seq_lens``), through
    :func:`alignment.fast_paths.varlen_attention` on the rows flattened into one. Prompt-sharing
    batches (:mod:`alignment.prompt_sharing`) carry their own mask.
    """
    ids, positions = batch["input_ids"], batch["position_ids"]
    if varlen and "cu_seq_lens" in batch:
        cu, longest = batch["cu_seq_lens"], batch["max_seq_len"]
        with attention_implementation(inner.config, VARLEN_ATTENTION):
            hidden = inner.base_model(input_ids=ids.reshape(1, -1), position_ids=positions.reshape(1, -1),
                                      use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                                      max_length_k=longest).last_hidden_state
        return hidden.view(*ids.shape, -1)
    mask, implementation = _attention_mask(inner, batch, causal_padding)
    with implementation:
        return inner.base_model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                use_cache=False).last_hidden_state


def _attention_mask(inner, batch: dict, causal_padding: bool):
    """(mask, context) for a forward of ``batch``: a prompt-sharing batch's own mask
    (:func:`alignment.prompt_sharing.shared_prompt_mask`) under SDPA, which takes it as is;
    otherwise the padding mask (none with ``causal_padding``) under the model's attention."""
    if "share_group" in batch:
        return (shared_prompt_mask(batch["share_group"], batch["share_segment"]),
                attention_implementation(inner.config, "sdpa"))
    return (None if causal_padding else batch.get("attention_mask")), nullcontext()


class CausalLMLogps(nn.Module):
    """``forward(batch) -> {"seq_logps" [S], "seq_tokens" [S], "token_logps" [N]}`` (fp32).

    ``token_logps`` are the log-probs of the N completion targets in the order of
    ``batch["target_index"]``; ``seq_logps`` their sum per sequence. The LM head is applied to
    the hidden states of target positions only (prompt and padding positions never get logits)
    when :func:`hidden_path_ok`: N above ``chunk_size`` goes through the chunked, recomputing
    :func:`~alignment.logprobs.logps_from_hidden` (never more than ``chunk_size x V`` fp32
    logits); N within it, through one plain fp32 log-softmax of those N rows. Otherwise real
    logits with chunked :func:`~alignment.logprobs.selective_log_softmax`. The wrapped model is
    ``self.model``.
    """

    def __init__(self, model, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.use_hidden = hidden_path_ok(model)
        self.compiled_head = False
        """GPU fast path: compiled log-prob blocks (set by :func:`alignment.fast_paths.compile_layers`)."""
        self.causal_padding = False
        """GPU fast path: ignore the padding mask of right-padded batches (see ``TrainSettings.causal_padding``)."""
        self.varlen_attention = False
        """GPU fast path: packed batches through variable-length attention (``TrainSettings.varlen_attention``)."""
        self.with_entropy = False
        """Also return ``seq_entropy`` [S]: per sequence, the sum over its targets of the entropy of the
        policy's next-token distribution (:func:`~alignment.losses.entropy_from_hidden`; DPO's ``entropy_coef``)."""
        self.entropy_exclude: int | None = None
        """With ``with_entropy``: a token id (EOS) whose mass the entropy leaves out, renormalising the
        rest (:func:`~alignment.losses.entropy_without_token`; DPO's ``entropy_excludes_eos``)."""

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        inner = hf_model(self.model)
        index, targets = batch["target_index"], batch["target_ids"]
        if self.use_hidden:
            hidden = decoder_hidden(inner, batch, causal_padding=self.causal_padding, varlen=self.varlen_attention)
            picked = hidden.flatten(0, 1).index_select(0, index)
            head = inner.get_output_embeddings()
            if index.numel() <= self.chunk_size:
                # One chunk's worth: chunking bounds no memory here, and plain autograd is about
                # twice as fast (measured on CPU) as the recomputing chunked function.
                logp = F.linear(picked, head.weight, head.bias).float().log_softmax(-1)
                tok = logp.gather(-1, targets[:, None])[:, 0]
                if self.with_entropy:  # from the same log-softmax, not a second pass of the head
                    ent = entropy_from_logp(logp, self.entropy_exclude)
            else:
                tok = logps_from_hidden(picked[None], head.weight, targets[None], None, self.chunk_size,
                                        lm_head_bias=head.bias, compiled=self.compiled_head)[0]
                if self.with_entropy:
                    ent = entropy_from_hidden(picked, head.weight, head.bias, self.chunk_size, self.entropy_exclude)
        else:
            mask, implementation = _attention_mask(inner, batch, self.causal_padding)
            with implementation:
                logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                    attention_mask=mask, use_cache=False).logits
            picked = logits.flatten(0, 1).index_select(0, index)
            tok = selective_log_softmax(picked[None], targets[None], self.chunk_size)[0]
            if self.with_entropy:
                ent = entropy_from_logits(picked, self.chunk_size, self.entropy_exclude)
        n = batch["num_sequences"]
        seq = batch["target_seq"]
        seq_logps = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, seq, tok)
        seq_tokens = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, seq, torch.ones_like(tok))
        out = {"seq_logps": seq_logps, "seq_tokens": seq_tokens, "token_logps": tok}
        if self.with_entropy:
            out["seq_entropy"] = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, seq, ent.float())
        return out


def response_pooled_hidden(hidden: torch.Tensor, target_index: torch.Tensor, target_seq: torch.Tensor,
                           last_index: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Sum (``reduce="sum"``) or mean (``"mean"``) hidden state ``[S, H]`` over each sequence's
    response tokens, from the batch layout of :mod:`alignment.batching`.

    ``hidden`` is the flattened ``[R*T, H]`` grid. The response tokens of sequence s sit at the
    positions that predict its targets shifted by one token: every target position but the first
    (that one is the prompt's last token) plus the sequence's last token, so with K(s) those
    positions (|K(s)| = the response's length)

        sum_s = sum_{k in K(s)} h_k            mean_s = sum_s / |K(s)|

    in every layout: padded, packed and prompt-shared (``target_seq`` runs 0..S-1 in order in
    each). A sequence without response tokens gets its last (prompt) token's hidden state.
    """
    n = last_index.numel()
    first = torch.ones_like(target_seq, dtype=torch.bool)
    first[1:] = target_seq[1:] != target_seq[:-1]
    keep = ~first
    index = torch.cat([target_index[keep], last_index])
    seq = torch.cat([target_seq[keep], torch.arange(n, device=last_index.device)])
    sums = hidden.new_zeros(n, hidden.shape[-1]).index_add(0, seq, hidden.index_select(0, index))
    if reduce == "sum":
        return sums
    if reduce != "mean":
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return sums / torch.bincount(seq, minlength=n).to(hidden.dtype)[:, None]


class ScalarReward(nn.Module):
    """``forward(batch) -> rewards [S]`` (fp32) of a ``num_labels=1`` sequence-classification model.

    Causal-LM backbones (a ``score`` head): the head is applied to the hidden state of each
    sequence's last token (``batch["last_index"]``), or, when the model's config says
    ``reward_pooling: sum`` or ``mean`` (set by the reward recipe, saved in its ``config.json``),
    to the sum or mean of the hidden states over the response tokens
    (:func:`response_pooled_hidden`; with the bias-free ``score`` head that is the sum or mean of
    per-token scores); all work padded or packed and need no pad-token convention. Encoder
    backbones (e.g. BERT, ``classifier`` head) use the model's own pooling and need padded batches.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.decoder_head = hasattr(hf_model(model), "score")
        self.causal_padding = False
        """GPU fast path for decoder backbones: ignore the padding mask of right-padded batches."""
        self.varlen_attention = False
        """GPU fast path for decoder backbones: packed batches through variable-length attention."""

    @property
    def pooling(self) -> str:
        """``last``, ``sum`` or ``mean`` (the wrapped model's ``config.reward_pooling``; ``last`` when unset)."""
        return getattr(hf_model(self.model).config, "reward_pooling", None) or "last"

    def forward(self, batch: dict) -> torch.Tensor:
        inner = hf_model(self.model)
        mask = batch.get("attention_mask")
        if not self.decoder_head:
            if mask is None:
                raise ValueError("encoder reward models need padded batches (set packing: false)")
            return self.model(input_ids=batch["input_ids"], attention_mask=mask).logits[:, 0].float()
        hidden = decoder_hidden(inner, batch, causal_padding=self.causal_padding, varlen=self.varlen_attention)
        flat = hidden.flatten(0, 1)
        pooling = self.pooling
        if pooling != "last":
            pooled = response_pooled_hidden(flat, batch["target_index"], batch["target_seq"], batch["last_index"],
                                            pooling)
        else:
            pooled = flat.index_select(0, batch["last_index"])
        return inner.score(pooled)[:, 0].float()


HALF_PRECISION_RTOL = 2.0**-4
"""Layout checks of a model with any weight not in fp32: the share of the largest hidden state that
two layouts may differ by. bf16 rounds each matmul to 2^-8 of its scale and the difference grows with
depth and with the scale of the hidden states (a random 8B model under 4-bit QLoRA fell outside an
absolute tolerance, run 18); a real layout bug (a packed row attending across its sequences) moves
the affected hidden states by about half their scale (``test_layout_check_catches_a_packed_row_
attending_across_sequences``), eight times this."""


def _layouts_agree(inner, layouts, hidden_of, device, atol: float, what: str) -> bool:
    """Eval-mode forwards of each batch in ``layouts``; True when ``hidden_of(batch)`` (the hidden
    states compared, ``[N, H]``) agree: within ``atol`` when every weight is fp32; otherwise (half
    precision, or 4-bit QLoRA, whose matmuls run in bf16 on dequantized weights) within
    ``100 * atol`` plus :data:`HALF_PRECISION_RTOL` of the largest hidden state.
    A model that raises on a layout does not support it: logged, False. A failing check logs its
    figures (largest and mean difference, tolerance, scale)."""
    was_training = inner.training
    inner.eval()
    try:
        picked = [hidden_of(to_device(b, device)).float().cpu() for b in layouts]
    except Exception as err:
        log.warning("%s check failed (%s); not using it", what, err)
        return False
    finally:
        inner.train(was_training)
    scale = picked[0].abs().max().item()
    full_precision = all(p.dtype == torch.float32 for p in inner.parameters())
    tolerance = atol if full_precision else 100 * atol + HALF_PRECISION_RTOL * scale
    diff = (picked[0] - picked[1]).abs()
    if diff.max().item() <= tolerance:
        return True
    log.warning("%s check: max |difference| %.3g (mean %.3g) against the tolerance %.3g; hidden states up to %.3g",
                what, diff.max().item(), diff.mean().item(), tolerance, scale)
    return False


@torch.no_grad()
def packing_supported(model, device: torch.device | str | None = None, atol: float = 1e-4) -> bool:
    """Check on two short random sequences that a packed forward (restarting ``position_ids``,
    no attention mask) gives the same hidden states as a padded one. False means: pad instead."""
    inner = hf_model(model)
    gen = torch.Generator().manual_seed(0)
    vocab = inner.config.vocab_size
    lengths = (6, 4, 2)  # packs as [seq0] and [seq1, seq2]: two sequences share a row
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    layouts = [collate_sequences([[]] * 3, seqs, pad_id=0, packing=p) for p in (False, True)]

    def real_tokens(b: dict) -> torch.Tensor:
        out = inner.base_model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                               attention_mask=b.get("attention_mask"), use_cache=False).last_hidden_state
        flat = out.flatten(0, 1)
        return torch.cat([flat[end - n + 1 : end + 1] for end, n in zip(b["last_index"].tolist(), lengths,
                                                                          strict=True)])

    return _layouts_agree(inner, layouts, real_tokens, device or next(inner.parameters()).device, atol, "packing")


@torch.no_grad()
def shared_prompt_supported(model, device: torch.device | str | None = None, atol: float = 1e-4) -> bool:
    """Check on two short random pairs that the prompt-sharing layout
    (:mod:`alignment.prompt_sharing`) gives the plain layout's hidden states at every target and
    last position. False means: run the plain layout."""
    inner = hf_model(model)
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, inner.config.vocab_size, (n,), generator=gen).tolist()

    prompts, chosen, rejected = [ids(5), ids(3)], [ids(4), ids(2)], [ids(3), ids(5)]
    layouts = [collate_sequences(prompts + prompts, chosen + rejected, pad_id=0),
               collate_shared_prompt(prompts, chosen, rejected, pad_id=0)]

    def scored_positions(b: dict) -> torch.Tensor:
        return decoder_hidden(inner, b).flatten(0, 1)[torch.cat([b["target_index"], b["last_index"]])]

    return _layouts_agree(inner, layouts, scored_positions, device or next(inner.parameters()).device, atol,
                          "prompt-sharing")


def _unsharded_copy(model, state_dict: dict[str, torch.Tensor]):
    """A plain CPU copy of the peft ``model`` (whose parameters may be FSDP shards, or 4-bit) holding
    ``state_dict``, its full weights as ``model.state_dict()`` names them: the same classes and
    configs (less any quantization) built on the meta device, then given the tensors (no second
    copy of the weights)."""
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model()
    plain = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))  # fully_shard made FSDP<cls>
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # the copy holds plain weights: saved, it must load as such
        del config.quantization_config
    with torch.device("meta"):
        replica = get_peft_model(plain._from_config(config), copy.deepcopy(model.peft_config[model.active_adapter]))
    replica.load_state_dict(state_dict, strict=True, assign=True)
    if getattr(base, "generation_config", None) is not None:
        replica.get_base_model().generation_config = copy.deepcopy(base.generation_config)
    return replica


def is_quantized(model) -> bool:
    """True for a model (or peft model) loaded in 4 bits through bitsandbytes (QLoRA: ``lora.quantize_4bit``)."""
    base = model.get_base_model() if is_peft(model) else model
    return bool(getattr(base, "is_loaded_in_4bit", False))


def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """A QLoRA ``model``'s full weights as plain CPU tensors under ``model.state_dict()``'s names:
    each 4-bit layer's weight dequantized to the dtype it was loaded in (what its forward computes
    with), its quantization state left out; the other tensors copied.

    Why: peft's merge into a 4-bit layer rounds W + BA to NF4 again, which moves the weights by
    more than a small adapter does (the merged model then matches neither the trained one nor the
    base). Merged into these instead, the weights are the trained model's."""
    bnb = import_bitsandbytes()

    quantized = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    state = {}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".weight")[0] if ".weight" in key else None
        if owner in quantized:
            continue  # the packed weight and its quantization state (absmax, quant_map, ...)
        state[key] = tensor.detach().to("cpu", copy=True)
    for name, module in quantized.items():
        weight = module.weight
        state[f"{name}.weight"] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to("cpu")
    return state


def _sort_adapter_config(config_file: Path) -> None:
    """PEFT writes set-valued fields (``target_modules`` resolved from ``all-linear``) in set
    order, which changes with the process's string hash seed: the same adapter would get another
    folder digest (and miss every cache keyed by it) in the next process. Sorted, it does not."""
    config = json.loads(config_file.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_model_folder(model, tokenizer, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save an ordinary HF folder with safetensors weights and the tokenizer.

    LoRA: ``path`` holds the adapter (``adapter_model.safetensors``, ``adapter_config.json``) and
    ``path/merged`` the full merged weights (a copy is merged, ``model`` is left untouched). QLoRA:
    the merged weights are the dequantized base plus the adapter (:func:`dequantized_state_dict`), in
    the dtype the base was loaded in, a plain folder that loads without bitsandbytes.
    The saved config has the KV cache on, for serving. Returns ``path``.

    ``state_dict``: the model's full weights by ``state_dict()`` name, written instead of its own
    parameters — for a model sharded over processes (FSDP), whose own are shards: every process
    gathers (:func:`alignment.recipes.checkpoint.gather_state_dict`), the main one calls this. The
    files are the same as an unsharded model's with those weights; under LoRA the merge runs on a
    plain CPU copy built from the config, holding ``state_dict``'s tensors (the adapted weights
    among them are merged in place: pass tensors of your own, as a gather gives).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {} if state_dict is None else {"state_dict": state_dict}
    full, full_path = model, path
    if is_peft(model):
        model.save_pretrained(str(path), **weights)  # adapter weights only, PEFT's key names
        _sort_adapter_config(path / "adapter_config.json")
        tokenizer.save_pretrained(str(path))
        if state_dict is None and is_quantized(model):
            state_dict = dequantized_state_dict(model)  # merged into plain weights, not rounded back to 4 bits
        replica = copy.deepcopy(model) if state_dict is None else _unsharded_copy(model, state_dict)
        full, full_path, weights = replica.merge_and_unload(), path / "merged", {}
    use_cache, full.config.use_cache = full.config.use_cache, True  # on for serving, restored for training
    try:
        full.save_pretrained(str(full_path), **weights)
    finally:
        full.config.use_cache = use_cache
    tokenizer.save_pretrained(str(full_path))
    return path


@torch.no_grad()
def score_responses(
    reward_model, tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16,
    *, max_length: int = 1024, max_prompt_length: int = 512,
) -> list[float]:
    """Rewards of (prompt, response) pairs, tokenized as the reward recipe trains (prompt
    through the chat template when it is a message list, response without EOS, the prompt's end
    kept when too long). ``reward_model`` is a sequence-classification model or a ScalarReward."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    scorer = reward_model if isinstance(reward_model, ScalarReward) else ScalarReward(reward_model)
    device = next(scorer.parameters()).device
    trunc = Truncation(max_length, max_prompt_length, "truncate", tokenizer.bos_token_id)
    was_training = scorer.model.training  # a fresh wrapper says "training"; the model knows
    scorer.eval()
    out: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            pairs = [trunc.apply(encode_prompt(tokenizer, p), [encode_completion(tokenizer, r, False)])
                     for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size],
                                     strict=True)]
            batch = collate_sequences([p for p, _ in pairs], [c[0] for _, c in pairs], pad_id=tokenizer.pad_token_id)
            out.extend(scorer(to_device(batch, device)).tolist())
    finally:
        scorer.train(was_training)
    return out


def _weight_files(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.iterdir())
            if f.suffix in {".json", ".safetensors", ".bin"} and "tokenizer" not in f.name]


def _files_digest(files: list[Path]) -> str:
    """sha256 over the files' names and bytes."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def folder_digest(folder: str | Path, memo_dir: str | Path | None = None) -> str:
    """Digest (64 hex) of a local model folder's config and weight bytes: the one model-folder
    digest of the project (caches in ``alignment/`` and the pipeline's stage keys).

    Why every byte and not a sample: a digest that samples file ends misses weights rewritten
    in the middle with the same size (a fine-tune of a few layers), and a stale cache then
    hands on another model's results; the memo below makes the full hash a one-time cost.
    Tokenizer files are left out (tokenization has its own digest where it matters, e.g. the
    reference cache), as are subfolders.

    Hashing reads every weight byte (seconds to a minute for 1–15 GB). With ``memo_dir`` the
    result is remembered there (never in the model folder, whose own digest would change),
    with each file's size and mtime, and reused while those are unchanged (rewriting a file
    changes its mtime). Where the memo cannot be written the folder is simply hashed again.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    stat = [[f.name, st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
    memo = None
    if memo_dir is not None:
        memo = Path(memo_dir) / "fingerprints" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24] + ".json")
        try:
            kept = json.loads(memo.read_text())
            if kept.get("files") == stat and isinstance(kept.get("digest"), str):
                return kept["digest"]
        except (OSError, ValueError, AttributeError):
            pass
    digest = _files_digest(files)
    if memo is not None:
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"folder": str(folder.resolve()), "files": stat, "digest": digest}))
            os.replace(tmp, memo)  # atomic: several processes may fingerprint the same folder
        except OSError:
            tmp.unlink(missing_ok=True)
    return digest


def model_fingerprint(settings: ModelSettings, memo_dir: str | Path | None = None) -> str:
    """Digest of a model's identity for caches: the bytes of a local folder's config and weight
    files (so rewritten weights never hit a stale cache; remembered in ``memo_dir`` while their
    sizes and mtimes are unchanged), or hub id + revision, plus the dtype."""
    h = hashlib.sha256(f"{settings.dtype}|{settings.attn_implementation}".encode())
    folder = Path(settings.name_or_path)
    if folder.is_dir():
        h.update(folder_digest(folder, memo_dir).encode())
    else:
        h.update(f"{settings.name_or_path}@{settings.revision}".encode())
    return h.hexdigest()[:16]
