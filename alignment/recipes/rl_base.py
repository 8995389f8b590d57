"""What the RL recipes (PPO, GRPO) share: prompts in, rollouts, rewards, reference log-probs.

One training **step** is one iteration: sample responses for ``rollout_batch_size`` prompts
(per process) with :func:`alignment.generation.generate`, score them (a reward model folder or
a ``reward_fn`` ``"module:function"`` mapping ``(prompts, responses) -> list[float]``), compute
no-grad log-probs, then ``update_epochs`` passes over the samples in minibatches of
``minibatch_size`` samples, one optimizer step each, forwarded ``batch_size`` samples at a
time (so ``grad_accum`` is not used: set it to 1). The learning-rate schedule counts optimizer
steps.

Conventions
-----------
* Log-probs are of the *sampling* distribution: logits divided by ``generation.temperature``
  (top-k/top-p truncation is ignored, as usual). Tokens are scored in the layout of
  :mod:`alignment.batching` (prompt + response, targets = response tokens, EOS included), so the
  per-token tensors of a batch are flat ``[N]`` in (sample, position) order; ``Rollout.mask``
  ``[B, R]`` maps them to a right-padded grid for GAE and back (``grid[mask] = flat``).
* Dropout is switched off in the policy (and value model): PPO ratios must compare the same
  function, and the rollout and update forwards must agree.
* The reference is a frozen copy of the initial policy, or the policy with its LoRA adapter
  disabled (no second copy).
* Resume: rollout sampling and minibatch order are seeded from ``(seed, step, rank)`` and the
  KL coefficient is checkpointed (:meth:`extra_state`), so a resumed run equals an
  uninterrupted one.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignment.batching import (
    ExampleSet,
    Prompt,
    collate_sequences,
    decode_prompt,
    encode_prompt,
    read_rows,
    to_device,
)
from alignment.config import ConfigError, ModelSettings, RLSettings
from alignment.generation import generate
from alignment.logprobs import check_finite, logps_from_hidden, selective_log_softmax
from alignment.losses import entropy_from_logits
from alignment.models import (
    adapter_disabled,
    hf_model,
    hidden_path_ok,
    is_peft,
    load_causal_lm,
    load_reference,
    load_reward_model,
    load_tokenizer,
    score_responses,
)
from alignment.recipes.base import Recipe, StepOutput
from alignment.rl import AdaptiveKLController, FixedKLController, kl_k1

RewardFn = Callable[[list[Prompt], list[str]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``"package.module:function"``. Raises ValueError naming what is wrong."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward_fn must look like 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_fn {spec!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r} is not callable")
    return fn


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and the attention-dropout config field)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(hf_model(model), "config", None)
    if config is not None and getattr(config, "attention_dropout", None):
        config.attention_dropout = 0.0


def _entropy_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    return entropy_from_logits(F.linear(hidden, weight, bias) / temperature, chunk_size=None)


def response_forward(
    model: nn.Module,
    batch: dict[str, Any],
    chunk_size: int,
    temperature: float,
    *,
    with_hidden: bool = False,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-target log-probs ``[N]`` (fp32) of a causal LM on a collated batch; optionally the
    hidden states ``[N, H]`` that predict each target (for a value head) and the per-target
    entropy ``[N]`` of the tempered distribution (block by block; differentiable only with
    ``entropy_grad``, i.e. when an entropy bonus is in the loss)."""
    inner = hf_model(model)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": batch.get("attention_mask"), "use_cache": False}
    index, targets = batch["target_index"], batch["target_ids"]
    out: dict[str, torch.Tensor] = {}
    if hidden_path_ok(model):
        head = inner.get_output_embeddings()
        hidden = inner.base_model(**inputs).last_hidden_state.flatten(0, 1).index_select(0, index)
        out["token_logps"] = logps_from_hidden(hidden[None], head.weight, targets[None], None, chunk_size,
                                               lm_head_bias=head.bias, temperature=temperature)[0]
        if with_entropy:
            parts = []
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                for s in range(0, hidden.shape[0], chunk_size):
                    h = hidden[s : s + chunk_size]
                    if torch.is_grad_enabled():  # recompute each block in backward instead of keeping it
                        parts.append(checkpoint(_entropy_chunk, h, head.weight, head.bias, temperature,
                                                use_reentrant=False))
                    else:
                        parts.append(_entropy_chunk(h, head.weight, head.bias, temperature))
            out["entropy"] = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    else:
        result = model(**inputs, output_hidden_states=with_hidden)
        logits = result.logits.flatten(0, 1).index_select(0, index)
        out["token_logps"] = selective_log_softmax(logits[None], targets[None], chunk_size, temperature=temperature)[0]
        if with_hidden:
            hidden = result.hidden_states[-1].flatten(0, 1).index_select(0, index)
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                out["entropy"] = entropy_from_logits(logits / temperature, chunk_size)
    if with_hidden:
        out["hidden"] = hidden
    return out


