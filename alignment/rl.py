"""RL math for PPO and GRPO: masked statistics, GAE, KL estimators and controllers, reward shaping.

Pure tensor functions (no models, no trackers). Shapes use ``B`` for samples and ``T`` for
response positions. A ``mask`` is 1 (or True) on response tokens that count and 0 on padding;
rollouts are **right-padded**, so each row's mask is a run of ones followed by zeros. The
functions that depend on that layout (:func:`gae`, :func:`kl_shaped_rewards`) say so.

None of these functions synchronise with the GPU except where they must validate input
(:func:`masked_var` checks the number of valid entries); they are safe in the hot loop.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gae",
    "kl_k1",
    "kl_k3",
    "kl_estimate",
    "AdaptiveKLController",
    "FixedKLController",
    "kl_shaped_rewards",
    "scored_token_mask",
    "token_rewards",
    "length_neutral_scores",
    "group_advantages",
    "group_token_advantages",
    "explained_variance",
    "last_token_explained_variance",
    "sequence_kl",
    "RunningMoments",
    "normalize_scores",
    "AdaptiveEntropyController",
]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) over ``dim`` (all elements when None)."""
    prod = values * mask.to(values.dtype)
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over ``dim`` (all elements when None).

    A slice whose mask is all zero yields 0 (not NaN): the denominator is clamped to 1, so an
    empty row contributes nothing instead of poisoning a batch statistic.
    """
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum().clamp_min(1.0)
    return (values * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (over all of them).

    var = sum(m * (x - mean)^2) / n, times n / (n - 1) when ``unbiased`` (Bessel), n = sum(m).
    Raises ValueError when fewer than 1 (biased) or 2 (unbiased) entries are valid.
    """
    n = float(mask.to(values.dtype).sum())
    need = 2 if unbiased else 1
    if n < need:
        raise ValueError(f"masked_var needs at least {need} valid entries, got {n:g}")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var); padding is set to 0.

    With ``shift_mean=False`` the mean is added back, i.e. only the scale changes (used for
    rewards, whose sign carries meaning). Raises ValueError with fewer than 2 valid entries.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on right-padded ``[B, T]`` tensors.

    delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1},   A_T = 0
    returns = A + V

    The episode ends at each row's last valid token (its successor has mask 0, so it
    bootstraps from 0: a terminal state). Rewards and values at padding are ignored; outputs
    are 0 there. Assumes right padding (mask = ones then zeros in every row). Vectorised over
    the batch; one reverse pass over time. Returns ``(advantages, returns)``, no gradient.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"gae expects equal [B, T] shapes, got rewards {tuple(rewards.shape)}, "
            f"values {tuple(values.shape)}, mask {tuple(mask.shape)}"
        )
    with torch.no_grad():
        m = mask.to(values.dtype)
        r = rewards * m
        v = values * m
        next_m = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
        next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
        deltas = r + gamma * next_m * next_v - v
        adv = torch.zeros_like(v)
        running = torch.zeros_like(v[:, 0])
        for t in range(v.shape[1] - 1, -1, -1):
            running = deltas[:, t] + gamma * lam * next_m[:, t] * running
            adv[:, t] = running
        adv = adv * m
        return adv, (adv + v) * m


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(pi || pi_ref) from samples of pi: log pi - log pi_ref.

    Unbiased, high variance, can be negative per token.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020): (ratio - 1) - log ratio.

    ratio = pi_ref / pi = exp(log pi_ref - log pi). Unbiased and never negative.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Dispatch to :func:`kl_k1` or :func:`kl_k3` by name; ValueError for anything else."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    After each rollout batch of ``n_steps`` samples with mean sequence KL ``current``:

        e = clip(current / target - 1, -0.2, 0.2)
        coef <- coef * (1 + e * n_steps / horizon)

    ``state_dict``/``load_state_dict`` make the coefficient part of a checkpoint.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current: float, n_steps: int) -> float:
        """Move the coefficient toward the target; returns the new value."""
        error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveEntropyController:
    """Entropy-bonus coefficient that holds the per-token entropy of the rollouts near a target
    (adaptive entropy control, as in Skywork-OR1; the bonus's coefficient is what moves).

    The target is ``target_ratio`` times the first entropy reported (the initial policy's, on
    its own samples). After each step with mean per-token entropy H:

        coef <- clip(coef + delta, 0, max_coef)   if H < target
        coef <- clip(coef - delta, 0, max_coef)   otherwise

    so the bonus grows only while entropy sits below the target and fades once it is back. With
    ``target_ratio`` None the coefficient stays ``init_coef`` (a fixed bonus).
    ``state_dict``/``load_state_dict`` make it part of a checkpoint.
    """

    def __init__(self, init_coef: float, target_ratio: float | None = None, delta: float = 0.002,
                 max_coef: float = 0.05) -> None:
        if target_ratio is not None and not 0 < target_ratio <= 1:
            raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
        self.value = float(init_coef)
        self.target_ratio = target_ratio
        self.delta = float(delta)
        self.max_coef = float(max_coef)
        self.target: float | None = None

    def update(self, entropy: float) -> float:
        """Move the coefficient one ``delta`` toward holding the target; returns the new value."""
        if self.target_ratio is None:
            return self.value
        if self.target is None:
            self.target = self.target_ratio * float(entropy)
        step = self.delta if float(entropy) < self.target else -self.delta
        self.value = min(max(self.value + step, 0.0), self.max_coef)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = None if state.get("target") is None else float(state["target"])


