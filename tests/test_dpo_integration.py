"""Offline DPO through the real CLI on a tiny model: margin rises, bad rows fail first, precomputed reference,
resume equality, ZeRO-3 on 2 Ray workers equals 1 process."""

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


def alignloop(*args, env=None, check=True):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([str(BIN / "alignloop"), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Synthetic pairs: the chosen answer is correct and ends with 'Done.', the rejected one is a refusal.
    Mixed forms: prompt strings, chat messages, and HH-RLHF full dialogues."""
    rows = []
    for i in range(16):
        a, b = i % 7, (i * 3) % 5
        good, bad = f"The answer is {a + b}. Done.", f"I do not know, {a} is hard."
        if i % 4 == 1:
            rows.append({"prompt": [{"role": "user", "content": f"Add {a} and {b}."}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        elif i % 4 == 2:
            rows.append({"chosen": f"\n\nHuman: Add {a} and {b}.\n\nAssistant: {good}",
                         "rejected": f"\n\nHuman: Add {a} and {b}.\n\nAssistant: {bad}"})
        else:
            rows.append({"prompt": f"Add {a} and {b}.", "chosen": good, "rejected": bad})
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def common(tiny_model, pairs, out):
    return [f"model.path={tiny_model}", f"data.train={pairs}", f"output_dir={out}", "optim.lr=5e-3", "loss.beta=0.5",
            "train.global_batch_size=8", "train.micro_batch_size=4", "optim.scheduler=constant"]


@torch.no_grad()
def logp_margin(model_dir, tiny_model, pairs):
    """Mean over pairs of log pi(chosen) - log pi(rejected), computed here independently of the trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reward.data import read_preferences

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = 0.0
    prefs = read_preferences(pairs)
    for p in prefs:
        lp = []
        for conv in p.conversations:
            prompt = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(conv, tokenize=False)
            pi = tok(prompt, add_special_tokens=False)["input_ids"]
            ai = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pi + ai])
            logits = model(ids).logits[0, len(pi) - 1:-1].log_softmax(-1)
            lp.append(float(logits.gather(1, torch.tensor(ai)[:, None]).sum()))
        total += lp[0] - lp[1]
    return total / len(prefs)


