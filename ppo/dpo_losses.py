"""The DPO family as pure functions over per-sequence log-prob sums. Imports only torch.

Shapes: B preference pairs. Every input is (B,): the *sum* over answer tokens of
log π(a_t|s_t) for the chosen (w) and rejected (l) answer under the policy θ and
the frozen reference. With

    h = (log π_θ(w) - log π_ref(w)) - (log π_θ(l) - log π_ref(l))     # (B,) log-ratio margin

each variant is a per-pair loss ℓ(h); :func:`dpo_loss` returns
``sum_b ℓ(h_b) / num_pairs``. Trainers pass the pair count of the *global* batch
as ``num_pairs`` so the gradient is the same however the batch is split over
ranks and micro-batches (the default, B, is the local mean).

Variants (``LOSSES``):
- ``sigmoid``  DPO, Rafailov et al. 2023 eq. 7: -log σ(β h). With
  ``label_smoothing`` ε > 0 this is conservative DPO (cDPO, Mitchell 2023):
  the label is assumed flipped with probability ε,
  -(1-ε) log σ(β h) - ε log σ(-β h).
- ``robust``   robust DPO, Chowdhury et al. 2024 eq. 8: the *unbiased* loss under
  flip rate ε, [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε).
- ``ipo``      IPO, Azar et al. 2023 eq. 17: (h - 1/(2β))². When token counts are
  given, each log-ratio is divided by its answer length first (TRL and the IPO
  authors do this so β does not depend on answer length).
- ``hinge``    SLiC-HF, Zhao et al. 2023: max(0, 1 - β h).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PairLoss = Callable[..., torch.Tensor]  # (h, beta, label_smoothing) -> (B,) per-pair loss


def _sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _robust(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing)


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # τ in the paper is β here; the target margin 1/(2τ) grows as the regulariser weakens.
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


LOSSES: dict[str, PairLoss] = {"sigmoid": _sigmoid, "robust": _robust, "ipo": _ipo, "hinge": _hinge}
# Variants whose log-ratios are length-normalised when token counts are passed.
LENGTH_NORMALISED = frozenset({"ipo"})


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             num_pairs: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics for B pairs.

    policy_chosen    # (B,) Σ_t log π_θ(w_t | x, w_<t)
    policy_rejected  # (B,) Σ_t log π_θ(l_t | x, l_<t)
    ref_chosen       # (B,) same under π_ref (no gradient needed)
    ref_rejected     # (B,)
    chosen_tokens    # (B,) answer lengths |w| (only ``ipo`` uses them)
    rejected_tokens  # (B,) answer lengths |l|

    Metrics are local means over the B pairs, detached: ``rewards/chosen`` and
    ``rewards/rejected`` are the implicit rewards β(log π_θ - log π_ref),
    ``margin`` their difference, ``accuracy`` the share of pairs where the chosen
    implicit reward is higher.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r} (one of {sorted(LOSSES)})")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen.detach()  # (B,)
    rejected_ratio = policy_rejected - ref_rejected.detach()  # (B,)
    if loss_type in LENGTH_NORMALISED and chosen_tokens is not None and rejected_tokens is not None:
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    else:
        h = chosen_ratio - rejected_ratio  # (B,)
    per_pair = LOSSES[loss_type](h, beta, label_smoothing)  # (B,)
    n = per_pair.numel() if num_pairs is None else num_pairs
    loss = per_pair.sum() / n
    with torch.no_grad():
        rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "margin": (rc - rr).mean(),
                   "accuracy": (rc > rr).float().mean()}
    return loss, metrics
