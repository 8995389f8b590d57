"""Typed training configuration for every recipe in :mod:`alignment.recipes`.

Each config is a pydantic model with a docstring per field; loading validates types and
ranges and names the offending field (``dpo.beta: Input should be greater than 0``).
Configs are plain data: a recipe run is fully described by its config, which is saved in
every checkpoint and compared on resume (see :func:`config_diff`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors; field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraSettings(StrictModel):
    """Low-rank adapters through peft. With LoRA on, only adapter weights train and the
    reference model is the same network with the adapter disabled (no second copy)."""

    r: int = Field(16, gt=0)
    """Adapter rank."""
    alpha: int = Field(32, gt=0)
    """Scaling numerator: the adapter output is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input. Keep 0 for exact resume and reference equality checks."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. ["q_proj", "v_proj"]) or "all-linear"."""
    quantize_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit NF4 (needs the bitsandbytes package; on a CPU too, slowly). The
    saved ``merged/`` folder holds the dequantized base plus the adapter, a plain model for serving."""


class ModelSettings(StrictModel):
    """Where a model comes from and how it is loaded."""

    name_or_path: str
    """Hugging Face hub id or local folder of an ``AutoModelForCausalLM`` (or encoder for reward models)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id."""
    tokenizer: str | None = None
    """Tokenizer id or path when it differs from the model's."""
    chat_template: str | None = None
    """The chat template that turns chat-conversation prompts (HH-RLHF, chat lists) into text, for a tokenizer that
    has none (most base models) or instead of its own: a Jinja template, or ``chatml`` (ChatML's
    ``<|im_start|>role ... <|im_end|>``, written as plain text, no new tokens). Saved with every trained model's
    tokenizer, so evaluation and serving use it too."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype at load. Mixed precision is separate (see ``TrainSettings.precision``)."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers ("sdpa", "eager", "flex_attention", ...); None lets it choose."""
    trust_remote_code: bool = False
    """Allow custom model code from the hub. Off unless you trust the repository."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""


class OptimSettings(StrictModel):
    """AdamW with warmup then a schedule."""

    lr: float = Field(5e-6, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to ``lr`` over this many optimizer steps."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup, to ``min_lr_ratio`` * ``lr`` at the last step (constant keeps ``lr``)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the linear/cosine decay as a share of ``lr`` (OpenRLHF's ``min_lr`` = 0.1 * lr): with
    0 the last steps of a run barely move the weights, so an RL run's adaptive KL controller cannot
    correct a late overshoot."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping (the norm is still logged)."""
    fused: bool | None = None
    """Use the fused AdamW kernel; None picks it on CUDA."""


