"""ppo.losses against hand-computed values and naive loops (STYLE.md 3-4)."""

import math

import pytest
import torch

from ppo import losses as L

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def naive_gae(rewards, values, mask, gamma, lam):
    B, A = rewards.shape
    adv = torch.zeros(B, A)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = L.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # lam=gamma=1: A_t = sum of future rewards - V_t = 1 - 0.5
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    adv, _ = L.gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.5)
    d2 = 1 - 0.5
    d1 = 0 + 0.9 * 0.5 - 0.5
    d0 = 0 + 0.9 * 0.5 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    assert torch.allclose(adv, torch.tensor([[d0 + 0.45 * a1, a1, a2]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = torch.ones(4, 7)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    adv, ret = L.gae(r, v, mask, gamma, lam)
    a2, r2 = naive_gae(r, v, mask, gamma, lam)
    assert torch.allclose(adv, a2, atol=1e-6) and torch.allclose(ret, r2, atol=1e-6)
    assert (adv[mask == 0] == 0).all()


def test_policy_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.9, 1.0]]))  # ratios r (old logp = 0)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 5.0]])
    loss, m = L.policy_loss(logp, old, adv, MASK, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): [-1.2, 0.8, -2], [1.1, -0.9, (masked)]
    expected = (-1.2 + 0.8 - 2.0 + 1.1 - 0.9) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clipfrac"] == pytest.approx(2 / 5)  # tokens (0,0) and (0,1) are clipped
    loss_n, _ = L.policy_loss(logp, old, adv, MASK, clip_eps=0.2, normalizer=10.0)
    assert loss_n.item() == pytest.approx(expected * 5 / 10, abs=1e-6)


def test_policy_loss_dual_clip_and_asymmetric():
    logp = torch.log(torch.tensor([[5.0]]))
    adv = torch.tensor([[-1.0]])
    mask = torch.ones(1, 1)
    plain, _ = L.policy_loss(logp, torch.zeros(1, 1), adv, mask)
    dual, _ = L.policy_loss(logp, torch.zeros(1, 1), adv, mask, dual_clip=3.0)
    assert plain.item() == pytest.approx(5.0) and dual.item() == pytest.approx(3.0)
    hi, _ = L.policy_loss(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.ones(1, 1), mask,
                          clip_eps=0.2, clip_eps_high=0.28)
    assert hi.item() == pytest.approx(-1.28)
    with pytest.raises(ValueError):
        L.policy_loss(logp, torch.zeros(1, 1), adv, mask, dual_clip=0.5)


def test_policy_loss_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(2, 3, generator=g).requires_grad_()
    old, adv = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    loss, _ = L.policy_loss(logp, old, adv, MASK)
    loss.backward()
    ref = torch.zeros(())
    lp = logp.detach().clone().requires_grad_()
    for b in range(2):
        for t in range(3):
            if MASK[b, t]:
                r = torch.exp(lp[b, t] - old[b, t])
                ref = ref + torch.maximum(-adv[b, t] * r, -adv[b, t] * r.clamp(0.8, 1.2))
    (ref / 5).backward()
    assert torch.allclose(logp.grad, lp.grad, atol=1e-6)


