"""Online DPO through the real CLI: vLLM samples from the current LoRA policy, a rule scorer orders them,
best vs worst pairs train the policy, and the new adapter is what vLLM samples from next round."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

RULE = '''
def digits(prompt, answer):
    """Share of the answer's characters that are digits."""
    return sum(ch.isdigit() for ch in answer) / max(len(answer), 1)
'''


def alignloop(*args, env=None, check=True):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([str(BIN / "alignloop"), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture()
def setup(tmp_path):
    (tmp_path / "dpo_rule_mod.py").write_text(RULE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}."}) + "\n" for i in range(8)))
    return prompts, {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}


def test_online_dpo_rounds_with_rule_scorer_through_vllm(tiny_model, tmp_path, setup):
    pytest.importorskip("vllm")
    prompts, env = setup
    r = alignloop("dpo", f"model.path={tiny_model}", f"output_dir={tmp_path}", "run_name=online",
                  "online.enabled=true", f"online.prompts={prompts}", "online.rounds=3", "online.prompts_per_round=8", "online.k=4",
                  "online.steps_per_round=4", "online.max_new_tokens=16", "online.engine=vllm",
                  "online.scorer.kind=rule", "online.scorer.function=dpo_rule_mod:digits",
                  "optim.lr=2e-2", "optim.scheduler=constant", "loss.beta=0.5",
                  "train.global_batch_size=8", "train.micro_batch_size=4", env=env)
    assert "engine=vllm" in r.stdout
    run = tmp_path / "online"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in rows if x.get("dpo/round") is not None]
    assert [x["dpo/round"] for x in rounds] == [1, 2, 3]
    assert all(x["dpo/pairs"] + x["dpo/tied_prompts"] == 8 for x in rounds)
    assert rounds[0]["dpo/pairs"] > 0
    assert all(x["dpo/score_best"] >= x["reward/mean"] >= x["dpo/score_worst"] for x in rounds)
    # each round trained: step 1 of round 1 starts at the reference (loss log 2), the round's last step is lower
    train = [x for x in rows if x.get("loss/dpo") is not None]
    assert train[0]["loss/dpo"] == pytest.approx(0.693147, abs=1e-4)
    assert rounds[0]["loss/dpo"] < train[0]["loss/dpo"]
    for n in (1, 2, 3):
        assert (run / f"rounds/round-{n}/adapter/adapter_config.json").exists()
    assert (run / "final/adapter/adapter_model.safetensors").exists() and (run / "final/model.safetensors").exists()
    # vLLM samples from exactly the trainer's policy: the base in round 1, the adapter saved after rounds 1 and 2
    # (a stale adapter would show gaps of the size the training moved the log-probs, >> 1e-3)
    assert all(x["rollout/logprob_diff"] < 1e-3 for x in rounds), [x["rollout/logprob_diff"] for x in rounds]
    # the policy moved towards the rule's preference
    assert rounds[-1]["reward/mean"] > rounds[0]["reward/mean"], [x["reward/mean"] for x in rounds]
    samples = [json.loads(x) for x in (run / "rounds/round-1/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(len(s["answers"]) == 4 == len(s["scores"]) for s in samples)


def test_online_dpo_killed_after_round_1_and_resumed_matches_uninterrupted(tiny_model, tmp_path, setup):
    """3 rounds (vLLM samples, the rule scores, 2 steps on a cosine schedule): a run killed after round 1 and
    resumed with resume=true samples, scores and trains rounds 2-3 as the uninterrupted run does (the round-1
    checkpoint holds the LoRA weights, optimizer, scheduler, RNG, round, prompt position and the adapter vLLM
    samples from next)."""
    pytest.importorskip("vllm")
    import torch
    from safetensors.torch import load_file

    prompts, env = setup
    args = [f"model.path={tiny_model}", f"output_dir={tmp_path}", f"online.prompts={prompts}", "online.rounds=3",
            "online.prompts_per_round=4", "online.k=4", "online.steps_per_round=2", "online.max_new_tokens=12",
            "online.engine=vllm", "online.scorer.kind=rule", "online.scorer.function=dpo_rule_mod:digits",
            "optim.lr=2e-2", "optim.scheduler=cosine", "loss.beta=0.5", "train.global_batch_size=4",
            "train.micro_batch_size=2"]
    alignloop("dpo", *args, "run_name=straight", env=env)
    r = alignloop("dpo", *args, "run_name=crashed", env={**env, "ALIGNLOOP_CRASH_AFTER_STEP": "2"}, check=False)
    assert r.returncode != 0 and "simulated crash after step 2 (round 1)" in r.stdout + r.stderr
    run = tmp_path / "crashed"
    assert (run / "checkpoints/step-2/DONE").exists() and (run / "rounds/round-1/adapter").is_dir()
    assert not (run / "rounds/round-2").exists() and not (run / "final").exists()
    r = alignloop("dpo", *args, "run_name=crashed", env=env, check=False)
    assert r.returncode == 2 and "resume=true" in r.stderr  # never clobbers a run silently
    r = alignloop("dpo", *args, "run_name=crashed", "resume=true", env=env)
    assert "resumed from" in r.stdout and "(round 1, step 2)" in r.stdout
    # the same final adapter
    a = load_file(tmp_path / "straight/final/adapter/adapter_model.safetensors")
    b = load_file(run / "final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # the same samples and scores every round (round 2 sampled by a fresh engine from the restored adapter)
    for n in (1, 2, 3):
        assert (run / f"rounds/round-{n}/samples.jsonl").read_text() == \
            (tmp_path / f"straight/rounds/round-{n}/samples.jsonl").read_text(), n
    # the same metrics, each step logged once
    rows_a = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows_b] == [x["step"] for x in rows_a] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for name in ("loss/dpo", "dpo/margin", "dpo/accuracy", "dpo/logp_chosen", "dpo/logp_rejected", "optim/lr",
                     "optim/grad_norm", "reward/mean", "dpo/pairs", "dpo/tied_prompts", "rollout/answer_length"):
            if name in ra:
                assert rb[name] == pytest.approx(ra[name], rel=1e-5, abs=1e-7), (ra["step"], name)
        if "rollout/logprob_diff" in ra:
            assert rb["rollout/logprob_diff"] == pytest.approx(ra["rollout/logprob_diff"], abs=1e-5)
    assert rows_a[-1]["optim/lr"] < rows_a[0]["optim/lr"]  # the schedule moved, and was restored
    assert [x["dpo/round"] for x in rows_a if "dpo/round" in x] == [1, 2, 3]
    assert all(x["dpo/pairs"] > 0 for x in rows_a if "dpo/round" in x)  # every round trained


def test_online_dpo_checks_scorer_and_prompts_before_loading(tiny_model, tmp_path, setup):
    prompts, env = setup
    base = [f"model.path={tiny_model}", f"output_dir={tmp_path}", f"online.prompts={prompts}", "online.scorer.kind=rule"]
    r = alignloop("dpo", *base, "online.scorer.function=dpo_rule_mod:nope", env=env, check=False)
    assert r.returncode == 2 and "dpo_rule_mod:nope" in r.stderr and "Traceback" not in r.stderr
    r = alignloop("dpo", *base[:3], "online.scorer.kind=reward_model", f"online.scorer.reward_model={tmp_path}",
                  env=env, check=False)
    assert r.returncode == 2 and "not a reward model directory" in r.stderr
    bad = tmp_path / "bad_prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    r = alignloop("dpo", *base[:2], f"online.prompts={bad}", "online.scorer.kind=rule",
                  "online.scorer.function=dpo_rule_mod:digits", env=env, check=False)
    assert r.returncode == 2 and f"{bad}:2: missing field 'prompt'" in r.stderr
    r = alignloop("dpo", *base, "online.scorer.function=dpo_rule_mod:digits", "peft.method=full", env=env, check=False)
    assert r.returncode == 2 and "online DPO needs peft.method=lora" in r.stderr
    assert not (tmp_path / "dpo").exists()


def test_online_dpo_with_the_reward_model_scorer(tiny_model, tmp_path, setup):
    """One round scored by the reward stage's RewardScorer (a tiny random scalar-head model), sampled with HF."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    prompts, env = setup
    rm = tmp_path / "rm"
    seq = LlamaForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(3)
    torch.nn.init.normal_(seq.score.weight, std=0.5)  # a random but non-zero head: scores differ between answers
    seq.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    seq.save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm)
    r = alignloop("dpo", f"model.path={tiny_model}", f"output_dir={tmp_path}", f"online.prompts={prompts}",
                  "online.rounds=1", "online.prompts_per_round=4", "online.k=2", "online.steps_per_round=1",
                  "online.max_new_tokens=8", "online.engine=hf", "online.scorer.kind=reward_model",
                  f"online.scorer.reward_model={rm}", "train.global_batch_size=4", "train.micro_batch_size=4", env=env)
    assert "scorer=reward_model" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()]
    (rnd,) = [x for x in rows if x.get("dpo/round") is not None]
    assert rnd["dpo/pairs"] == 4 and rnd["dpo/score_best"] > rnd["dpo/score_worst"]
    assert rnd["rollout/logprob_diff"] < 1e-3  # HF engine and trainer: the same base model in round 1
    samples = [json.loads(x) for x in (tmp_path / "dpo/rounds/round-1/samples.jsonl").read_text().splitlines()]
    from reward.scorer import RewardScorer

    again = RewardScorer(rm).score([samples[0]["prompt"][0]["content"]] * 2, samples[0]["answers"])
    assert again == pytest.approx(samples[0]["scores"], abs=1e-5)