class TrainSettings(StrictModel):
    """What every recipe shares: data, batch, loop, precision, checkpoints."""

    output_dir: str | None = None
    """Run folder: checkpoints/, final/, metrics.jsonl and summary.json are written here (the pipeline fills it)."""
    train_path: str | None = None
    """Training data: Parquet file or folder of a saved ``datasets.Dataset`` (the pipeline fills it)."""
    eval_path: str | None = None
    """Held-out data of the same layout; evaluated every ``eval_every`` steps and at the end."""
    seed: int = 0
    """Seeds python, numpy and torch (CPU and CUDA) and the data order."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed); ``max_steps`` wins when set."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(8, gt=0)
    """Examples (pairs for DPO/RM) per device per micro-batch."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step. Global batch = batch_size * grad_accum * processes."""
    max_length: int = Field(512, gt=0)
    """Longest prompt + completion in tokens; longer examples are truncated (see ``truncation``)."""
    max_prompt_length: int = Field(256, gt=0)
    """Longest prompt in tokens; longer prompts keep their end (the part nearest the response)."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Over-long examples: "truncate" keeps the end of the prompt and the start of the completion
    (see ``max_prompt_length``/``max_length``); "drop" skips them (the count is logged)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; bf16 on GPUs that support it. Losses and log-prob sums stay fp32."""
    length_grouping: bool = True
    """Batch examples of similar length together to cut padding (order is still seeded)."""
    packing: bool = False
    """Padding-free batches: concatenate sequences with restarting position ids (models that support it)."""
    share_prompt: bool = False
    """Pair recipes (DPO, reward model) with a causal decoder: run each pair's prompt once, with
    both responses after it under a mask that keeps them apart (:mod:`alignment.prompt_sharing`),
    instead of twice. Same results (checked on the model at setup); saves the prompt's share of
    the tokens. Overrides ``varlen_attention`` and ``causal_padding`` for pair batches."""
    share_responses: bool = False
    """Pair recipes (DPO, reward model), with ``share_prompt`` verified on the model: each distinct
    prompt of a batch runs once and each distinct response of it once, and every pair is scored from
    those (:func:`alignment.prompt_sharing.collate_response_groups`); the sampler keeps a prompt's pairs
    in the same batches. Data that compares K responses of a prompt in several pairs (a ranking in all
    its pairs, the demo's ``random_pairs``) then runs K responses instead of two per pair; the loss is
    the same (batches are drawn by prompt, so the order of steps differs from the default's)."""
    logprob_chunk_size: int = Field(1024, gt=0)
    """Tokens per chunk when computing label log-probs, bounding the fp32 vocab buffer."""
    optim: OptimSettings = OptimSettings()
    """Optimizer and schedule."""
    log_every: int = Field(1, gt=0)
    """Emit metrics every this many optimizer steps."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate on ``eval_path`` every this many steps (None: only at the end)."""
    save_every: int | None = Field(None, gt=0)
    """Checkpoint every this many steps (always at the end). Resume starts from the newest one."""
    keep_checkpoints: int = Field(2, gt=0)
    """Checkpoints kept on disk; older ones are deleted after a new one is written."""
    keep_checkpoints_after_finish: bool = True
    """Keep ``checkpoints/`` once the run has finished (``final/`` and ``summary.json`` written).
    False: delete them then; a finished run needs no resume state, and each checkpoint holds the
    trainable weights plus the optimizer's moments (about 3x the trainable weights). The pipeline
    sets False unless its recipe section says otherwise: a loop left running would otherwise keep
    them for every stage of every round."""
    resume: bool = True
    """Resume from the newest checkpoint in ``output_dir`` when one exists (config must match)."""
    cudnn_attention: bool = False
    """Let scaled-dot-product attention use cuDNN's kernel on CUDA. Off by default: cuDNN builds an
    execution plan for every new sequence length, and ragged or packed batches bring a new length
    nearly every step (measured on an H100 with torch 2.11: eager DPO ran 2.5x slower with it);
    flash and memory-efficient attention have no per-shape cost."""
    causal_padding: bool = False
    """With ``packing: false`` and a causal decoder: run right-padded batches without the padding
    mask. Exact for every real token (padding only follows it, and causal attention never looks
    ahead; the pad positions' outputs are computed and never used), and attention then takes the
    causal flash kernel instead of the masked memory-efficient one. A GPU speed option: it trades
    the FLOPs spent on padding for faster attention."""
    overlap_steps: bool | None = None
    """Read each step's metrics (and its NaN/inf verdict) only after the next step is queued, so
    the device never waits for the host between steps. None: on for one CUDA device with the
    fused optimizer, which skips a non-finite update on the device; the error then comes one step
    later but still names the bad step, the weights never take its update, and no checkpoint or
    evaluation runs before the check. Ignored without a fused optimizer or with several processes."""
    varlen_attention: bool = False
    """With ``packing: true`` and a causal decoder: attend within each packed sequence with
    variable-length flash attention (``torch.nn.attention.varlen``) on the rows flattened into
    one, instead of transformers' block-diagonal mask (which sends SDPA to the masked,
    memory-efficient kernel). No padding and causal flash together. A GPU speed option (on CPU
    a per-sequence loop gives the same numbers); models without dropout in attention only."""
    compile: bool = False
    """``torch.compile`` each repeated block (decoder layer) of the trained module and the LM-head
    log-prob blocks (:func:`alignment.fast_paths.compile_layers`): a GPU speed option."""


