"""PPO-for-LM math as pure functions over (B, A) tensors and a mask. Imports only torch.

Shapes: B sequences, A response tokens. ``mask`` (B, A) is 1 on real response
tokens (up to and including EOS) and 0 on padding. Losses return
``(loss, metrics)`` where the loss is ``sum(token_loss * mask) / normalizer``:
trainers pass the token count of the *global* batch as ``normalizer`` so the
gradient is the same however the batch is split over ranks and micro-batches
(the default, ``mask.sum()``, is the local token mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


# ------------------------------------------------------------------ reductions

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) as one float64 tensor: all-reduce it to whiten over the global batch."""
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    return torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()])


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, moments: torch.Tensor | None = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; ``moments`` from :func:`masked_moments`, summed over ranks.

    Unbiased variance (n - 1), as lm-human-preferences does; masked entries stay 0.
    With shift_mean=False the mean is added back (only the scale is normalised).
    """
    s, ss, n = (moments if moments is not None else masked_moments(x, mask)).tolist()
    mean = s / max(n, 1)
    var = (ss - n * mean * mean) / max(n - 1, 1)
    out = (x - mean) / math.sqrt(max(var, 0.0) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ------------------------------------------------------------------ log-probs

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token] per position: (B, A, V), (B, A) -> (B, A).

    The same one-kernel ``log_softmax`` and gather as :func:`logprobs_and_entropy`, so a no-grad pass (π_θold,
    π_ref) and the training forward give bit-identical log-probs for the same logits (a ratio of exactly 1 before
    the first update); on the CPU it is no slower than ``logsumexp``.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _LogprobsAndEntropy(torch.autograd.Function):
    """One log_softmax over the vocabulary for both the sampled-token log-probs (differentiable) and the entropy
    (a metric, not differentiable). The backward reuses the softmax kept from the forward:
    ∂ lp_t / ∂ logits_t = onehot(a_t) - softmax(logits_t), one (B, A, V) pass instead of the gather/scatter,
    the logsumexp backward and their sum that autograd would run."""

    @staticmethod
    def forward(ctx, logits, tokens):
        logp = torch.log_softmax(logits, dim=-1)  # (B, A, V)
        picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, A)
        lse = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - picked  # logsumexp, read off the sampled token
        probs = logp.exp_()  # in place: the entropy needs only p and the logits from here on
        entropy = lse - (probs * logits).sum(-1)  # H = -Σ p·(z - lse) = lse - Σ p·z
        ctx.save_for_backward(probs, tokens)
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, _grad_entropy):
        probs, tokens = ctx.saved_tensors
        grad = probs.mul(-grad_picked.unsqueeze(-1))  # (B, A, V): -g·p
        grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_picked.unsqueeze(-1))  # + g at the sampled token
        return grad, None


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`logprobs_from_logits`, :func:`entropy_from_logits` detached) from one softmax: (B, A, V), (B, A) ->
    (B, A), (B, A). The training forward needs both; computing them apart costs three more passes over the logits."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return _LogprobsAndEntropy.apply(logits, tokens)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, A, V) -> (B, A)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------ KL

def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL(π || π_ref) estimates from sampled-token log-probs (Schulman, "Approximating KL divergence").

    k1 = log r⁻¹ = logp - ref (unbiased, can be negative); k2 = ½(logp - ref)²;
    k3 = (r - 1) - log r with r = π_ref/π (unbiased and always ≥ 0).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()  # log π/π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        neg = (-log_ratio).clamp(max=20.0)  # log π_ref/π; clamp keeps exp finite
        return neg.exp() - 1 - neg
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {estimator!r}")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Token rewards: -β·KL on every response token plus the sequence score on its last real token.

    scores (B,), kl (B, A), mask (B, A) -> (B, A). (Ziegler et al. 2019; Stiennon et al. 2020.)
    """
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)  # (B,)
    rewards[torch.arange(mask.shape[0]), last] += scores.to(rewards.dtype)
    return rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask (0 for an empty row)."""
    A = mask.shape[1]
    idx = torch.arange(A, device=mask.device).expand_as(mask)
    return (idx * (mask > 0)).max(dim=1).values


# ------------------------------------------------------------------ advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), (B, A) -> (advantages, returns).

    δ_t = r_t + γ V_{t+1} - V_t and A_t = δ_t + γλ A_{t+1}, with V and A zero after
    the last real token. A reverse scan over A, vectorised over B.
    """
    rewards, values, mask = rewards.float(), values.float() * mask, mask.float()
    B, A = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(A)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        adv[:, t] = next_adv
    returns = (adv + values) * mask
    return adv, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{k≥t} γ^{k-t} r_k per token (REINFORCE, no critic), (B, A) -> (B, A)."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    run = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        run = (rewards[:, t].float() + gamma * run) * mask[:, t]
        out[:, t] = run
    return out