def test_value_loss_hand_computed():
    v = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, 9.0]])
    old = torch.tensor([[0.0, 0.0, 2.0], [0.5, 0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    loss, m = L.value_loss(v, old, ret, MASK, clip_eps=0.2)
    # token (0,0): unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; (0,1): 1; (0,2): 0; (1,0): .25; (1,1): 0
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1 + 0 + 0.25 + 0) / 5)
    assert m["value_clipfrac"] == pytest.approx(1 / 5)
    plain, _ = L.value_loss(v, old, ret, MASK, clip_eps=None)
    assert plain.item() == pytest.approx(0.5 * (1 + 1 + 0 + 0.25 + 0) / 5)


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2)
    assert L.kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert L.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert L.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + d)
    with pytest.raises(ValueError):
        L.kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_unbiased_in_expectation():
    """E_π[k1] = E_π[k3] = KL(π||π_ref) over a small categorical."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    kl = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        per = L.kl_penalty(p.log().view(1, 3), q.log().view(1, 3), est).view(3)
        assert float((p * per).sum()) == pytest.approx(kl, abs=1e-6)


def test_logprobs_from_logits_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    naive = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(L.logprobs_from_logits(logits, tokens), naive, atol=1e-6)
    naive_t = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(L.logprobs_from_logits(logits, tokens, 0.7), naive_t, atol=1e-6)
    uniform = torch.zeros(1, 1, 4)
    assert L.entropy_from_logits(uniform).item() == pytest.approx(math.log(4))


def test_shaped_rewards_and_last_token():
    kl = torch.ones(2, 3)
    r = L.shaped_rewards(torch.tensor([1.0, 2.0]), kl, MASK, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.1, -0.1, 0.9], [-0.1, 1.9, 0.0]]))
    assert L.last_token_index(MASK).tolist() == [2, 1]


def test_group_advantages():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    mask = torch.ones(4, 2)
    grpo = L.grpo_advantages(scores, 2, mask)
    s = math.sqrt(2.0)  # unbiased std of (1, 3)
    assert torch.allclose(grpo[:, 0], torch.tensor([-1 / s, 1 / s, 0.0, 0.0]), atol=1e-5)
    drgrpo = L.grpo_advantages(scores, 2, mask, scale=False)
    assert drgrpo[:, 1].tolist() == [-1.0, 1.0, 0.0, 0.0]
    rloo = L.rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, torch.ones(3, 1))
    assert rloo[:, 0].tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5])
    with pytest.raises(ValueError):
        L.rloo_advantages(scores, 1, mask)


def test_reinforce_pp_whitened_returns():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    ret = L.discounted_returns(r, MASK, gamma=1.0)
    assert ret.tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]
    adv = L.reinforce_pp_advantages(r, MASK)
    vals = adv[MASK > 0]
    assert abs(float(vals.mean())) < 1e-6 and float(vals.std()) == pytest.approx(1.0, abs=1e-4)


def test_whitening_over_shards_equals_global():
    """Two data-parallel shards whitened with summed moments equal whitening the whole batch."""
    g = torch.Generator().manual_seed(3)
    x, mask = torch.randn(4, 5, generator=g), (torch.rand(4, 5, generator=g) > 0.3).float()
    whole = L.masked_whiten(x, mask)
    mom = L.masked_moments(x[:2], mask[:2]) + L.masked_moments(x[2:], mask[2:])
    parts = torch.cat([L.masked_whiten(x[:2], mask[:2], moments=mom), L.masked_whiten(x[2:], mask[2:], moments=mom)])
    assert torch.allclose(whole, parts, atol=1e-6)


def test_token_level_loss_invariant_to_split():
    """Micro-batches (or ranks) with the global token count as normalizer sum to the full-batch loss."""
    g = torch.Generator().manual_seed(4)
    logp, old, adv = (torch.randn(4, 6, generator=g) for _ in range(3))
    mask = (torch.rand(4, 6, generator=g) > 0.4).float()
    full, _ = L.policy_loss(logp, old, adv, mask)
    n = mask.sum()
    split = sum(L.policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], normalizer=n)[0] for i in range(4))
    assert torch.allclose(full, split, atol=1e-6)
    vfull, _ = L.value_loss(logp, old, adv, mask)
    vsplit = sum(L.value_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], normalizer=n)[0] for i in (0, 2))
    assert torch.allclose(vfull, vsplit, atol=1e-6)


def test_explained_variance_and_is_weights():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert L.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert L.explained_variance(torch.full((1, 3), 2.0), ret, mask) == pytest.approx(0.0)
    w = L.truncated_is_weights(torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.1, 0.9]])), cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 1.0])


def test_kl_controllers():
    fixed = L.FixedKLController(0.1)
    fixed.update(10.0, 100)
    assert fixed.value == 0.1
    ada = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(12.0, 100)  # error clipped to +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    other = L.AdaptiveKLController(1.0, 1.0, 1)
    other.load_state_dict(ada.state_dict())
    assert other == ada


def test_math_module_imports_only_torch():
    import subprocess
    import sys

    code = "import sys, ppo.losses; bad=[m for m in ('ray','vllm','deepspeed','transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_logprobs_and_entropy_match_a_naive_loop_in_value_and_gradient():
    """The fused log-prob + entropy function against per-position python sums and autograd through the plain
    definition; the entropy is a metric and carries no gradient."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    upstream = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        lp, ent = L.logprobs_and_entropy(logits, tokens, temperature)
        assert lp.dtype == torch.float32 and not ent.requires_grad
        for b in range(2):
            for t in range(3):
                z = [float(v) / temperature for v in logits[b, t]]
                lse = math.log(sum(math.exp(v) for v in z))
                assert float(lp[b, t]) == pytest.approx(z[int(tokens[b, t])] - lse, abs=1e-5)
                assert float(ent[b, t]) == pytest.approx(-sum(math.exp(v - lse) * (v - lse) for v in z), abs=1e-5)
        (grad,) = torch.autograd.grad((lp.double() * upstream).sum(), logits)
        plain = torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        (want,) = torch.autograd.grad((plain.double() * upstream).sum(), logits)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    # the no-grad pass and the training forward agree bit for bit (a ratio of exactly 1 before the first update)
    x = torch.randn(3, 5, 50, generator=g)
    tok = torch.randint(0, 50, (3, 5), generator=g)
    assert torch.equal(L.logprobs_and_entropy(x, tok)[0], L.logprobs_from_logits(x, tok))