class SFTConfig(TrainSettings):
    """Supervised fine-tuning on (prompt, response): loss on response tokens only."""

    model: ModelSettings | None = None
    """The model to fine-tune (the pipeline fills it from ``model.policy``)."""


class RewardConfig(TrainSettings):
    """Bradley–Terry reward model on (prompt, chosen, rejected): a scalar head on a backbone."""

    model: ModelSettings | None = None
    """Backbone (causal LM or encoder); a ``num_labels=1`` sequence-classification head is added.
    The pipeline fills it from ``model.reward`` or ``model.policy``."""
    margin: bool = False
    """Use each pair's ``margin`` column in the loss: -log σ(r_c - r_r - m)."""
    center_coef: float = Field(0.0, ge=0)
    """Weight of the reward-centering term coef * mean((r_c + r_r)^2) keeping rewards near 0."""
    use_weights: bool = True
    """Weight each pair's loss by its ``weight`` column when present (down-weighted low-agreement pairs)."""
    pooling: Literal["last", "sum", "mean"] = "last"
    """Decoder backbones: score the hidden state of the sequence's last token (``last``), or the sum
    or the mean of the hidden states over the response's tokens (``sum``/``mean``: the sum or mean of
    per-token scores under the bias-free head). ``sum`` is a contextual bag of words: it suits
    judges that add up what each phrase says (the demo's lexicon oracle) and generalises better
    from few pairs (benchmarks/RESULTS.md, issue 15). Saved in the model's ``config.json``
    (``reward_pooling``), so every scorer of the folder pools the same way."""
    extra_train_paths: list[str] = []
    """Further preference-pair files (Parquet files or folders, the builder's pair schema: ``prompt,
    is_chat, chosen, rejected`` [, ``weight``]) trained on together with ``train_path``: a backlog of
    labelled comparisons that the policy's training never sees (the demo's offline set,
    :mod:`tasks.demo.offline_feedback`). Never evaluated on: ``eval_path`` (and the judge's held-out
    pairs) stay the round's own. A bad row raises an error naming the file, row and column."""
    calibrate: bool = False
    """After training, fit a temperature T on the eval pairs (minimising the BT log-loss of
    σ((r_c − r_r)/T)) and divide the score head by it, so every consumer's σ(r_c − r_r) is a
    calibrated preference probability (lower ECE; orderings and accuracy unchanged; rewards shrink
    by T, which changes the reward scale PPO sees). T is saved as ``reward_temperature`` in
    ``config.json`` and the summary; the eval metrics are those before calibration."""