class FixedKLController:
    """Constant KL coefficient with the :class:`AdaptiveKLController` interface."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current: float, n_steps: int) -> float:
        """No change; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid position under right padding (0 for an empty row)."""
    return (mask.to(torch.long).sum(dim=1) - 1).clamp_min(0)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: Literal["k1", "k3"] = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: r_t = -coef * KL_t plus the score.

    ``scores`` is ``[B]`` (one scalar per response, paid at its last valid token) or ``[B, T]``
    (a dense per-token reward, e.g. :func:`token_rewards`, added where it stands); the rest
    ``[B, T]``, right-padded. KL_t is the chosen per-token estimator of KL(pi || pi_ref). Returns
    ``(rewards, kl)``, both ``[B, T]`` and 0 at padding, without gradient. Summing ``rewards`` over
    a row gives score (or the row's sum of token rewards) - coef * (sequence KL estimate).
    """
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        kl = kl_estimate(logprobs, ref_logprobs, estimator) * m
        rewards = -kl_coef * kl
        if scores.dim() == 2:
            if scores.shape != rewards.shape:
                raise ValueError(f"dense scores {tuple(scores.shape)} do not match the mask {tuple(mask.shape)}")
            rewards = rewards + scores.to(rewards.dtype)
        else:
            last = last_valid_index(mask)
            rows = torch.arange(rewards.shape[0], device=rewards.device)
            rewards[rows, last] += scores.to(rewards.dtype)
        return rewards * m, kl


def scored_token_mask(mask: torch.Tensor, hit_eos: torch.Tensor) -> torch.Tensor:
    """The response tokens a reward model scores: ``mask`` without each row's last valid token
    where that token is the EOS (``hit_eos[b]``; rows cut by the length limit keep every token).
    Reward models score responses without their EOS. Right padding; same dtype as ``mask``."""
    scored = mask.clone()
    rows = torch.nonzero(hit_eos.bool() & (mask.sum(dim=1) > 0)).flatten()
    scored[rows, last_valid_index(mask)[rows]] = 0
    return scored


