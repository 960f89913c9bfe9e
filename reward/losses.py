"""Reward-model losses: pure functions of rewards (and a mask), no model calls. Imports only torch.

Shapes: B examples (pairs or ranked lists), K answers per example (best first).
Each loss returns ``(loss, metrics)`` where ``loss`` is reduced by ``reduction``
("mean", "sum" or "none" -> (B,)); the trainer takes "sum" and divides by the
global number of examples so data-parallel shards add up to the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, *,
                       margin_scale: float = 1.0, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """-log σ(r_c - r_r - s·m): Bradley & Terry (1952), as used by Ouyang et al. 2022 (InstructGPT eq. 1).

    chosen, rejected  # (B,) rewards of the preferred / dispreferred answer
    margin            # (B,) optional required gap (Llama 2 §3.2.2: larger for clearer preferences)
    """
    diff = chosen - rejected  # (B,)
    if margin is not None:
        diff = diff - margin_scale * margin
    per = -F.logsigmoid(diff)  # (B,) softplus(-diff), stable for large |diff|
    metrics = {"accuracy": float((chosen > rejected).float().mean()) if chosen.numel() else float("nan")}
    return _reduce(per, reduction), metrics


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                       reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Listwise negative log-likelihood of a full ranking under Plackett-Luce (Plackett 1975; Luce 1959).

    P(order) = Π_k exp(r_k) / Σ_{j≥k} exp(r_j), answers best first. For K=2 this is
    exactly -log σ(r_1 - r_2), the Bradley-Terry loss. (Zhu et al. 2023, "Principled
    RLHF from pairwise or K-wise comparisons".)

    rewards  # (B, K) rewards, best answer first
    mask     # (B, K) 1 for real answers, 0 for padding (lists may be shorter than K); real ones come first
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.bool()
    neg = torch.finfo(rewards.dtype).min
    r = rewards.masked_fill(~mask, neg)  # (B, K)
    # log Σ_{j≥k} exp(r_j): reverse cumulative logsumexp along K.
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # (B, K)
    # The last real answer contributes log(e^r/e^r)=0; padded positions contribute nothing.
    terms = torch.where(mask, r - tail, torch.zeros_like(r))  # (B, K)
    per = -terms.sum(-1)  # (B,)
    first_beats_rest = (rewards[:, :1] >= rewards.masked_fill(~mask, float("inf"))).all(-1) if rewards.numel() else rewards.new_zeros(0)
    metrics = {"top1_accuracy": float(first_beats_rest.float().mean()) if rewards.numel() else float("nan")}
    return _reduce(per, reduction), metrics


def plackett_luce_loss_naive(rewards: list[list[float]]) -> list[float]:
    """Loop twin of :func:`plackett_luce_loss` (test oracle): one list of rewards per example, best first."""
    import math

    out = []
    for rs in rewards:
        nll = 0.0
        for k in range(len(rs)):
            nll -= rs[k] - math.log(sum(math.exp(x) for x in rs[k:]))
        out.append(nll)
    return out


# The variants a config can name (``loss.type``).
LOSSES = {"bradley_terry": bradley_terry_loss, "plackett_luce": plackett_luce_loss}
