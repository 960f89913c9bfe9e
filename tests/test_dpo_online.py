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