class DPOConfig(TrainSettings):
    """Direct preference optimization and its relatives on (prompt, chosen, rejected)."""

    model: ModelSettings | None = None
    """The policy to train, also the reference's source (the pipeline fills it)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """sigmoid = DPO (with ``label_smoothing`` = conservative DPO); ipo; hinge (SLiC); simpo (no reference)."""
    beta: float = Field(0.1, gt=0)
    """Inverse temperature of the implicit reward beta * (log pi - log pi_ref)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed label-flip rate for conservative DPO (sigmoid only)."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO target margin gamma (in reward units, i.e. gamma/beta in log-prob units)."""
    reference: Literal["copy", "adapter_disabled", "precomputed"] = "precomputed"
    """Reference log-probs: a frozen copy; the LoRA base with the adapter off; or computed once and cached."""
    reference_model: ModelSettings | None = None
    """Reference model when it differs from ``model`` (default: the initial policy)."""
    ref_cache_dir: str | None = None
    """Where precomputed reference log-probs are cached (keyed by model, data and tokenization digests)."""
    use_weights: bool = True
    """Weight each pair's loss by its ``weight`` column when present."""
    nll_coef: float = Field(0.0, ge=0)
    """α: weight of the chosen responses' per-token NLL added to the loss (RPO;
    :func:`alignment.losses.chosen_nll`). 0: plain preference loss."""
    entropy_coef: float = Field(0.0, ge=0)
    """α: weight of the entropy term (:func:`alignment.losses.entropy_bonus`): the pair's loss
    gains −α · (mean per-token entropy of the policy over the chosen response + the same over the
    rejected) / 2, so training resists collapsing onto a few phrasings. Costs one pass of the LM
    head over the response positions (chunked). 0: off."""
    entropy_target: float | None = Field(None, gt=0, le=1)
    """Hold the policy's mean per-token entropy over the training responses at this share of the
    first step's (the initial policy's, on this run's pairs) instead of pushing it up without end:
    ``entropy_coef`` is then the starting weight, which rises by ``entropy_coef_step`` after each
    step whose entropy is under the target and falls by it otherwise, within [0,
    ``entropy_coef_max``] (:class:`alignment.rl.AdaptiveEntropyController`, as PPO and GRPO hold
    theirs). With a fixed weight the term's effect grows with the step count: twice the pairs at
    the same epochs raised the entropy twice as far (RESULTS.md, issue 15, twelfth pass). The
    term is computed from the first step even when it starts at weight 0. None: the fixed weight
    ``entropy_coef``."""
    entropy_coef_step: float = Field(0.002, gt=0)
    """Change of the entropy weight per step under ``entropy_target``."""
    entropy_coef_max: float = Field(0.2, gt=0)
    """Largest entropy weight under ``entropy_target``."""
    entropy_excludes_eos: bool = False
    """The entropy term over the non-EOS mass (:func:`alignment.losses.entropy_without_token`): at
    each response position the entropy of the next-token distribution without EOS, renormalised,
    so the term spreads the mass among words and leaves the probability of ending the answer
    alone (the full entropy also lowers it where the model is sure to end: longer answers). False:
    the full distribution's entropy."""
    budget: DriftBudget | None = None
    """A drift budget checked during training (:mod:`alignment.budget`): past it, training ends
    with the weights of the last probe within it. None: train the full schedule."""


