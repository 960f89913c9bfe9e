"""PPO on 2 DeepSpeed ZeRO-3 ranks (Ray actors, gloo): the actor update equals the same update in 1 process, two
rollout engines share the batch and the sync, and the critic is exported from ZeRO-3 to final/critic."""

from __future__ import annotations

import pytest
import torch

from alignloop.config import load_config
from ppo.config import PPOConfig
from ppo.experience import build_experience

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _cfg(tiny_model, tmp_path, *extra):
    return load_config(PPOConfig, None, [
        f"model.path={tiny_model}", f"data.prompts={tmp_path / 'p.jsonl'}", "reward.rules=[{fn: 'ppo.rewards:brevity'}]",
        "peft.method=full", "algo.advantage=grpo", "rollout.n_samples=2", "rollout.prompts_per_step=4",
        "train.micro_batch_size=2", "algo.kl.in_reward=false", "algo.kl.estimator=k3", "algo.kl.coef=0.1",
        "optim.lr=1e-3", "optim.max_grad_norm=0", *extra])


def _experience(vocab: int):
    g = torch.Generator().manual_seed(0)
    lens_p, lens_a = [3, 5, 4, 6, 2, 5, 3, 4], [6, 2, 7, 4, 5, 1, 7, 3]
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens_p]
    answers = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens_a]
    exp = build_experience(prompts, answers, [[0.0] * n for n in lens_a], eos_ids=set(), pad_id=0)
    exp.advantages = torch.randn(exp.mask.shape, generator=g) * exp.mask
    return exp


def test_two_zero3_ranks_equal_one_process(tiny_model, tmp_path):
    ray = pytest.importorskip("ray")
    from ppo.actor import PolicyTrainer
    from ppo.ray_actors import PolicyWorker, _Group

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    one = PolicyTrainer(_cfg(tiny_model, tmp_path), str(tiny_model))
    exp = _experience(300)
    signs = torch.randint(0, 2, exp.mask.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    exp.old_logprobs = one.logprobs(exp) + 0.3 * signs * exp.mask  # ratios e^±0.3: clipping is exercised
    exp.ref_logprobs = one.logprobs(exp, reference=True) - 0.1 * exp.mask
    tokens = float(exp.mask.sum())
    s1 = one.train_mini_batch(exp, tokens, 0.1)
    w1 = one.parameters_digest()

    from alignloop.ray_utils import init_ray

    init_ray()
    try:
        cfg2 = _cfg(tiny_model, tmp_path, "ray.use_ray=true", "ray.actor_workers=2", "ray.cpus_per_worker=0.5",
                    "train.strategy=deepspeed", "deepspeed.zero_stage=3")
        group = _Group(PolicyWorker, cfg2, str(tiny_model), 2)
        parts = group.map("train_mini_batch", exp, tokens, 0.1)
        w2 = group.all("parameters_digest")[0]
    finally:
        ray.shutdown()
    s2 = {k: sum(p[k] for p in parts) for k in ("loss/policy", "ppo/clipfrac", "ppo/kl_loss", "tokens")}
    assert s2["tokens"] == s1["tokens"] == tokens
    for k in ("loss/policy", "ppo/clipfrac", "ppo/kl_loss"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), k
    assert s1["ppo/clipfrac"] > 0
    assert w1.keys() == w2.keys()
    changed = 0
    base = PolicyTrainer(_cfg(tiny_model, tmp_path), str(tiny_model)).parameters_digest()
    lr = 1e-3
    for k in w1:
        # Adam's first step is lr·g/(|g| + eps): a full ±lr wherever |g| >> eps (1e-8). An element whose gradient
        # is ~eps takes a partial step whose size and sign float summation order (2 ranks vs 1) can change: on
        # an AMX Xeon one v_proj element of 16,384 moved by -2.0e-4 in one process and +1.2e-4 on two ranks.
        # Every other element must agree, and those may only be such partial steps, at most two per tensor.
        step1, step2 = w1[k] - base[k], w2[k] - base[k]
        off = (w2[k] - w1[k]).abs() > 2e-4
        assert int(off.sum()) <= 2 and bool((step1[off].abs() < 0.5 * lr).all()), (k, step1[off], step2[off])
        torch.testing.assert_close(w2[k][~off], w1[k][~off], rtol=0, atol=2e-4)
        assert float((step2 - step1).norm() / step1.norm()) < 5e-3, k
        changed += not torch.equal(w1[k], base[k])
    assert changed == len(w1)  # every weight moved: the comparison is not trivially equal


def test_two_rollout_engines_split_the_batch_and_both_get_the_synced_weights(tiny_model, tmp_path):
    """ray.num_engines=2: prompts are sharded over two engine actors; after an update + sync, greedy answers from
    the pair equal one in-process engine holding the trained weights (so both engines were synced)."""
    ray = pytest.importorskip("ray")
    from alignloop.rollout import HFEngine, SamplingSettings
    from ppo.ray_actors import RayRoles

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    cfg = _cfg(tiny_model, tmp_path, "ray.use_ray=true", "ray.num_engines=2", "ray.cpus_per_worker=0.5",
               "rollout.engine=hf", "algo.kl.coef=0")
    roles = RayRoles(cfg, str(tiny_model), tmp_path / "run")
    try:
        assert len(roles.engines) == 2
        exp = _experience(300)
        exp.old_logprobs = torch.cat(roles.actor.map("logprobs", exp, False))
        roles.train_actor(exp, float(exp.mask.sum()), 0.0)
        roles.sync()
        trained = roles.actor.all("parameters_digest")[0]
        prompts = [[5 + i, 17, 42 + i] for i in range(5)]  # odd count: uneven shards
        greedy = SamplingSettings(max_new_tokens=6, temperature=0.0)
        got = [c[0].token_ids for c in roles.generate(prompts, greedy)]
    finally:
        roles.close()
        ray.shutdown()
    local = HFEngine(str(tiny_model))
    before = [c[0].token_ids for c in local.generate(prompts, greedy)]
    local.update_weights(trained)
    want = [c[0].token_ids for c in local.generate(prompts, greedy)]
    assert got == want
    assert want != before  # the update changed the answers: the comparison is not trivially equal


def test_zero3_critic_is_exported_to_final_with_the_trained_values(tiny_model, tmp_path):
    """A LoRA critic on 2 ZeRO-3 ranks, trained one step, then ``save_final`` on every rank (what ``RayRoles``
    runs at the end of a PPO run): rank 0 writes ``final/critic`` while DeepSpeed's HF integration is live in its
    process (it used to skip the export there: a model built after training was partitioned, and rank 0 alone
    hung). The export loads with ``AutoModelForSequenceClassification`` and gives the trained critic's values."""
    ray = pytest.importorskip("ray")
    from transformers import AutoModelForSequenceClassification

    from alignloop.ray_utils import init_ray
    from ppo.actor import ValueModel
    from ppo.ray_actors import CriticWorker, _Group

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    cfg = _cfg(tiny_model, tmp_path, "peft.method=lora", "algo.advantage=gae", "critic.optim.lr=1e-2",
               "ray.use_ray=true", "ray.critic_workers=2", "ray.cpus_per_worker=0.5", "train.strategy=deepspeed",
               "deepspeed.zero_stage=3")
    exp = _experience(300)
    out = tmp_path / "final" / "critic"
    init_ray()
    try:
        group = _Group(CriticWorker, cfg, str(tiny_model), 2)
        exp.values = torch.cat(group.map("values", exp))
        exp.returns = exp.values + exp.advantages
        group.map("train_mini_batch", exp, float(exp.mask.sum()))
        trained = torch.cat(group.map("values", exp))
        group.all("save_final", str(out), str(tiny_model))
    finally:
        ray.shutdown()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    seq = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    assert not any("lora" in k for k in seq.state_dict())  # merged: a plain sequence-classification model
    with torch.no_grad():
        exported = ValueModel(seq.eval())(**exp.model_inputs())[:, exp.answer_slice] * exp.mask
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-5)
    assert float((trained - exp.values).abs().max()) > 1e-3  # the step moved the values: the check is not vacuous


