"""PPO / GRPO through the real CLI on a tiny random Llama with rule rewards; resume; LoRA and full sync into vLLM.

The reward used for learning is ``ppo.rewards:char_fraction`` (fraction of the answer's
characters that are 'e'): a random tiny model starts near 0.05 and can only raise it by
moving probability mass, so a clear rise means the whole loop works (rollout, scoring,
advantages, update, sync). Runs use one torch thread: on a shared 2-core machine more
threads spin against each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RULE = "reward.rules=[{fn: 'ppo.rewards:char_fraction', kwargs: {chars: 'e'}}]"


def alignloop(*args, env=None, check=True):
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", **(env or {})})
    r = subprocess.run([str(BIN / "alignloop"), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def common(tiny_model, out):
    return [f"model.path={tiny_model}", "data.prompts=ppo/data/prompts.jsonl", f"output_dir={out}", RULE,
            "train.threads=1", "rollout.max_new_tokens=8"]


LEARN = ["peft.method=full", "optim.lr=3e-3", "algo.kl.coef=0.01", "train.max_steps=20"]


def _rises(run, name="reward/mean"):
    r = [x[name] for x in metrics(run)]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.15 and last > 2 * first, r
    return first, last


def test_cli_ppo_raises_reward(tiny_model, tmp_path):
    alignloop("ppo", *common(tiny_model, tmp_path), *LEARN, "rollout.engine=hf", "rollout.prompts_per_step=16",
              "algo.ppo_epochs=2", "critic.optim.lr=1e-3")
    run = tmp_path / "ppo"
    _rises(run)
    m = metrics(run)
    assert len(m) == 20
    for name in ("ppo/kl", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/explained_variance",
                 "rollout/answer_length", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s", "time/rollout_s",
                 "time/score_s", "time/train_s", "time/sync_s", "loss/value", "loss/policy"):
        assert m[-1].get(name) is not None, name
    # every step's rollout came from the freshly synced policy: engine and trainer log-probs agree
    assert max(x["rollout/logprob_diff"] for x in m) < 1e-4
    assert m[-1]["ppo/kl"] > 0  # the policy moved away from the reference
    for name in ("config.yaml", "final/config.json", "final/model.safetensors", "final/tokenizer.json",
                 "checkpoints/step-20/DONE", "final/critic/model.safetensors", "final/critic/tokenizer.json"):
        assert (run / name).exists(), name
    # the trained critic is exported as a plain sequence-classification model: its head equals the last checkpoint's
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(run / "final/critic", num_labels=1)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    assert not torch.allclose(critic.score.weight, fresh.score.weight)  # trained, not the initial head
    state = torch.load(run / "checkpoints/step-20/critic/state.pt", weights_only=False)["model"]
    torch.testing.assert_close(critic.score.weight, state["seq.score.weight"].float())


def test_cli_grpo_raises_reward(tiny_model, tmp_path):
    alignloop("ppo", *common(tiny_model, tmp_path), *LEARN, "run_name=grpo", "rollout.engine=hf",
              "algo.advantage=grpo", "rollout.prompts_per_step=4", "rollout.n_samples=4", "algo.ppo_epochs=2",
              "algo.kl.in_reward=false", "algo.kl.estimator=k3")
    run = tmp_path / "grpo"
    _rises(run)
    m = metrics(run)
    assert "loss/value" not in m[-1] and m[-1]["ppo/kl_loss"] > 0  # no critic; KL sits in the loss
    assert not (run / "checkpoints/step-20/critic").exists()


def test_kill_and_resume_matches_uninterrupted(tiny_model, tmp_path):
    """LoRA policy + critic, adaptive KL: crash after step 2, resume, same adapter and metrics as a straight run.

    The crashed and resumed runs put the critic in its own process beside the actor (``train.overlap_critic``,
    ``train.critic_worker=process``): its checkpoint is written and read there, and the results are the
    sequential run's. transformers rollouts keep the three runs short; the resumed engine gets the restored
    adapter the same way the vLLM engine does (``load_lora`` after loading the checkpoint), which the LoRA sync
    test covers for vLLM.
    """
    args = [*common(tiny_model, tmp_path), "rollout.engine=hf", "peft.method=lora", "peft.lora_r=8",
            "optim.lr=2e-2", "train.max_steps=4", "train.save_every=2", "rollout.prompts_per_step=4",
            "algo.kl.adaptive=true", "algo.kl.target=0.01", "algo.kl.horizon=100"]
    alignloop("ppo", *args, "run_name=straight")
    beside = [*args, "run_name=crashed", "train.overlap_critic=true", "train.critic_worker=process"]
    r = alignloop("ppo", *beside, env={"ALIGNLOOP_CRASH_AFTER_STEP": "2"}, check=False)
    assert r.returncode != 0 and (tmp_path / "crashed/checkpoints/step-2/DONE").exists()
    assert (tmp_path / "crashed/checkpoints/step-2/critic").is_dir()
    assert not (tmp_path / "crashed/final").exists()
    r = alignloop("ppo", *beside, check=False)
    assert r.returncode == 2 and "resume=true" in r.stderr  # never clobbers a run silently
    r = alignloop("ppo", *beside, "resume=true")
    assert "resumed from" in r.stdout
    a = load_file(tmp_path / "straight/final/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "crashed/final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ma = {x["step"]: x for x in metrics(tmp_path / "straight")}
    mb = {x["step"]: x for x in metrics(tmp_path / "crashed")}
    assert sorted(mb) == [1, 2, 3, 4]
    for s in (3, 4):
        for name in ("reward/mean", "loss/policy", "loss/value", "ppo/kl", "ppo/kl_coef", "rollout/answer_length"):
            assert mb[s][name] == pytest.approx(ma[s][name], rel=1e-5, abs=1e-7), (s, name)
    assert ma[4]["ppo/kl_coef"] != ma[1]["ppo/kl_coef"]  # the adaptive controller moved, and was restored


def test_cli_rejects_bad_input_before_training(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    base = [f"model.path={tiny_model}", f"output_dir={tmp_path}", RULE]
    r = alignloop("ppo", *base, f"data.prompts={bad}", check=False)
    assert r.returncode == 2 and f"{bad}:2:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ppo").exists()
    r = alignloop("ppo", *base[:2], "data.prompts=ppo/data/prompts.jsonl", "reward.rules=[{fn: 'ppo.rewards:nope'}]",
                  check=False)
    assert r.returncode == 2 and "ppo.rewards:nope" in r.stderr
    r = alignloop("ppo", *base, "data.prompts=ppo/data/prompts.jsonl", "algo.advantage=grpo", check=False)
    assert r.returncode == 2 and "n_samples" in r.stderr
    r = alignloop("ppo", *base, "data.prompts=ppo/data/prompts.jsonl", "model.path=/no/such", check=False)
    assert r.returncode == 2 and "/no/such" in r.stderr


def _lora_vllm_loop(tiny_model, tmp_path, *overrides):
    """A LoRA PPO loop with an in-process vLLM engine (one thread): (loop, roles, tokenizer); the caller closes roles."""
    from alignloop.config import load_config
    from alignloop.models import load_tokenizer
    from ppo.config import PPOConfig
    from ppo.rewards import build_reward
    from ppo.trainer import LocalRoles, PPOLoop, read_prompts

    torch.set_num_threads(1)
    cfg = load_config(PPOConfig, None, [*common(tiny_model, tmp_path), "rollout.engine=vllm", "peft.method=lora",
                                        "peft.lora_r=8", "optim.lr=5e-2", "rollout.prompts_per_step=8", *overrides])
    run = tmp_path / "run"
    run.mkdir()
    roles = LocalRoles(cfg, str(tiny_model), run)
    tok = load_tokenizer(str(tiny_model))
    loop = PPOLoop(cfg, roles, tok, run, build_reward(cfg.reward), read_prompts(cfg.data.prompts), str(tiny_model))
    return loop, roles, tok


@pytest.mark.parametrize("lora_sync", ["adapter", "merged"])
def test_lora_sync_makes_vllm_match_the_updated_policy(tiny_model, tmp_path, lora_sync):
    """After an update + adapter push (or merged full weights), vLLM's greedy answers and log-probs are the trainer's
    (and not the base's)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from alignloop.rollout import HFEngine, SamplingSettings
    from ppo.experience import build_experience

    loop, roles, tok = _lora_vllm_loop(tiny_model, tmp_path, "algo.ppo_epochs=2", f"rollout.lora_sync={lora_sync}")
    try:
        for step in range(2):
            rec = loop.iteration(step)
        assert rec["rollout/logprob_diff"] < 1e-4  # step 2 sampled from the adapter pushed after step 1
        prompts = loop.prompt_ids[:6]
        greedy = SamplingSettings(max_new_tokens=10, temperature=0.0)
        v_out = [s[0] for s in roles.engine.generate(prompts, greedy)]
        trainer = HFEngine(roles.actor.strategy.unwrap(), tokenizer=tok)
        t_out = [s[0] for s in trainer.generate(prompts, greedy)]
        assert [c.token_ids for c in v_out] == [c.token_ids for c in t_out]
        exp = build_experience(prompts, [c.token_ids for c in v_out], [c.logprobs for c in v_out], set(), tok.pad_token_id)
        trainer_lp = roles.actor.logprobs(exp)
        assert float(((trainer_lp - exp.rollout_logprobs).abs() * exp.mask).max()) < 1e-4
        # the base model answers differently: the comparison above is not vacuous
        if lora_sync == "adapter":
            roles.engine.load_lora(None)
        else:
            roles.engine.update_weights(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict())
        base_out = [s[0] for s in roles.engine.generate(prompts, greedy)]
        assert [c.token_ids for c in base_out] != [c.token_ids for c in v_out]
    finally:
        roles.close()


def test_bfloat16_rollouts_beside_a_float32_trainer(tiny_model, tmp_path):
    """rollout.dtype=bfloat16 with a float32 trainer: the synced engine samples the updated policy up to bf16
    rounding (its log-probs are far closer to the trainer's than to the base's, and not bit-equal)."""
    pytest.importorskip("vllm")
    from alignloop.rollout import SamplingSettings
    from ppo.experience import build_experience

    loop, roles, tok = _lora_vllm_loop(tiny_model, tmp_path, "rollout.lora_sync=merged", "rollout.dtype=bfloat16",
                                       "algo.is_correction=true")
    try:
        recs = [loop.iteration(step) for step in range(2)]
        assert 1e-4 < recs[1]["rollout/logprob_diff"] < 0.1  # float32 engines agree to ~1e-6 (test above)
        prompts = loop.prompt_ids[:6]
        out = [s[0] for s in roles.engine.generate(prompts, SamplingSettings(max_new_tokens=10, temperature=1.0, seed=3))]
        exp = build_experience(prompts, [c.token_ids for c in out], [c.logprobs for c in out], set(), tok.pad_token_id)
        n = float(exp.mask.sum())
        to_trainer = float(((roles.actor.logprobs(exp) - exp.rollout_logprobs).abs() * exp.mask).sum()) / n
        to_base = float(((roles.actor.logprobs(exp, reference=True) - exp.rollout_logprobs).abs() * exp.mask).sum()) / n
        assert 1e-4 < to_trainer < 0.2 * to_base, (to_trainer, to_base)  # measured: 7e-4 vs 0.27
    finally:
        roles.close()


def test_ray_mode_zero3_groups_full_sync(tiny_model, tmp_path):
    """Actor and critic as 2-rank ZeRO-3 groups of Ray actors, vLLM in its own actor, full-weight sync. π_θold is the
    engine's (algo.old_logprobs=rollout, as in configs/ppo.yaml): the gap is measured on both ranks' shares of the
    first mini-batch, in the training forward."""
    pytest.importorskip("vllm")
    alignloop("ppo", *common(tiny_model, tmp_path), "run_name=ray", "rollout.engine=vllm", "peft.method=full",
              "optim.lr=1e-3", "train.max_steps=2", "rollout.prompts_per_step=8", "train.micro_batch_size=2",
              "algo.old_logprobs=rollout", "algo.num_mini_batches=2",
              "ray.use_ray=true", "ray.actor_workers=2", "ray.critic_workers=2", "ray.cpus_per_worker=0.25",
              "deepspeed.zero_stage=3", env={"RAY_AUTH_MODE": "disabled"})
    run = tmp_path / "ray"
    m = metrics(run)
    assert [x["step"] for x in m] == [1, 2]
    assert m[1]["rollout/logprob_diff"] < 1e-4  # step 2's rollout used the weights pushed after step 1
    assert 0 < m[1]["rollout/logprob_diff_max"] < 1e-3  # measured (float32 vLLM and torch differ in the last bits)
    assert m[1]["loss/value"] is not None and m[1]["ppo/explained_variance"] is not None
    w = load_file(run / "final/model.safetensors")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # the critic of the 2 ZeRO-3 ranks, exported by rank 0 (test_ppo_distributed checks its values)
    critic = AutoModelForSequenceClassification.from_pretrained(run / "final/critic", num_labels=1)
    assert critic.score.weight.shape[0] == 1 and (run / "final/critic/tokenizer.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert not torch.allclose(w["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