def token_rewards(token_scores: torch.Tensor, scored: torch.Tensor, baseline: float = 0.0,
                  scale: float = 1.0) -> torch.Tensor:
    """Dense per-token rewards from a sum-pooled reward model's per-token scores s_t ``[B, T]``:

        r_t = scored_t * (s_t - baseline) / scale

    Summed over a response this is (S - baseline * L) / scale, with S = sum_t s_t the model's
    sequence score and L the number of scored tokens. With ``baseline`` the mean per-token score
    (e.g. a running mean) a token pays only by being better than the average token, so length
    alone earns nothing (a sum-pooled model otherwise pays for every above-zero token). ``scale``
    puts the rewards in the units of the sequence scores' spread, like ``reward_norm``. 0 where
    ``scored`` is 0 (padding, EOS). No gradient.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    with torch.no_grad():
        return (token_scores - baseline) * scored.to(token_scores.dtype) / scale


def length_neutral_scores(scores: torch.Tensor, lengths: torch.Tensor,
                          baseline: float | None = None) -> tuple[torch.Tensor, float]:
    """Sequence scores ``[B]`` minus ``baseline`` times each response's length ``[B]`` (its scored
    tokens): S_i - b * L_i, with b the mean score per token sum_i S_i / sum_i L_i unless given (for
    a batch spread over processes, pass the totals' ratio). With a sum-pooled reward model S_i is
    the sum of L_i token scores, so this is :func:`token_rewards` summed over each response: a
    response of average tokens scores 0 whatever its length. Returns ``(scores, b)``."""
    if scores.shape != lengths.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and lengths {tuple(lengths.shape)} must be equal [B]")
    if baseline is None:
        total = float(lengths.sum())
        baseline = float(scores.sum()) / total if total > 0 else 0.0
    return scores - baseline * lengths.to(scores.dtype), float(baseline)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    kind: Literal["grpo", "rloo"] = "grpo",
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Critic-free advantages from ``[N]`` sequence rewards in contiguous groups of ``group_size``.

    Rows ``g*G .. g*G+G-1`` are the samples of prompt ``g``. With group mean mu and unbiased
    group std s:

        grpo: A_i = (r_i - mu) / (s + eps)     (or r_i - mu when ``scale_by_std`` is False: Dr. GRPO)
        rloo: A_i = r_i - (sum_j r_j - r_i) / (G - 1)  = G/(G-1) * (r_i - mu)

    A group whose samples all scored the same gets advantage 0 (no signal), never NaN.
    Raises ValueError if N is not a multiple of ``group_size`` or ``group_size`` < 2.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if kind == "rloo":
        adv = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    elif kind == "grpo":
        adv = grouped - mean
        if scale_by_std:
            adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    else:
        raise ValueError(f"unknown advantage kind {kind!r}; expected 'grpo' or 'rloo'")
    return adv.reshape(-1)


def group_token_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    scale_by_std: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Critic-free per-token advantages from per-token rewards (GRPO with process supervision,
    Shao et al. 2024, section 4.1.3): ``rewards`` and ``mask`` are ``[N, T]``, right-padded, with
    rows ``g*G .. g*G+G-1`` the samples of prompt ``g``. With R_g the rewards at the valid
    positions (m = 1) of all of group g's samples, mean mu_g and unbiased std s_g:

        r~_{i,t} = m_{i,t} * (r_{i,t} - mu_g)          (divided by s_g + eps with ``scale_by_std``)
        A_{i,t}  = sum_{t' >= t} r~_{i,t'}              (the reward to go; 0 where no valid token follows)

    A token is credited only with the rewards at and after it: a sum-pooled reward model's score of
    a position depends on the tokens up to it, so the rewards before a token are no consequence of
    it and only add noise to its advantage. A_{i,0} = sum_t r~_{i,t} = S_i - mu_g * L_i: the
    sequence score with the group's mean reward per token as the baseline of every token (length
    alone earns nothing). A group with fewer than two valid tokens, or all equal, gets 0. The mask
    marks the rewarded positions (a position with m = 0 adds nothing, but a valid token before it
    still collects the rewards after it). No gradient.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.shape != mask.shape or rewards.dim() != 2 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must be equal [N, T] "
                         f"with N a multiple of group_size={group_size}")
    with torch.no_grad():
        m = mask.to(rewards.dtype)
        n, t = rewards.shape
        grouped_r = (rewards * m).view(-1, group_size * t)
        grouped_m = m.view(-1, group_size * t)
        count = grouped_m.sum(1, keepdim=True)
        mean = grouped_r.sum(1, keepdim=True) / count.clamp_min(1.0)
        centred = (grouped_r - mean) * grouped_m
        if scale_by_std:
            var = (centred ** 2).sum(1, keepdim=True) / (count - 1).clamp_min(1.0)
            centred = centred / (var.sqrt() + eps)
        centred = centred * (count >= 2).to(rewards.dtype)
        per_token = centred.view(n, t)
        return per_token.flip(1).cumsum(1).flip(1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked entries (biased variances).

    1 is a perfect critic, 0 no better than a constant, negative worse. NaN when the returns
    have zero variance or no entry is valid (undefined, and reported as such).
    """
    if float(mask.sum()) < 1:
        return math.nan
    var_y = float(masked_var(returns, mask, unbiased=False))
    if var_y == 0.0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_y


def last_token_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """:func:`explained_variance` over each row's last valid token only (right padding): how well the
    critic predicts the return where the sequence score is paid. With the score only at the end
    and no per-token KL in the rewards that return is the score itself, so a critic that knows the
    reward shows here even when the token-level value is low (early tokens cannot foresee how a
    sampled response will end). NaN with fewer than two rows or constant returns.
    """
    if values.shape[0] < 2:
        return math.nan
    rows = torch.arange(values.shape[0], device=values.device)
    last = last_valid_index(mask)
    keep = mask.to(torch.long).sum(dim=1) > 0
    ones = keep.to(values.dtype)
    return explained_variance(values[rows, last], returns[rows, last], ones)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                estimator: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """``[B]`` sequence KL estimates: sum_t m_t * KL_t with the chosen per-token estimator.

    With k1 this is log pi(y|x) - log pi_ref(y|x) of each sampled response, whose mean over
    samples of pi is KL(pi || pi_ref) per sequence. No gradient.
    """
    with torch.no_grad():
        return masked_sum(kl_estimate(logprobs, ref_logprobs, estimator), mask, dim=1)


class RunningMoments:
    """Running mean and (population) variance of every value seen, merged batch by batch.

    Chan et al.'s parallel update: with the running (n_a, mu_a, M2_a) and a batch
    (n_b, mu_b, M2_b), delta = mu_b - mu_a, n = n_a + n_b,

        mu = mu_a + delta * n_b / n
        M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,     var = M2 / n

    (exact, in float64, whatever the batch sizes). ``state_dict``/``load_state_dict`` make it
    part of a checkpoint, so a resumed run normalises as an uninterrupted one.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Population variance of the values seen (0 before any)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor) -> None:
        """Merge a batch of values (any shape; all entries count)."""
        x = values.detach().to(torch.float64).flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mu_b = float(x.mean())
        m2_b = float(((x - mu_b) ** 2).sum())
        n = self.count + n_b
        delta = mu_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_scores(scores: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(scores - mean) / (std + eps): reward normalisation to zero mean and unit scale.

    With a batch's own moments this is reward whitening; with :class:`RunningMoments` it puts
    every step's rewards on one scale, so a KL coefficient means the same thing whatever the
    reward model's scale (a reward model's outputs are only defined up to shift and scale).
    """
    return (scores - mean) / (std + eps)
