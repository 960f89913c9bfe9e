"""Reward losses and evaluation metrics against hand-computed values (pure functions, no model)."""

import math

import pytest
import torch

from reward.evaluate import calibration, summarize
from reward.losses import LOSSES, bradley_terry_loss, plackett_luce_loss, plackett_luce_loss_naive


def ls(x):  # -log σ(x), by hand
    return math.log(1 + math.exp(-x))


def test_bradley_terry_hand_values():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    per, m = bradley_terry_loss(chosen, rejected, reduction="none")
    # diffs 1, 0, -1: log(1+e^-1)=0.31326, log 2=0.69315, log(1+e)=1.31326
    torch.testing.assert_close(per, torch.tensor([0.313262, 0.693147, 1.313262]), atol=1e-6, rtol=0)
    mean, _ = bradley_terry_loss(chosen, rejected)
    assert float(mean) == pytest.approx((0.313262 + 0.693147 + 1.313262) / 3, abs=1e-6)
    total, _ = bradley_terry_loss(chosen, rejected, reduction="sum")
    assert float(total) == pytest.approx(2.319671, abs=1e-6)
    assert m["accuracy"] == pytest.approx(1 / 3)  # only the first pair is ordered right (a tie is not)


def test_bradley_terry_margin_hand_values():
    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0])
    margin = torch.tensor([1.0, 2.0])
    per, _ = bradley_terry_loss(chosen, rejected, margin, reduction="none")
    # diffs 2-1=1 and 1-2=-1
    torch.testing.assert_close(per, torch.tensor([ls(1.0), ls(-1.0)]), atol=1e-6, rtol=0)
    per_half, _ = bradley_terry_loss(chosen, rejected, margin, margin_scale=0.5, reduction="none")
    torch.testing.assert_close(per_half, torch.tensor([ls(1.5), ls(0.0)]), atol=1e-6, rtol=0)
    # a margin makes the loss larger than without it
    plain, _ = bradley_terry_loss(chosen, rejected, reduction="none")
    assert (per > plain).all()


def test_bradley_terry_is_stable_for_large_gaps():
    per, _ = bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]), reduction="none")
    assert torch.isfinite(per).all()
    assert float(per[0]) == pytest.approx(200.0) and float(per[1]) == pytest.approx(0.0, abs=1e-12)


def test_plackett_luce_hand_values():
    r = torch.tensor([[2.0, 1.0, 0.0]])
    loss, m = plackett_luce_loss(r, reduction="none")
    # -[2 - log(e^2+e^1+e^0)] - [1 - log(e^1+e^0)]
    expected = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    assert float(loss[0]) == pytest.approx(expected, abs=1e-6)
    assert float(loss[0]) == pytest.approx(0.407606 + 0.313262, abs=1e-5)
    assert m["top1_accuracy"] == 1.0


def test_plackett_luce_reduces_to_bradley_terry_for_two_answers():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 2, generator=g) * 3
    pl, _ = plackett_luce_loss(r, reduction="none")
    bt, _ = bradley_terry_loss(r[:, 0], r[:, 1], reduction="none")
    torch.testing.assert_close(pl, bt, atol=1e-6, rtol=1e-6)
    # and the gradients agree too
    a = r.clone().requires_grad_(True)
    b = r.clone().requires_grad_(True)
    plackett_luce_loss(a)[0].backward()
    bradley_terry_loss(b[:, 0], b[:, 1])[0].backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_plackett_luce_vectorized_matches_naive_loop_with_ragged_lists():
    lists = [[0.5, -1.0, 2.0, 0.1], [1.0, 0.0], [3.0, -2.0, 0.7]]
    K = max(map(len, lists))
    r = torch.zeros(len(lists), K, dtype=torch.float64)
    mask = torch.zeros(len(lists), K, dtype=torch.bool)
    for i, x in enumerate(lists):
        r[i, : len(x)] = torch.tensor(x, dtype=torch.float64)
        r[i, len(x):] = 123.0  # padding values must not matter
        mask[i, : len(x)] = True
    vec, _ = plackett_luce_loss(r, mask, reduction="none")
    torch.testing.assert_close(vec, torch.tensor(plackett_luce_loss_naive(lists), dtype=torch.float64))
    # a wrong order costs more than the right one
    best, _ = plackett_luce_loss(torch.tensor([[3.0, 2.0, 1.0]]))
    worst, _ = plackett_luce_loss(torch.tensor([[1.0, 2.0, 3.0]]))
    assert float(best) < float(worst)


def test_loss_table_names_both_variants():
    assert set(LOSSES) == {"bradley_terry", "plackett_luce"}


def test_summarize_hand_values():
    rewards = [[2.0, 1.0], [0.0, 1.0], [3.0, 0.0, 1.0]]  # pairs: (2,1) ok, (0,1) wrong, (3,0) (3,1) ok, (0,1) wrong
    s = summarize(rewards, bins=2)
    assert s["pairs"] == 5
    assert s["eval/accuracy"] == pytest.approx(3 / 5)
    expected_loss = (ls(1) + ls(-1) + ls(3) + ls(2) + ls(-1)) / 5
    assert s["eval/loss"] == pytest.approx(expected_loss, abs=1e-9)
    assert s["eval/reward_chosen_mean"] == pytest.approx(5 / 3)
    assert s["eval/reward_chosen_std"] == pytest.approx(math.sqrt(((2 - 5 / 3) ** 2 + (5 / 3) ** 2 + (3 - 5 / 3) ** 2) / 2))
    assert s["eval/reward_rejected_mean"] == pytest.approx(3 / 4)
    every = [2, 1, 0, 1, 3, 0, 1]
    assert s["reward_mean"] == pytest.approx(sum(every) / 7)


def test_calibration_bins_and_ece_by_hand():
    # one pair with gap 0: p = 0.5 both ways, observed 1 and 0 -> bin [0.5, 1) has p 0.5, observed 0.5
    c = calibration([(1.0, 1.0)], bins=2)
    assert c["bins"][1]["n"] == 2 and c["bins"][1]["observed"] == 0.5 and c["ece"] == pytest.approx(0.0)
    # one pair with gap ln 3: p = 0.75 (observed 1) and 0.25 (observed 0): ECE = 0.25
    c = calibration([(math.log(3), 0.0)], bins=2)
    assert c["bins"][0]["predicted"] == pytest.approx(0.25) and c["bins"][0]["observed"] == 0
    assert c["bins"][1]["predicted"] == pytest.approx(0.75) and c["bins"][1]["observed"] == 1
    assert c["ece"] == pytest.approx(0.25)