@pytest.fixture(scope="module")
def live(tiny_model, pairs, tmp_path_factory):
    """One LoRA run, reference = the base with the adapter disabled, checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("live")
    held_out = out / "eval.jsonl"  # same task, numbers the training pairs never use
    held_out.write_text("".join(json.dumps({"prompt": f"Add {a} and 9.", "chosen": f"The answer is {a + 9}. Done.",
                                            "rejected": f"I do not know, {a} is hard."}) + "\n" for a in (10, 11, 12)))
    r = alignloop("dpo", *common(tiny_model, pairs, out), "train.max_steps=6", "train.save_every=3", "run_name=live",
                  f"data.eval={held_out}", "train.eval_every=3")
    return out / "live", r


def test_cli_lora_dpo_raises_chosen_over_rejected_margin(tiny_model, pairs, live):
    run, r = live
    for name in ("config.yaml", "metrics.jsonl", "final/adapter/adapter_config.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "checkpoints/step-6/DONE"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir()), "TensorBoard events"
    assert "reference=adapter disabled" in r.stdout
    assert not (run / "reference_logps.pt").exists()
    m = [x for x in metrics(run) if x.get("loss/dpo") is not None]
    assert len(m) == 6
    # step 1: the adapter starts at zero, so the policy is the reference: loss = log 2, margin = 0
    assert m[0]["loss/dpo"] == pytest.approx(0.693147, abs=1e-4) and abs(m[0]["dpo/margin"]) < 1e-4
    assert m[-1]["loss/dpo"] < 0.3 and m[-1]["dpo/margin"] > 1.0 and m[-1]["dpo/accuracy"] == 1.0
    # held-out pairs: evaluated at step 3 and at the end, the margin generalises
    ev = [x for x in metrics(run) if x.get("eval/dpo_margin") is not None]
    assert [x["step"] for x in ev] == [3, 6]
    final = json.loads((run / "eval.json").read_text())
    assert final["pairs"] == 3 and final["eval/dpo_margin"] > 0.5 and final["eval/dpo_accuracy"] == 1.0
    # the merged model prefers the chosen answers more than the base does (measured here, not by the trainer)
    before, after = logp_margin(tiny_model, tiny_model, pairs), logp_margin(run / "final", tiny_model, pairs)
    assert after > before + 2.0, (before, after)


def test_cli_rejects_malformed_pair_before_training(tiny_model, pairs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    r = alignloop("dpo", f"model.path={tiny_model}", f"data.train={bad}", f"output_dir={tmp_path}", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{bad}:2: missing field 'rejected'" in r.stderr
    assert "Traceback" not in r.stderr and "Loading weights" not in r.stderr + r.stdout
    assert not (tmp_path / "dpo").exists()
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    r = alignloop("dpo", f"model.path={tiny_model}", f"data.train={same}", f"output_dir={tmp_path}", check=False)
    assert r.returncode == 2 and f"{same}:1:" in r.stderr and "identical" in r.stderr
    r = alignloop("dpo", f"model.path={tiny_model}", f"data.train={pairs}", "loss.type=kto", check=False)
    assert r.returncode == 2 and "loss.type" in r.stderr
    r = alignloop("dpo", f"model.path={tiny_model}", f"data.train={pairs}", "peft.method=full",
                  "reference.precompute=false", check=False)
    assert r.returncode == 2 and "reference.precompute=true" in r.stderr


def test_precomputed_reference_matches_adapter_disabled_and_resume_matches(tiny_model, pairs, live, tmp_path):
    """Precomputed reference (cached in the run dir) gives the same run as the adapter-disabled reference;
    a run killed after step 3 and resumed ends with the same adapter and metrics as the uninterrupted one."""
    args = [*common(tiny_model, pairs, tmp_path), "train.max_steps=6", "train.save_every=3", "run_name=pre",
            "reference.precompute=true"]
    r = alignloop("dpo", *args, env={"ALIGNLOOP_CRASH_AFTER_STEP": "3"}, check=False)
    assert r.returncode != 0 and (tmp_path / "pre/checkpoints/step-3/DONE").exists()
    assert (tmp_path / "pre/reference_logps.pt").exists() and "precomputed in" in r.stdout
    assert not (tmp_path / "pre/final").exists()
    r = alignloop("dpo", *args, check=False)
    assert r.returncode == 2 and "resume=true" in r.stderr  # never clobbers a run silently
    r = alignloop("dpo", *args, "resume=true")
    assert "resumed from" in r.stdout and "precomputed in" not in r.stdout  # the cache was reused
    a = load_file(live[0] / "final/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "pre/final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # The two references agree to float rounding (scored in differently packed batches); Adam turns that into
        # visible differences only on parameters whose gradient is ~0, hence the absolute tolerance.
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-4)
    la = {x["step"]: x["loss/dpo"] for x in metrics(live[0]) if "loss/dpo" in x}
    lb = {x["step"]: x["loss/dpo"] for x in metrics(tmp_path / "pre") if "loss/dpo" in x}
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-3, abs=1e-5), s


def test_zero3_on_two_ray_workers_matches_one_process(tiny_model, pairs, tmp_path):
    """Same global batch of 8 pairs: 1 process (4 x 2 micro-batches) vs ZeRO-3 on 2 Ray Train workers (4 each),
    full fine-tuning with the reference precomputed (a strided pass over both ranks)."""
    args = [*common(tiny_model, pairs, tmp_path), "train.max_steps=3", "peft.method=full", "optim.lr=1e-3"]
    alignloop("dpo", *args, "run_name=one", "train.strategy=single")
    alignloop("dpo", *args, "run_name=two", "train.strategy=deepspeed", "deepspeed.zero_stage=3", "ray.num_workers=2")
    r1 = torch.load(tmp_path / "one/reference_logps.pt")["logps"]
    r2 = torch.load(tmp_path / "two/reference_logps.pt")["logps"]
    assert not torch.isnan(r2).any()
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-4)
    m1 = [x for x in metrics(tmp_path / "one") if "loss/dpo" in x]
    m2 = [x for x in metrics(tmp_path / "two") if "loss/dpo" in x]
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for k in ("loss/dpo", "dpo/margin", "dpo/logp_chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
    assert m1[-1]["dpo/margin"] > m1[0]["dpo/margin"]
    w1 = load_file(tmp_path / "one/final/model.safetensors")
    w2 = load_file(tmp_path / "two/final/model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)
