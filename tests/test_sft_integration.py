"""SFT through the real CLI: single process, resume, ZeRO-3 on 2 Ray workers, and a Ray job."""

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


def common(tiny_model, tiny_data, out):
    return [f"model.path={tiny_model}", f"data.train={tiny_data}", f"output_dir={out}", "optim.lr=5e-3",
            "train.global_batch_size=8", "train.micro_batch_size=4"]


def test_cli_lora_run_writes_run_directory(tiny_model, tiny_data, tmp_path):
    r = alignloop("sft", *common(tiny_model, tiny_data, tmp_path), "train.max_steps=8", "data.eval_fraction=0.25",
                  "train.eval_every=4")
    run = tmp_path / "sft"
    for name in ("config.yaml", "metrics.jsonl", "final/adapter/adapter_config.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir()), "TensorBoard events"
    assert (run / "checkpoints" / "step-8" / "DONE").exists()
    m = metrics(run)
    losses = [x["loss/sft"] for x in m if x.get("loss/sft") is not None]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert any("eval/loss" in x for x in m)
    assert "step 8 loss/sft=" in r.stdout
    # the merged model loads in transformers and differs from the base
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged.state_dict()[w], base.state_dict()[w])


def test_cli_rejects_bad_data_before_training(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    r = alignloop("sft", f"model.path={tiny_model}", f"data.train={bad}", f"output_dir={tmp_path}", check=False)
    assert r.returncode == 2
    assert f"{bad}:2: missing field 'output'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "sft").exists()
    r = alignloop("sft", "model.path=/no/such/model", f"data.train={bad}", check=False)
    assert r.returncode == 2 and "error" in r.stderr
    r = alignloop("sft", f"data.train={bad}", "optim.lrr=1", check=False)
    assert r.returncode == 2 and "optim.lrr" in r.stderr


def test_resume_after_crash_matches_uninterrupted(tiny_model, tiny_data, tmp_path):
    args = [*common(tiny_model, tiny_data, tmp_path), "train.max_steps=6", "train.save_every=3", "peft.method=lora"]
    alignloop("sft", *args, "run_name=straight")
    r = alignloop("sft", *args, "run_name=crashed", env={"ALIGNLOOP_CRASH_AFTER_STEP": "3"}, check=False)
    assert r.returncode != 0 and (tmp_path / "crashed/checkpoints/step-3/DONE").exists()
    assert not (tmp_path / "crashed/final").exists()
    r = alignloop("sft", *args, "run_name=crashed", check=False)
    assert r.returncode == 2 and "resume=true" in r.stderr  # never clobbers a run silently
    r = alignloop("sft", *args, "run_name=crashed", "resume=true")
    assert "resumed from" in r.stdout
    a = load_file(tmp_path / "straight/final/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "crashed/final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = {x["step"]: x["loss/sft"] for x in metrics(tmp_path / "straight") if "loss/sft" in x}
    lb = {x["step"]: x["loss/sft"] for x in metrics(tmp_path / "crashed") if "loss/sft" in x}
    for s in (4, 5, 6):
        assert la[s] == pytest.approx(lb[s], rel=1e-5)


@pytest.mark.parametrize("sharded", [["train.strategy=deepspeed", "deepspeed.zero_stage=3"], ["train.strategy=fsdp"]],
                         ids=["zero3", "fsdp"])
def test_two_ray_workers_match_one_process(tiny_model, tiny_data, tmp_path, sharded):
    """Same global batch: 1 process (4x2 micro-batches) vs ZeRO-3 / FSDP on 2 Ray Train workers (4 each)."""
    args = [*common(tiny_model, tiny_data, tmp_path), "train.max_steps=3", "peft.method=full", "optim.lr=1e-3"]
    alignloop("sft", *args, "run_name=one", "train.strategy=single")
    alignloop("sft", *args, "run_name=two", *sharded, "ray.num_workers=2")
    l1 = [x["loss/sft"] for x in metrics(tmp_path / "one") if "loss/sft" in x]
    l2 = [x["loss/sft"] for x in metrics(tmp_path / "two") if "loss/sft" in x]
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=2e-4)
    w1 = load_file(tmp_path / "one/final/model.safetensors")
    w2 = load_file(tmp_path / "two/final/model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)


def test_ray_job_submit_to_local_head(tiny_model, tiny_data, tmp_path):
    env = dict(os.environ)
    env.update({"PATH": f"{BIN}:{env['PATH']}", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    ray = str(BIN / "ray")
    port, dash = "6391", "8281"
    import tempfile

    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay under 107 bytes
    from alignloop.feedback_link import free_port

    # Free agent ports: another Ray on the machine holding the defaults makes the head refuse jobs ("No available agent").
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    start = subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2", *ports,
                            "--include-dashboard=true", f"--temp-dir={short}", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        out = tmp_path / "jobout"
        r = subprocess.run([ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
                            "alignloop", "sft", *common(tiny_model, tiny_data, out), "train.max_steps=2", "ray.use_ray=true"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
        assert "succeeded" in r.stdout.lower()
        assert (out / "sft/final/model.safetensors").exists()
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
