"""Alignment losses as pure tensor functions (no model calls, no trackers).

Log-probabilities are summed per sequence (or length-normalised where a loss says so) by the
caller, in fp32. Preference losses return *per-example* values so callers can weight and
reduce them; PPO losses return a scalar plus a dict of detached statistics (tensors, so no
GPU synchronisation happens here).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignment.rl import masked_mean

__all__ = [
    "dpo_loss",
    "simpo_loss",
    "reward_loss",
    "kto_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "entropy_from_logits",
    "entropy_from_hidden",
    "entropy_bonus",
    "entropy_without_token",
    "entropy_from_logp",
]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation (Rafailov et al. 2023) and relatives, per example.

    With h = (log pi(y_c) - log pi(y_r)) - (log pi_ref(y_c) - log pi_ref(y_r)) (summed log-probs):

        sigmoid: -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)
                 (eps = ``label_smoothing``: conservative DPO, assumed label-flip rate)
        ipo:     (h - 1 / (2 * beta))^2            (Azar et al. 2023; beta is IPO's tau)
        hinge:   max(0, 1 - beta * h)              (SLiC, Zhao et al. 2023)

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; the implicit rewards
    beta * (log pi - log pi_ref) are detached. Raises ValueError on an unknown ``loss_type`` or a
    label smoothing used with a loss that does not define it.
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is only defined for loss_type='sigmoid', got {loss_type!r}")
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen response, per token (RPO's NLL term,
    Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's ``rpo_alpha``):

        nll_i = −log π(y_w,i | x_i) / |y_w,i|

    Added to the DPO loss with a weight α, it keeps the chosen responses likely instead of
    only widening their margin over the rejected ones; on the policy's own samples it pulls
    toward the sampled (diverse) distribution, against DPO's collapse onto a few phrasings.
    """
    return -policy_chosen_logps / chosen_tokens.clamp_min(1)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin.

    The inputs must already be **length-normalised** log-probs (mean per response token, e.g.
    ``sequence_logps(..., average=True)``); this function does not know the lengths.
    With z = beta * (logp_c - logp_r) - gamma:

        loss = -(1 - eps) * log sigma(z) - eps * log sigma(-z)

    ``gamma`` is the margin in reward units (gamma / beta in log-prob units). Returns
    ``(losses, chosen_rewards, rejected_rewards)`` with rewards beta * logp, detached.
    """
    z = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry reward-model loss per example.

        loss_i = -log sigma(r_c - r_r - m_i) + center_coef * (r_c + r_r)^2

    ``margin`` (``[B]``, optional) asks for a gap of at least m (Llama 2); the centering term
    (Eisenstein et al. 2023) keeps rewards near 0 and its batch mean equals
    ``center_coef * mean((r_c + r_r)^2)``. Returns ``[B]``.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman–Tversky optimisation (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired responses, per example.

    Each example is one response y to a prompt x with a label: desirable (``labels`` true) or
    undesirable. With the implied reward r = log pi(y|x) - log pi_ref(y|x) (summed log-probs)
    and the reference point

        z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])     (detached)

    estimated on *mismatched* pairs (x_j, y'_j): prompts paired with another example's response,
    so z0 estimates KL(pi || pi_ref) without a sample from pi (the paper's batch estimate; TRL
    shifts completions by one within the batch),

        desirable:    loss = lambda_D * (1 - sigma(beta * (r - z0)))
        undesirable:  loss = lambda_U * (1 - sigma(beta * (z0 - r)))

    i.e. lambda_y - v(x, y) of the paper's value function. ``lambda_D``/``lambda_U`` are
    ``desirable_weight``/``undesirable_weight``; the paper advises
    lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] when the two classes are unbalanced.
    z0 carries no gradient (the paper: it only sets the saturation point) and is clamped at 0
    because a KL is never negative, whatever the noise of its estimate. Without mismatched
    log-probs (both ``None``) z0 = 0, which is TRL's ``apo_zero_unpaired`` loss.

    Shapes: ``policy_logps``, ``ref_logps``, ``labels`` ``[B]``; the mismatched pair
    log-probs ``[M]`` (any M >= 1, usually B). Returns ``(losses, rewards, kl)``: per-example
    losses ``[B]`` (the caller reduces, e.g. a weighted mean), rewards beta * r ``[B]``
    detached, and z0 (a 0-d tensor). Raises ValueError when only one of the two mismatched
    tensors is given or the shapes disagree.
    """
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("kto_loss: give both policy_kl_logps and ref_kl_logps, or neither")
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != labels.shape:
        raise ValueError(f"kto_loss: policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} "
                         f"and labels {tuple(labels.shape)} must have the same shape")
    if policy_kl_logps is None:
        kl = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    else:
        if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.numel() == 0:
            raise ValueError(f"kto_loss: policy_kl_logps {tuple(policy_kl_logps.shape)} and ref_kl_logps "
                             f"{tuple(ref_kl_logps.shape)} must have the same non-empty shape")
        kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    desirable = labels.to(torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - kl))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratio))),
    )
    return losses, beta * logratio.detach(), kl


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), token-level mean over ``mask``.

    With rho_t = exp(logp_t - logp_old_t):

        loss = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    All inputs ``[B, T]``; ``advantages`` and ``old_logprobs`` are treated as constants.
    Stats (detached scalars): ``clipfrac`` = share of tokens where the clipped term is active;
    ``approx_kl`` = mean((rho - 1) - log rho), the k3 estimate of KL(old || new);
    ``ratio`` = mean rho.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, token-level mean over ``mask``.

        V_clip = V_old + clip(V - V_old, -eps, eps)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    Stats (detached): ``vf_clipfrac`` = share of tokens where the clipped error is larger.
    """
    old = old_values.detach()
    target = returns.detach()
    clipped_values = old + torch.clamp(values - old, -clip_range, clip_range)
    err = (values - target) ** 2
    err_clipped = (clipped_values - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logp(logp: torch.Tensor, exclude: int | None = None) -> torch.Tensor:
    """Per-position entropy -sum_v p_v log p_v of normalised log-probabilities ``logp`` ``[..., V]``;
    with ``exclude``, :func:`entropy_without_token` of that token. Returns ``[...]``."""
    if exclude is not None:
        return entropy_without_token(logp, exclude)
    return -(logp.exp() * logp).sum(-1)


def _entropy_fp32(logits: torch.Tensor, exclude: int | None = None) -> torch.Tensor:
    if logits.dtype != torch.float64:
        logits = logits.float()
    return entropy_from_logp(torch.log_softmax(logits, dim=-1), exclude)


def entropy_without_token(logp: torch.Tensor, token: int) -> torch.Tensor:
    """Per-position entropy of the next-token distribution with one token's mass taken out and
    the rest renormalised (the entropy "over the non-EOS mass" when ``token`` is EOS).

    With p = exp(``logp``) (``logp`` normalised log-probabilities ``[..., V]``) and e = ``token``,
    the distribution over the other tokens is q_v = p_v / m (v ≠ e), m = Σ_{v≠e} p_v = 1 − p_e, and

        H(q) = −Σ_{v≠e} q_v log q_v = A / m + log m,   A = −Σ_{v≠e} p_v log p_v,

    computed as written: both sums run over the other tokens only (no 1 − p_e cancellation when
    the model is sure of e). The full entropy splits as H(p) = h(p_e) + (1 − p_e) · H(q), h the
    binary entropy. q is softmax(l with l_e = −∞) for logits l, so it does not depend on l_e:
    ∂H(q)/∂l_e = 0 (H(q) is unchanged when every log p_v moves by the same constant, so the
    log-softmax passes no gradient to l_e either). Raising H(q) spreads the mass among the other
    tokens and leaves p_e (the decision to end the answer) alone, where raising H(p) also pulls
    p_e towards 1/2 and, through (1 − p_e) · H(q), lowers it wherever the model is sure to end.
    Returns ``[...]`` in ``logp``'s dtype; m is floored at the dtype's smallest normal number.
    """
    idx = torch.tensor([token], device=logp.device)
    rest = logp.exp().index_fill(-1, idx, 0.0)  # p_v, 0 at e
    m = rest.sum(-1).clamp_min(torch.finfo(logp.dtype).tiny)
    return -(rest * logp).sum(-1) / m + m.log()


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = 1024,
                        exclude: int | None = None) -> torch.Tensor:
    """Per-position entropy H = -sum_v p_v log p_v = logsumexp(l) - sum_v p_v l_v, in fp32
    (with ``exclude``, :func:`entropy_without_token` of that token).

    ``logits`` is ``[..., V]``; returns ``[...]`` (fp32). Positions are processed
    ``chunk_size`` at a time so the fp32 softmax buffer is ``chunk_size x V`` at most; when a
    gradient is needed each chunk is recomputed in the backward pass (activation
    checkpointing) instead of keeping every chunk's buffer alive.
    """
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    if chunk_size is None or n <= chunk_size:
        return _entropy_fp32(flat, exclude).view(lead)
    needs_grad = torch.is_grad_enabled() and flat.requires_grad
    parts = []
    for start in range(0, n, chunk_size):
        chunk = flat[start : start + chunk_size]
        parts.append(checkpoint(_entropy_fp32, chunk, exclude, use_reentrant=False) if needs_grad
                     else _entropy_fp32(chunk, exclude))
    return torch.cat(parts).view(lead)


def _head_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  exclude: int | None = None) -> torch.Tensor:
    return _entropy_fp32(F.linear(hidden, weight, bias), exclude)


def entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        chunk_size: int | None = 1024, exclude: int | None = None) -> torch.Tensor:
    """Per-row entropy of the LM head's distribution, H(softmax(h Wᵀ + b)), for hidden rows
    ``[N, H]``: ``[N]`` fp32 (with ``exclude``, :func:`entropy_without_token` of that token).
    Like :func:`entropy_from_logits`, but the head is applied ``chunk_size`` rows at a time
    inside the (checkpointed) chunk, so the ``N x V`` logits never exist at once."""
    n = hidden.shape[0]
    if chunk_size is None or n <= chunk_size:
        return _head_entropy(hidden, weight, bias, exclude)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, n, chunk_size):
        chunk = hidden[start : start + chunk_size]
        parts.append(checkpoint(_head_entropy, chunk, weight, bias, exclude, use_reentrant=False) if needs_grad
                     else _head_entropy(chunk, weight, bias, exclude))
    return torch.cat(parts)


def entropy_bonus(seq_entropy: torch.Tensor, seq_tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence entropy term of a preference loss (``dpo.entropy_coef``):

        e_i = −(1/|y_i|) Σ_t H(π(· | x_i, y_i,<t))

    the negated mean entropy of the policy's next-token distribution at the positions of the
    response y_i (``seq_entropy`` the per-sequence sum of H_t, ``seq_tokens`` |y_i|; an empty
    response counts as one token). Added to the loss with a weight α > 0, descending it raises
    the policy's entropy where it is trained: DPO's gradient lowers both responses' likelihood
    and the freed mass settles on a few stock phrasings (distinct-2 falls in the first steps),
    which this term resists. Maximum-entropy regularisation of the implicit-reward objective;
    the reward-KL trade-off is still set by β.
    """
    return -seq_entropy / seq_tokens.clamp_min(1)