def test_zero3_critic_trains_the_same_on_its_kept_value_pass(tiny_model, tmp_path):
    """algo.reuse_values on 2 ZeRO-3 ranks: each rank keeps the graph of its share of the value pass and its first
    update trains on it (no second forward); the step equals the one with a separate forward."""
    ray = pytest.importorskip("ray")
    from alignloop.ray_utils import init_ray
    from ppo.ray_actors import CriticWorker, _Group

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    cfg = _cfg(tiny_model, tmp_path, "peft.method=lora", "algo.advantage=gae", "critic.optim.lr=1e-2",
               "ray.use_ray=true", "ray.critic_workers=2", "ray.cpus_per_worker=0.5", "train.strategy=deepspeed",
               "deepspeed.zero_stage=3", "train.micro_batch_size=4")  # a rank's share: one micro-batch
    exp = _experience(300)
    init_ray()
    try:
        out = []
        for reuse in (False, True):
            group = _Group(CriticWorker, cfg, str(tiny_model), 2)
            exp.values = torch.cat(group.map("values", exp, reuse))
            exp.returns = exp.values + exp.advantages
            sums = group.map("train_mini_batch", exp, float(exp.mask.sum()), reuse)
            out.append((exp.values, sum(s["loss/value"] for s in sums), torch.cat(group.map("values", exp))))
    finally:
        ray.shutdown()
    (v0, loss0, after0), (v1, loss1, after1) = out
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    torch.testing.assert_close(after1, after0, rtol=1e-4, atol=1e-5)
    assert float((after0 - v0).abs().max()) > 1e-3  # the step moved the values: the check is not vacuous