class KTOConfig(TrainSettings):
    """Kahneman–Tversky optimisation on unpaired responses (``prompt, is_chat, completion, label``)."""

    model: ModelSettings | None = None
    """The policy to train, also the reference's source (the pipeline fills it)."""
    beta: float = Field(0.1, gt=0)
    """Inverse temperature of the implied reward beta * (log pi - log pi_ref)."""
    desirable_weight: float = Field(1.0, gt=0)
    """lambda_D: loss weight of desirable responses. Keep lambda_D * n_D / (lambda_U * n_U) in
    [1, 4/3] (the paper's advice; the recipe warns outside it)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """lambda_U: loss weight of undesirable responses."""
    kl_estimate: bool = True
    """Estimate the reference point z0 (the policy's KL from the reference) on mismatched
    prompt/response pairs, one extra no-grad forward per batch; False sets z0 = 0 (TRL's
    ``apo_zero_unpaired``)."""
    reference: Literal["copy", "adapter_disabled", "precomputed"] = "precomputed"
    """Reference log-probs: a frozen copy; the LoRA base with the adapter off; or computed once and cached."""
    reference_model: ModelSettings | None = None
    """Reference model when it differs from ``model`` (default: the initial policy)."""
    ref_cache_dir: str | None = None
    """Where precomputed reference log-probs are cached (keyed by model, data and tokenization digests)."""
    use_weights: bool = True
    """Weight each response's loss by its ``weight`` column when present (down-weighted low agreement)."""


class GenerationSettings(StrictModel):
    """Sampling for rollouts and evaluation."""

    max_new_tokens: int = Field(32, gt=0)
    """Tokens generated per response."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens (0: off)."""
    top_p: float = Field(1.0, gt=0, le=1.0)
    """Nucleus sampling mass (1.0: off)."""
    batch_size: int = Field(64, gt=0)
    """Prompts generated per forward batch."""
    do_sample: bool = True
    """Sample from the (tempered, truncated) distribution; False decodes greedily and ignores the three above."""
    cuda_graphs: bool = False
    """Decode over a static KV cache with the one-token step replayed as a CUDA graph
    (:class:`alignment.fast_generation.GraphDecoder`; full-attention decoders only). On CPU the
    same static step runs eagerly. Same tokens as the default loop up to kernel rounding."""
    compile_step: bool = False
    """With ``cuda_graphs``: ``torch.compile`` the decode step before capturing it, which fuses
    the norm, rotary, activation and residual kernels (a 1B decode step is ~900 kernels eager),
    and on CUDA the token draw without top-k/top-p: where Triton runs, the Gumbel-max kernel of
    :mod:`alignment.triton_sampling` (the same distribution as the eager draw, from its own
    noise: other tokens for the same seed), else the race's arithmetic after the noise as one
    compiled kernel (the same tokens up to rounding).
    Compiles once per batch shape (tens of seconds), so it pays off for long or repeated
    generation at a fixed shape (benchmarks, large rollouts), not for short demo evaluations."""
    fuse_projections: bool = False
    """With ``cuda_graphs``: decode with copies of the weights in the compute dtype, q/k/v and
    gate/up concatenated into one matmul each (:mod:`alignment.fused_decode`; Llama and Qwen2
    layers with plain linear projections, others unchanged). Fewer, larger kernels per step and
    no per-token cast of fp32 weights under autocast, for a copy of the weights while generating.
    Same tokens up to kernel rounding."""
    triton_attention: bool = False
    """With ``cuda_graphs`` on a CUDA device: each decode step's attention as one Triton kernel
    (:mod:`alignment.triton_attention`: every K/V head read once for the query heads that share it,
    the cache mask applied as it reads, softmax online) instead of four to five kernels. Needs
    Triton (part of torch's CUDA wheels); elsewhere the torch attention runs. Same tokens up to
    kernel rounding. On an H200 at batch 64 a 1B decode step takes 11% less time, a 0.5B one 8% (RESULTS.md, run 27).
    With ``fuse_projections`` too, the kernel also applies the rotary embedding and writes the new
    key and value into the cache (:func:`alignment.triton_attention.rope_write_decode`; head sizes
    from 32): on an H100 another 4% off a 1B step and 10% off a 0.5B one (RESULTS.md, run 31)."""
    sync_every: int = Field(8, gt=0)
    """On CUDA, check whether every row has ended only every this many tokens (each check waits
    for the device); rows that ended early get padding meanwhile, so the output is the same.
    On CPU the check is free and runs every token."""


class DriftBudget(StrictModel):
    """Early stop of one training run on a probe of the policy's own samples (:mod:`alignment.budget`).

    Every ``every`` steps the policy samples ``prompts`` training prompts (fixed seed); training
    ends when the sequence KL to the DPO reference (``reference_model``, else the initial policy)
    passes ``max_kl`` or distinct-2 falls under ``min_distinct2_ratio`` of the reference's, and
    the weights of the last probe within budget are kept. With neither limit the probe only
    logs its readings (``budget/*`` metrics)."""

    max_kl: float | None = Field(None, gt=0)
    """Most KL(policy ‖ reference) in nats per sequence (None: no KL budget). Against the base
    model (``pipeline.dpo_reference: base``) it is the gate's ``max_kl`` quantity; against the
    initial policy, a per-round step."""
    min_distinct2_ratio: float | None = Field(None, gt=0, le=1)
    """Least pooled distinct-2 of the probe samples as a share of the reference's on the same
    prompts (None: no diversity budget)."""
    every: int = Field(5, gt=0)
    """Optimizer steps between probes."""
    prompts: int = Field(64, gt=0)
    """Training prompts sampled per probe (the first distinct ones in a seeded shuffle)."""
    generation: GenerationSettings = GenerationSettings(max_new_tokens=24, temperature=0.7)
    """Sampling of the probe (the demo evaluation's settings by default)."""
    reference: ModelSettings | None = None
    """The model the probe measures KL and distinct-2 against; None: the DPO reference
    (``reference_model``, else the initial policy). The closed-loop demo points it at the base
    model, so a round's budget is the gate's KL-to-base however far the champion already moved."""


class KLSettings(StrictModel):
    """KL penalty against the reference: fixed coefficient or adaptive (Ziegler et al. 2019)."""

    coef: float = Field(0.05, ge=0)
    """Initial (or fixed) KL coefficient."""
    adaptive: bool = False
    """Adapt the coefficient toward ``target``."""
    target: float = Field(6.0, gt=0)
    """Target sequence KL (nats) for the adaptive controller."""
    horizon: int = Field(10000, gt=0)
    """Adaptive controller horizon in samples."""
    estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator used in the reward penalty."""


class RLSettings(TrainSettings):
    """What PPO and GRPO share: prompts in, rewards from a reward model or a Python function."""

    model: ModelSettings | None = None
    """The policy to train (the pipeline fills it)."""
    reward_model: str | None = None
    """Folder of a reward model trained by the reward recipe."""
    reward_fn: str | None = None
    """``module:function`` mapping (prompts, responses) -> list of floats, instead of a reward model."""
    generation: GenerationSettings = GenerationSettings()
    """Rollout sampling."""
    kl: KLSettings = KLSettings()
    """KL penalty."""
    rollout_batch_size: int = Field(64, gt=0)
    """Prompts per rollout phase (PPO) or per step (GRPO, before the group expansion)."""
    update_epochs: int = Field(2, gt=0)
    """Passes over each rollout batch."""
    minibatch_size: int = Field(16, gt=0)
    """Samples per optimizer step within an update epoch."""
    clip_range: float = Field(0.2, gt=0)
    """Policy ratio clip epsilon."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight (the starting value when ``entropy_target`` is set)."""
    entropy_target: float | None = Field(None, gt=0, le=1)
    """Hold the rollouts' per-token entropy at this share of the initial policy's: the entropy
    coefficient rises by ``entropy_coef_step`` after each step whose entropy is below the target
    and falls by it otherwise, within [0, ``entropy_coef_max``] (adaptive entropy control,
    Skywork-OR1). Word stuffing shows as falling entropy. None: a fixed ``entropy_coef``."""
    entropy_coef_step: float = Field(0.002, gt=0)
    """Change of the entropy coefficient per step under ``entropy_target``."""
    entropy_coef_max: float = Field(0.05, gt=0)
    """Largest entropy coefficient under ``entropy_target``."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that did not end with EOS."""
    reward_norm: Literal["none", "batch", "running"] = "none"
    """Normalise the scores before the KL penalty and advantages: ``batch`` whitens each rollout's
    scores (zero mean, unit std), ``running`` divides by the std and subtracts the mean of every
    score seen so far (checkpointed), so ``kl.coef`` is in units of the reward's spread."""
    token_baseline: Literal["none", "batch_mean"] = "none"
    """For a ``sum``-pooled reward model, which pays for length: ``batch_mean`` subtracts b * L from
    each score (before ``reward_norm``), L the response's scored tokens (without its EOS) and b the
    rollout's mean score per scored token (total score over total scored tokens, all processes),
    so a response earns by better tokens, not by more of them (on the demo PPO and GRPO grew their
    responses toward the limit). With PPO's ``dense_reward`` each scored token's score gets -b
    instead (the same total). ``none``: the scores as they are."""


class PPOConfig(RLSettings):
    """PPO with a learned value function and GAE."""

    value_model: Literal["head", "separate"] = "head"
    """A value head on the policy trunk, or a separate model initialised from the reward model
    (its score head read at every position; its value loss never reaches the policy). From a
    ``last``-pooled reward model that score is already a value estimate of each prefix; a ``sum``-
    or ``mean``-pooled one scores single positions, a poor start (benchmarks/RESULTS.md, issue 15
    point 5)."""
    vf_coef: float = Field(0.1, ge=0)
    """Value loss weight."""
    value_clip: float = Field(0.2, gt=0)
    """Value prediction clip range around the old values."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten shaped rewards before GAE."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: ``reward`` — -kl_coef * KL_t in each token's reward
    (Ziegler et al.; TRL's PPOTrainer); ``loss`` — kl_coef * k3 per token in the loss (as GRPO)."""
    value_warmup_steps: int = Field(0, ge=0)
    """The first this many steps fit only the value function: no policy loss, no entropy bonus, and
    the value head's input detached, so the policy stays the initial model while the critic learns
    a baseline (otherwise its first advantages come from a random head)."""
    value_head_detached: bool = False
    """``head`` only: the value head reads the policy's last hidden state with its gradient stopped
    for the whole run (not only during the warm-up), so the value loss never moves the policy: the
    head is a linear probe of the policy's features. False: the value loss also trains the shared
    trunk (weighted by ``vf_coef``)."""
    value_lr: float | None = Field(None, gt=0)
    """Peak learning rate of the value function's own parameters (the head, or the whole
    ``separate`` model), under the same schedule; None: ``optim.lr``. Public recipes train the
    critic faster than the policy (OpenRLHF's Llama-3 recipe: 9e-6 against 5e-7)."""
    value_head_init: Literal["reward", "zero"] = "reward"
    """``separate`` only: keep the reward model's score head (with a ``last``-pooled model its score
    at a prefix already estimates that prefix's value), or start a fresh head at zero on the reward
    model's trunk (V = 0 everywhere: its sentiment-aware features, not its per-token scores, which
    from a ``sum``-pooled model are no values; the natural start for ``dense_reward``)."""
    dense_reward: bool = False
    """Pay each response token its own score from a ``sum``-pooled reward model (the score head on
    the hidden state of that token, computed on the rollout's own tokens; the EOS is not scored)
    instead of the sequence score at the last token, as
    :func:`alignment.rl.token_rewards`: the per-token scores sum to the sequence score, and the
    critic predicts the rest of a response's reward from where it stands. Scaled like
    ``reward_norm`` (the sequence scores' std: running, batch, or 1 with ``none``); see
    ``token_baseline`` for the length incentive."""


class GRPOConfig(RLSettings):
    """Critic-free: several samples per prompt, advantages normalised within each group."""

    group_size: int = Field(4, gt=1)
    """Samples per prompt."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """grpo: (r - mean) / std within the group; rloo: r minus the mean of the other samples."""
    scale_by_std: bool = True
    """Divide GRPO advantages by the group std (Dr. GRPO turns this off)."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """Where the KL to the reference acts: ``loss`` adds kl_coef * k3 per token to the loss (GRPO
    paper); ``reward`` subtracts kl_coef * the sequence KL (``kl.estimator``) from each score before
    the group advantages (RLOO, TRL's RLOOTrainer): the KL-regularised objective itself."""
    process_reward: bool = False
    """Credit each token with the reward model's per-token scores from it to the end instead of its
    sequence's score (GRPO with process supervision, Shao et al. 2024; a ``sum``-pooled reward model's
    per-token scores are its process rewards): each scored token's score, in units of the running
    scores' std, centred on its group's mean per token, summed from the token to the end of the
    response (:func:`alignment.rl.group_token_advantages`; ``scale_by_std`` divides by the group's
    per-token std). A response's first token carries S - mu_g * L, the length-neutral score with the
    group's baseline. Needs advantage ``grpo`` and kl_penalty ``loss``; costs one reward-model
    forward per sample. False: every token gets its sequence's advantage."""


RECIPE_CONFIGS: dict[str, type[TrainSettings]] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
}


class ConfigError(ValueError):
    """A config failed validation; the message names every offending field."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def validate_config(cls: type[StrictModel], data: dict[str, Any], prefix: str = "") -> StrictModel:
    """Build ``cls`` from ``data``; raise :class:`ConfigError` naming each bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__}:\n" + format_validation_error(err, prefix)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value). Raises ConfigError when malformed."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config dict (creating nested sections as needed)."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def json_digest(value: Any) -> str:
    """sha256 (16 hex chars) of ``value``'s canonical JSON: pydantic models as their JSON dump,
    paths as strings, keys sorted, anything else JSON cannot write as ``str()``. The one
    digest-of-JSON rule of the project (configs, cache keys, records)."""
    blob = json.dumps(_canonical(value), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_digest(cfg: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    """:func:`json_digest` of a config, optionally without some top-level keys."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    for key in exclude or ():
        data.pop(key, None)
    return json_digest(data)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Differences between two config dicts as ``path: old -> new`` lines (nested keys dotted)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, prefix=path + "."))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
