"""ppo.dpo_losses against hand-computed values and a naive per-pair loop (STYLE.md 3-4)."""

import math

import pytest
import torch

from ppo.dpo_losses import LOSSES, dpo_loss

# Two pairs, beta = 0.5:
#   chosen log-ratio  = [-1 - -1.5, -2 - -2]   = [0.5, 0.0]
#   rejected log-ratio = [-3 - -2.5, -1 - -1.5] = [-0.5, 0.5]
#   h = [1.0, -0.5], beta*h = [0.5, -0.25]
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
BETA = 0.5


def softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_sigmoid_hand_values():
    loss, m = dpo_loss(PC, PR, RC, RR, loss_type="sigmoid", beta=BETA)
    # -log sigma(0.5) = log(1 + e^-0.5) = 0.474077;  -log sigma(-0.25) = log(1 + e^0.25) = 0.825939
    assert loss.item() == pytest.approx((0.474077 + 0.825939) / 2, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (0.5 + 0.0) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (-0.5 + 0.5) / 2)
    assert m["margin"].item() == pytest.approx(0.125)
    assert m["accuracy"].item() == 0.5  # pair 1: 0.25 > -0.25; pair 2: 0 < 0.25


def test_conservative_dpo_label_smoothing():
    eps = 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="sigmoid", beta=BETA, label_smoothing=eps)
    # -(1-e) log s(x) - e log s(-x) with x = 0.5, -0.25
    want = [(1 - eps) * softplus(-0.5) + eps * softplus(0.5), (1 - eps) * softplus(0.25) + eps * softplus(-0.25)]
    assert loss.item() == pytest.approx(sum(want) / 2, abs=1e-6)
    # pair 1 by hand: 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077
    assert want[0] == pytest.approx(0.524077, abs=1e-6)


def test_robust_dpo_hand_values():
    eps = 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="robust", beta=BETA, label_smoothing=eps)
    # pair 1: (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = 0.411578
    p1 = (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8
    p2 = ((1 - eps) * softplus(0.25) - eps * softplus(-0.25)) / (1 - 2 * eps)
    assert p1 == pytest.approx(0.411578, abs=1e-6)
    assert loss.item() == pytest.approx((p1 + p2) / 2, abs=1e-6)
    # eps = 0 is plain DPO
    a, _ = dpo_loss(PC, PR, RC, RR, loss_type="robust", beta=BETA)
    b, _ = dpo_loss(PC, PR, RC, RR, loss_type="sigmoid", beta=BETA)
    assert a.item() == pytest.approx(b.item())


def test_ipo_hand_values_with_and_without_lengths():
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="ipo", beta=BETA)
    # target 1/(2*0.5) = 1: (1 - 1)^2 = 0, (-0.5 - 1)^2 = 2.25
    assert loss.item() == pytest.approx(1.125)
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="ipo", beta=BETA, chosen_tokens=torch.tensor([2.0, 1.0]),
                       rejected_tokens=torch.tensor([1.0, 5.0]))
    # h = 0.5/2 + 0.5/1 = 0.75 ; 0/1 - 0.5/5 = -0.1  ->  (0.75-1)^2 = 0.0625, (-1.1)^2 = 1.21
    assert loss.item() == pytest.approx((0.0625 + 1.21) / 2)


def test_hinge_hand_values():
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="hinge", beta=BETA)
    assert loss.item() == pytest.approx((0.5 + 1.25) / 2)  # relu(1 - 0.5), relu(1 + 0.25)


def naive(loss_type, pc, pr, rc, rr, beta, eps):
    """One pair at a time with math: the oracle for the vectorised table."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        x = beta * ((a - c) - (b - d))
        h = (a - c) - (b - d)
        out.append({
            "sigmoid": (1 - eps) * softplus(-x) + eps * softplus(x),
            "robust": ((1 - eps) * softplus(-x) - eps * softplus(x)) / (1 - 2 * eps),
            "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": max(0.0, 1 - x),
        }[loss_type])
    return sum(out) / len(out)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_vectorised_matches_naive_loop(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(7, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    eps = 0.0 if loss_type in ("ipo", "hinge") else 0.2
    loss, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.3, label_smoothing=eps)
    assert loss.item() == pytest.approx(naive(loss_type, pc, pr, rc, rr, 0.3, eps), rel=1e-12)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_shards_with_global_pair_count_equal_full_batch(loss_type):
    """Two data-parallel shards, each normalised by the global pair count, sum to the full-batch loss and gradient."""
    g = torch.Generator().manual_seed(1)
    pc = (-torch.rand(6, generator=g) * 10).requires_grad_()
    pr, rc, rr = (-torch.rand(6, generator=g) * 10 for _ in range(3))
    full, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.2)
    (gfull,) = torch.autograd.grad(full, pc)
    parts = [dpo_loss(pc[s], pr[s], rc[s], rr[s], loss_type=loss_type, beta=0.2, num_pairs=6)[0]
             for s in (slice(0, 2), slice(2, 6))]
    (gparts,) = torch.autograd.grad(parts[0] + parts[1], pc)
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(gparts, gfull)


def test_sigmoid_gradient_by_hand_and_reference_is_constant():
    pc = PC.clone().requires_grad_()
    rc = RC.clone().requires_grad_()
    loss, _ = dpo_loss(pc, PR, rc, RR, loss_type="sigmoid", beta=BETA)
    loss.backward()
    # d/dpc of -log s(b h)/B = -b * s(-b h) / B
    want = [-BETA / (1 + math.exp(0.5)) / 2, -BETA / (1 + math.exp(-0.25)) / 2]
    torch.testing.assert_close(pc.grad, torch.tensor(want))
    assert rc.grad is None or torch.all(rc.grad == 0)  # the reference is never trained


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