class PolicyModule(nn.Module):
    """The trained module handed to ``accelerate``: the policy plus, for PPO, a value function.

    ``forward(batch, with_entropy=False, entropy_grad=False) -> {"token_logps" [N], "values" [N]?,
    "entropy" [N]?}`` (see :func:`response_forward`).
    The value is a linear head on the policy's last hidden state (``value_head``) or a
    separate sequence-classification model whose score head is applied at every position
    (``value_model``); V at a target is the value of the state that emits it.
    """

    def __init__(self, policy: nn.Module, chunk_size: int, temperature: float, *,
                 value_head: nn.Module | None = None, value_model: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_model = value_model
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(self, batch: dict[str, Any], with_entropy: bool = False,
                entropy_grad: bool = False) -> dict[str, torch.Tensor]:
        out = response_forward(self.policy, batch, self.chunk_size, self.temperature,
                               with_hidden=self.value_head is not None, with_entropy=with_entropy,
                               entropy_grad=entropy_grad)
        if self.value_head is not None:
            hidden = out.pop("hidden")
            out["values"] = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        elif self.value_model is not None:
            inner = hf_model(self.value_model)
            hidden = inner.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
            picked = hidden.flatten(0, 1).index_select(0, batch["target_index"])
            out["values"] = inner.score(picked).squeeze(-1).float()
        return out


@dataclass
class Rollout:
    """Sampled responses of one step and their scores; per-token tensors are filled by the recipe."""

    prompts: list[Prompt]
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    texts: list[str]
    hit_eos: torch.Tensor
    """[B] bool, on the device."""
    raw_scores: torch.Tensor
    """[B] fp32 reward-model / reward_fn output."""
    scores: torch.Tensor
    """[B] fp32 score used for training (raw minus the missing-EOS penalty)."""
    mask: torch.Tensor
    """[B, R] long, 1 on response tokens (right-padded), on the device."""
    generate_s: float

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompt_tokens, self.response_tokens, strict=True))

    def collate(self, rows: Sequence[int], layout: dict[str, Any], device: torch.device) -> dict[str, Any]:
        batch = collate_sequences([self.prompt_tokens[i] for i in rows], [self.response_tokens[i] for i in rows],
                                  **layout)
        return to_device(batch, device)

    def to_grid(self, flat: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Flat per-target values of ``rows`` (all rows when None) → ``[len(rows), R]``, 0 at padding."""
        mask = self.mask if rows is None else self.mask[list(rows)]
        grid = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
        grid[mask.bool()] = flat
        return grid


class RLRecipe(Recipe):
    """Base of :class:`~alignment.recipes.ppo.PPORecipe` and :class:`~alignment.recipes.grpo.GRPORecipe`."""

    config_class = RLSettings

    @property
    def samples_per_prompt(self) -> int:
        """Responses sampled per prompt in a rollout."""
        return 1

    # ------------------------------------------------------------------ models and data
    def build_policy(self) -> None:
        """Policy, tokenizer, reward source and KL controller; the reference and reward model are
        loaded here and moved to the device in :meth:`on_prepared`."""
        cfg = self.config
        if cfg.model is None:
            raise ConfigError(f"{self.name}.model: a policy model is required")
        if (cfg.reward_model is None) == (cfg.reward_fn is None):
            raise ConfigError(f"{self.name}.reward_model / {self.name}.reward_fn: set exactly one of them")
        if cfg.grad_accum != 1:
            raise ConfigError(f"{self.name}.grad_accum: RL recipes step once per minibatch_size samples; "
                              "set grad_accum to 1 and use minibatch_size / batch_size")
        if cfg.max_prompt_length + cfg.generation.max_new_tokens > cfg.max_length:
            raise ConfigError(
                f"{self.name}.max_length: max_prompt_length ({cfg.max_prompt_length}) + generation.max_new_tokens "
                f"({cfg.generation.max_new_tokens}) exceeds max_length ({cfg.max_length})"
            )
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model)
        disable_dropout(self.model)
        self.reference = None if is_peft(self.model) else load_reference(cfg.model)
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.reward_model = self.reward_tokenizer = None
        if cfg.reward_model:
            rm = ModelSettings(name_or_path=cfg.reward_model, dtype=cfg.model.dtype,
                               trust_remote_code=cfg.model.trust_remote_code)
            self.reward_tokenizer = load_tokenizer(rm)
            self.reward_model = load_reward_model(rm, self.reward_tokenizer, trainable=False)
        kl = cfg.kl
        self.kl_ctl = AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef)

    @property
    def temperature(self) -> float:
        gen = self.config.generation
        return gen.temperature if gen.do_sample else 1.0

    def on_prepared(self) -> None:
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.to(self.device)

    def _load_prompts(self, path: str, split: str) -> ExampleSet:
        rows = read_rows(path, ["prompt"])
        if not rows:
            raise ValueError(f"{path}: no prompts")
        examples, truncated = [], 0
        limit = self.config.max_prompt_length
        for i, row in enumerate(rows):
            try:
                prompt = decode_prompt(row)
            except ValueError as err:
                raise ValueError(f"{path} row {i}: {err}") from None
            n = len(encode_prompt(self.tokenizer, prompt))
            truncated += n > limit
            examples.append({"index": i, "prompt": prompt, "num_tokens": min(n, limit)})
        self.note_data(split, {"truncated": truncated, "dropped": 0}, len(examples))
        return ExampleSet(examples, lambda exs: {"prompts": [e["prompt"] for e in exs]}, {})

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        cfg = self.config
        if not cfg.train_path:
            raise ConfigError(f"{self.name}.train_path: a prompts table is required")
        self.layout = self.token_layout(self.model)
        train = self._load_prompts(cfg.train_path, "train")
        evals = self._load_prompts(cfg.eval_path, "eval") if cfg.eval_path else None
        return train, evals

    # ------------------------------------------------------------------ step sizing
    def sampler_batch_size(self) -> int:
        return self.config.rollout_batch_size

    def steps_per_epoch(self) -> int:
        return max(1, len(self.sampler))

    def optimizer_steps_per_step(self) -> int:
        n = self.config.rollout_batch_size * self.samples_per_prompt
        return self.config.update_epochs * math.ceil(n / self.config.minibatch_size)

    def extra_state(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        raise NotImplementedError(f"{self.name} trains through train_step() (rollouts), not compute_loss()")

    # ------------------------------------------------------------------ rollouts
    def _seed(self, salt: int) -> int:
        return (self.config.seed * 1_000_003 + self.step * 7_919 + self.accelerator.process_index * 104_729 + salt) % 2**62

    def score(self, prompts: list[Prompt], texts: list[str]) -> torch.Tensor:
        """Rewards ``[B]`` (fp32, on the device). Raises ValueError or NonFiniteError on bad rewards."""
        if self.reward_fn is not None:
            values = list(self.reward_fn(prompts, texts))
        else:
            cfg = self.config
            with self.accelerator.autocast():
                values = score_responses(self.reward_model, self.reward_tokenizer, prompts, texts, cfg.batch_size,
                                         max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        if len(values) != len(texts):
            raise ValueError(f"the reward returned {len(values)} scores for {len(texts)} responses")
        scores = torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
        check_finite("reward/raw", scores, self.step + 1)
        return scores

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], repeats: int = 1, seed: int | None = None) -> Rollout:
        """Generate ``repeats`` responses per prompt (contiguous groups) and score them."""
        cfg = self.config
        expanded = [p for p in prompts for _ in range(repeats)]
        started = time.perf_counter()
        with self.accelerator.autocast():
            res = generate(self.model, self.tokenizer, expanded, cfg.generation,
                           self._seed(0) if seed is None else seed, max_prompt_length=cfg.max_prompt_length)
        took = time.perf_counter() - started
        raw = self.score(expanded, res.texts)
        hit_eos = res.hit_eos.to(self.device)
        scores = raw
        if cfg.missing_eos_penalty is not None:
            scores = raw - cfg.missing_eos_penalty * (~hit_eos).float()
        return Rollout(
            prompts=expanded,
            prompt_tokens=[r[m.bool()].tolist() for r, m in zip(res.prompt_ids, res.prompt_mask, strict=True)],
            response_tokens=[r[m.bool()].tolist() for r, m in zip(res.response_ids, res.response_mask, strict=True)],
            texts=res.texts, hit_eos=hit_eos, raw_scores=raw, scores=scores,
            mask=res.response_mask.to(self.device), generate_s=took,
        )

    @torch.no_grad()
    def reference_logps(self, roll: Rollout, rows: Sequence[int]) -> torch.Tensor:
        """Flat reference log-probs of ``rows`` (frozen copy, or the policy with its adapter off)."""
        batch = roll.collate(rows, self.layout, self.device)
        with self.accelerator.autocast():
            if self.reference is not None:
                return response_forward(self.reference, batch, self.config.logprob_chunk_size, self.temperature)[
                    "token_logps"]
            with adapter_disabled(self.model):
                return response_forward(self.model, batch, self.config.logprob_chunk_size, self.temperature)[
                    "token_logps"]

    def micro_batches(self, rows: Sequence[int]) -> list[list[int]]:
        bs = self.config.batch_size
        return [list(rows[i : i + bs]) for i in range(0, len(rows), bs)]

    def minibatches(self, n: int) -> list[list[int]]:
        """``update_epochs`` seeded permutations of ``range(n)`` cut into minibatches."""
        gen = torch.Generator().manual_seed(self._seed(1))
        mb = self.config.minibatch_size
        out = []
        for _ in range(self.config.update_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            out.extend(perm[i : i + mb] for i in range(0, n, mb))
        return out

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over processes (tokens and samples: sum)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        summed = acc.reduce(vec, reduction="sum").tolist()
        n = acc.num_processes
        return {k: v if k in ("tokens", "samples") else v / n for k, v in zip(keys, summed, strict=True)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Sample once per held-out prompt (fixed seed) → ``eval/reward/raw``, ``eval/kl`` (k1,
        per sequence), ``eval/response_length``, ``eval/eos_rate``."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        acc = self.accelerator
        prompts = [e["prompt"] for e in self.eval_set.examples][acc.process_index :: acc.num_processes]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        if prompts:
            roll = self.sample(prompts, seed=self.config.seed + 1 + acc.process_index)
            kl = []
            for rows in self.micro_batches(range(len(roll))):
                batch = roll.collate(rows, self.layout, self.device)
                with acc.autocast():
                    lp = response_forward(self.model, batch, self.config.logprob_chunk_size, self.temperature)
                ref = self.reference_logps(roll, rows)
                kl.append(roll.to_grid(kl_k1(lp["token_logps"], ref), rows).sum(1))
            n = len(roll)
            sums += torch.tensor([roll.raw_scores.sum().item(), torch.cat(kl).sum().item(),
                                  roll.mask.sum().item(), roll.hit_eos.float().sum().item(), n],
                                 dtype=torch.float64, device=self.device)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        total = max(sums[4].item(), 1.0)
        metrics = {"eval/reward/raw": sums[0].item() / total, "eval/kl": sums[1].item() / total,
                   "eval/response_length": sums[2].item() / total, "eval/eos_rate": sums[3].item() / total}
        self.last_eval = metrics
        self.emit(metrics, "eval")
        return metrics