def grpo_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor, scale: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (score - group mean) / group std, broadcast over each answer's tokens.

    ``scores`` (B,) ordered as n consecutive samples per prompt; std is the
    unbiased sample std; ``scale=False`` is Dr. GRPO (mean only).
    """
    g = scores.float().view(-1, group_size)  # (B/n, n)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.view(-1, 1) * mask


def rloo_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): score minus the mean of the *other* n-1 samples of the same prompt."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = scores.float().view(-1, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).view(-1, 1) * mask


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            moments: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): discounted returns of KL-shaped token rewards, whitened over the global batch."""
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask, moments=moments)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "gae": gae,
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


# ------------------------------------------------------------------ losses

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                normalizer: float | torch.Tensor | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (Schulman et al. 2017), per token: max(-A·r, -A·clip(r, 1-ε, 1+ε_high)).

    ``dual_clip`` c > 1 (Ye et al. 2020) caps the loss at -c·A for negative advantages.
    ``is_weights`` (B, A) multiply the token loss (truncated importance sampling between the
    rollout engine and the trainer). Metrics: clipfrac, approx_kl (k3 of old vs new).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = torch.maximum(surr1, surr2)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    if is_weights is not None:
        loss = loss * is_weights
    norm = mask.sum() if normalizer is None else normalizer
    total = masked_sum(loss, mask) / norm
    with torch.no_grad():
        clipped = (surr2 > surr1).float()
        metrics = {
            "clipfrac": float(masked_mean(clipped, mask)),
            "approx_kl": float(masked_mean((ratio - 1) - log_ratio, mask)),
        }
    return total, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float | None = 0.2, normalizer: float | torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """½·max((V - R)², (clip(V, V_old ± ε) - R)²) per token; ``clip_eps=None`` is the plain squared error."""
    err = (values - returns).pow(2)
    if clip_eps is not None:
        clipped_v = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_c = (clipped_v - returns).pow(2)
        loss = 0.5 * torch.maximum(err, err_c)
        frac = float(masked_mean((err_c > err).float(), mask))
    else:
        loss, frac = 0.5 * err, 0.0
    norm = mask.sum() if normalizer is None else normalizer
    return masked_sum(loss, mask) / norm, {"value_clipfrac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over masked tokens (1: perfect critic, 0: no better than a constant)."""
    var_r = float(masked_mean((returns - masked_mean(returns, mask)).pow(2), mask))
    diff = returns - values
    var_d = float(masked_mean((diff - masked_mean(diff, mask)).pow(2), mask))
    return float("nan") if var_r == 0 else 1.0 - var_d / var_r


def truncated_is_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """min(π_trainer / π_rollout, cap) per token: corrects the engine/trainer mismatch (Yao et al. 2025, TIS)."""
    return (trainer_logprobs.detach() - rollout_logprobs).exp().clamp(max=cap)


# ------------------------------------------------------------------ KL controllers

@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon)."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])
