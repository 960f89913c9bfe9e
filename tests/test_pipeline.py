"""The pipeline and the retraining loop end to end on tiny models: real CLI, real Ray, a real feedback service.

- ``alignloop pipeline`` through the CLI on a local Ray (each stage a Ray worker process), simulated
  labelers over HTTP against an embedded SQLite service; re-running skips every stage and says so;
  changing one stage's config re-runs that stage and what depends on it only.
- the retrain loop with a fake clock: triggers, watermarks, gate pass and gate fail, lock;
  kill-and-restart of a cycle (a real process killed mid-cycle) resumes it without a second cycle.
- ``ray job submit`` of the pipeline to a local head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def pipeline_config(tiny_model, tiny_data, out: Path, *, launcher="ray", engine="auto", **extra) -> dict:
    cfg = {
        "output_dir": str(out), "run_name": "pipe",
        "sft": {"config": "configs/sft.yaml",
                "overrides": {"model.path": str(tiny_model), "data.train": str(tiny_data), "data.eval": None,
                              "train.max_steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 4,
                              "data.max_length": 64, "train.save_every": 0}},
        "candidates": {"prompts": "ppo/data/prompts.jsonl", "limit": 6, "answers_per_prompt": 3, "max_new_tokens": 8,
                       "engine": engine},
        "feedback": {"campaign": "t", "overlap": 2, "source": "simulated", "simulated": {"count": 2}},
        "reward": {"config": "configs/reward.yaml",
                   "overrides": {"train.max_steps": 2, "data.max_length": 64, "data.eval_fraction": 0.2, "train.save_every": 0}},
        "policy": {"algo": "ppo", "config": "configs/ppo.yaml",
                   "overrides": {"reward.rules": [], "train.max_steps": 2, "rollout.prompts_per_step": 4,
                                 "rollout.max_new_tokens": 8, "algo.num_mini_batches": 1, "train.threads": 1,
                                 "rollout.engine": engine, "train.save_every": 0}},
        "evaluate": {"prompts": "sft/data/demo_eval.jsonl", "limit": 4, "max_new_tokens": 8, "engine": engine,
                     "property": "alignloop.labelers:concise_property"},
        "ray": {"launcher": launcher, "num_cpus": 2},
    }
    cfg.update(extra)
    return cfg


def alignloop(*args, env=None, check=True, timeout=900):
    e = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    r = subprocess.run([str(BIN / "alignloop"), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-5000:]}")
    return r


def artifacts(reg: Path) -> dict[str, list[str]]:
    return {k.name: sorted(p.name for p in k.iterdir() if (p / "artifact.json").is_file())
            for k in sorted(reg.iterdir()) if k.is_dir()}


def test_pipeline_cli_on_ray_then_skip_then_partial_rerun(tiny_model, tiny_data, tmp_path):
    cfg_file = tmp_path / "pipe.yaml"
    cfg = pipeline_config(tiny_model, tiny_data, tmp_path)
    cfg_file.write_text(yaml.safe_dump(cfg))
    r = alignloop("pipeline", "--config", str(cfg_file))
    out = r.stdout + r.stderr
    assert "simulated labelers ranked 12 items" in out, out[-3000:]  # 6 items x overlap 2
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    reg = tmp_path / "registry"
    arts = artifacts(reg)
    assert {k: len(v) for k, v in arts.items()} == {"candidates": 1, "eval": 1, "feedback": 1, "ppo": 1, "reward": 1, "sft": 1}
    for key in ("eval/win_rate", "eval/kl", "eval/length_tokens", "eval/property_rate", "eval/reward", "reward/eval_accuracy"):
        assert key in summary["eval"], (key, summary["eval"])
    assert summary["export"]["rows"] > 0
    # lineage: the policy's parents are the SFT model and the reward model, which came from the export
    ppo = json.loads((reg / "ppo" / arts["ppo"][0] / "artifact.json").read_text())
    assert set(ppo["parents"]) == {arts["sft"][0], arts["reward"][0]}
    rm = json.loads((reg / "reward" / arts["reward"][0] / "artifact.json").read_text())
    assert arts["feedback"][0] in rm["parents"] and rm["content_hash"]
    assert (tmp_path / "pipe" / "policy_training.png").stat().st_size > 1000
    assert "before (parent policy)" in r.stdout

    # unchanged: every stage skipped, nothing new in the registry
    r2 = alignloop("pipeline", "--config", str(cfg_file))
    for what in ("sft: inputs and config unchanged -> skipped", "candidates: unchanged -> skipped",
                 "export: no rankings since watermark", "reward: inputs and config unchanged -> skipped",
                 "policy (ppo): inputs and config unchanged -> skipped", "evaluate: unchanged -> skipped"):
        assert what in r2.stdout, (what, r2.stdout[-3000:])
    assert artifacts(reg) == arts

    # one stage changed: it and its descendants run again, the rest is reused
    cfg["policy"]["overrides"]["train.max_steps"] = 3
    cfg_file.write_text(yaml.safe_dump(cfg))
    r3 = alignloop("pipeline", "--config", str(cfg_file), "ray.launcher=process")
    assert "reward: inputs and config unchanged -> skipped" in r3.stdout
    after = artifacts(reg)
    assert after["sft"] == arts["sft"] and after["reward"] == arts["reward"]
    assert len(after["ppo"]) == 2 and len(after["eval"]) == 2


def test_pipeline_rejects_bad_stage_override_before_any_work(tiny_model, tiny_data, tmp_path):
    cfg = pipeline_config(tiny_model, tiny_data, tmp_path, launcher="process")
    cfg["reward"]["overrides"]["train.max_stpes"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = alignloop("pipeline", "--config", str(tmp_path / "bad.yaml"), check=False, timeout=120)
    assert r.returncode == 2
    assert "reward" in r.stderr and "train.max_stpes" in r.stderr
    assert not (tmp_path / "registry" / "sft").exists()  # nothing ran


# ----------------------------------------------------------------------------------------- retrain
class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def time(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture()
def service(tmp_path):
    from alignloop.feedback_link import EmbeddedService

    with EmbeddedService(tmp_path / "service") as svc:
        yield svc


def retrain_files(tiny_model, tiny_data, tmp_path, service, **schedule):
    tmp_path.mkdir(parents=True, exist_ok=True)
    pcfg = pipeline_config(tiny_model, tiny_data, tmp_path, launcher="process", engine="hf")
    pcfg["feedback"].update(url=service.url, source="take", campaign="loop")
    pcfg["gates"] = {"min_win_rate": 0.0}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pcfg))
    rcfg = {"pipeline": str(tmp_path / "pipe.yaml"), "state_dir": str(tmp_path / "loop"),
            "schedule": schedule or {"interval_s": 3600, "min_new_rankings": 10, "poll_s": 60},
            "failure": {"max_retries": 1, "retry_delay_s": 30}}
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(rcfg))
    return tmp_path / "retrain.yaml"


def rank_all(service, campaign="loop", count=2, seed=0) -> int:
    from alignloop.feedback_link import FeedbackClient, ensure_labelers
    from alignloop.labelers import LabelerSpec, concise, run_labelers

    with FeedbackClient(service.url, service.admin_token) as fc:
        cid = next(c["id"] for c in fc.list_campaigns() if c["name"] == campaign)
        names = [f"p{i}" for i in range(count)]
        tokens = ensure_labelers(fc, names, service.data_dir / "tokens.json")
    return sum(run_labelers(service.url, tokens, cid, concise, [LabelerSpec(n, seed=seed + i) for i, n in enumerate(names)]).values())


def test_retrain_loop_triggers_watermarks_and_gates(tiny_model, tiny_data, tmp_path, service, monkeypatch):
    from alignloop.config import load_config
    from alignloop.pipeline import GatesConfig
    from alignloop.retrain import LockHeld, RetrainConfig, RetrainLoop

    monkeypatch.setenv("ALIGNLOOP_FEEDBACK_TOKEN", service.admin_token)
    monkeypatch.chdir(ROOT)
    cfg = load_config(RetrainConfig, retrain_files(tiny_model, tiny_data, tmp_path, service))
    clock = FakeClock()
    loop = RetrainLoop(cfg, clock=clock)
    loop.lock()
    try:
        with pytest.raises(LockHeld):  # a second loop on the same state is refused
            RetrainLoop(cfg, clock=clock).lock()
        first = loop.production()  # SFT becomes the initial production policy; its candidates go to the service
        assert loop.pipe.registry.production()["artifact"] == first.id
        assert loop.tick() == "wait"  # no rankings yet, interval not elapsed
        assert rank_all(service) == 12
        assert loop.tick() == "cycle"  # 12 new rankings >= 10
        c1 = loop.record(1)
        assert c1["trigger"].startswith("12 new rankings") and c1["gates_pass"] and c1["promoted"]
        st = loop.state()
        assert st["watermark"] == c1["watermark"] > 0 and st["completed"] == 1
        prod = loop.pipe.registry.production()
        assert prod["artifact"] == c1["steps"]["policy"] and prod["previous"] == first.id
        assert loop.tick() == "wait"  # nothing new, interval not elapsed

        clock.sleep(3600)  # the interval fires, but there is no new feedback: recorded, production kept
        assert loop.tick() == "cycle"
        c2 = loop.record(2)
        assert c2["skipped"] == "no new feedback" and loop.pipe.registry.production()["artifact"] == prod["artifact"]

        assert rank_all(service, seed=10) >= 10  # the fresh candidates from the new production policy
        loop.pcfg = loop.pcfg.model_copy(update={"gates": GatesConfig(min_gold_agreement=0.5)})  # cannot pass: no gold
        assert loop.tick() == "cycle"
        c3 = loop.record(3)
        assert c3["promoted"] is False and "eval/gold_agreement" in c3["kept_because"][0]
        assert loop.pipe.registry.production()["artifact"] == prod["artifact"]  # kept
        assert loop.state()["watermark"] == c3["watermark"] > c1["watermark"]
        # the export of cycle 3 held only rankings after cycle 1's watermark
        ex3 = loop.pipe.registry.get(c3["steps"]["export"])
        assert ex3.extra["since"] == c1["watermark"]
        assert (tmp_path / "loop" / "history.png").stat().st_size > 1000
    finally:
        loop.pipe.close()
        loop.unlock()


def test_retrain_killed_mid_cycle_resumes_the_same_cycle(tiny_model, tiny_data, tmp_path, service, monkeypatch):
    from alignloop.config import load_config
    from alignloop.retrain import RetrainConfig, RetrainLoop

    cfg = retrain_files(tiny_model, tiny_data, tmp_path, service)
    env = {"ALIGNLOOP_FEEDBACK_TOKEN": service.admin_token}
    monkeypatch.setenv("ALIGNLOOP_FEEDBACK_TOKEN", service.admin_token)
    monkeypatch.chdir(ROOT)
    boot = RetrainLoop(load_config(RetrainConfig, cfg))
    boot.production()  # the initial production policy and its candidates, then people rank them
    boot.pipe.close()
    assert rank_all(service) == 12
    r1 = alignloop("retrain", "--config", str(cfg), "--once", env={**env, "ALIGNLOOP_RETRAIN_CRASH_AFTER": "policy"},
                   check=False)
    assert r1.returncode == 17, (r1.stdout[-2000:], r1.stderr[-3000:])  # killed right after the policy artifact
    state = json.loads((tmp_path / "loop" / "state.json").read_text())
    assert state["status"] == "running" and state["cycle"] == 1
    rec = json.loads((tmp_path / "loop" / "cycles" / "00001.json").read_text())
    assert {"export", "reward", "policy"} <= set(rec["steps"]) and "eval" not in rec["steps"]
    r2 = alignloop("retrain", "--config", str(cfg), "--once", env=env)
    assert "cycle 1 was interrupted: resuming it" in r2.stdout
    state = json.loads((tmp_path / "loop" / "state.json").read_text())
    assert state["status"] == "idle" and state["cycle"] == 1 and state["completed"] == 1
    rec2 = json.loads((tmp_path / "loop" / "cycles" / "00001.json").read_text())
    assert {k: rec2["steps"][k] for k in ("export", "reward", "policy")} == {k: rec["steps"][k] for k in ("export", "reward", "policy")}
    reg = tmp_path / "loop" / "registry"
    assert len(artifacts(reg)["ppo"]) == 1 and len(artifacts(reg)["feedback"]) == 1  # nothing trained or exported twice
    assert sorted(p.name for p in (tmp_path / "loop" / "cycles").glob("0*.json")) == ["00001.json"]
    st = alignloop("retrain", "--config", str(cfg), "--status", env=env)
    assert json.loads(st.stdout)["state"]["completed"] == 1


def test_ray_job_submit_of_the_pipeline(tiny_model, tiny_data, tmp_path, service):
    import tempfile

    cfg = pipeline_config(tiny_model, tiny_data, tmp_path, engine="hf")
    cfg["ray"] = {"launcher": "ray"}  # the job's cluster (RAY_ADDRESS is set by the job)
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    retrain_yaml = retrain_files(tiny_model, tiny_data, tmp_path / "loopcfg", service)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               ALIGNLOOP_FEEDBACK_TOKEN=service.admin_token)  # the cluster's nodes hold the service token (ray_cluster.yaml)
    ray = str(BIN / "ray")
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    from alignloop.feedback_link import free_port

    # Every port of this head its own: another Ray on the machine (a test's ray.init, a user's cluster) holds the
    # default agent ports, and a head whose job agent cannot bind answers "No available agent to submit job".
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    start = subprocess.run([ray, "start", "--head", "--port=6393", "--dashboard-port=8283", "--num-cpus=2", *ports,
                            "--include-dashboard=true", f"--temp-dir={short}", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        r = subprocess.run([ray, "job", "submit", "--address=http://127.0.0.1:8283", "--working-dir", str(ROOT), "--",
                            "alignloop", "pipeline", "--config", str(tmp_path / "pipe.yaml")],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
        assert "succeeded" in r.stdout.lower()
        assert json.loads((tmp_path / "pipe" / "summary.json").read_text())["artifacts"]["policy"].startswith("ppo-")
        # PPO alone as a job, its actor/critic/engine as Ray actors on the job's cluster
        r = subprocess.run([ray, "job", "submit", "--address=http://127.0.0.1:8283", "--working-dir", str(ROOT), "--",
                            "alignloop", "ppo", "--config", "configs/ppo.yaml", f"model.path={tiny_model}",
                            f"output_dir={tmp_path / 'ppojob'}", "ray.use_ray=true", "ray.cpus_per_worker=0.5",
                            "train.max_steps=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=8",
                            "algo.num_mini_batches=1", "rollout.engine=hf"],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
        assert (tmp_path / "ppojob" / "ppo" / "final" / "model.safetensors").exists()
        # one retrain cycle as a job: the first start makes SFT the production policy; no rankings yet -> a recorded no-op
        r = subprocess.run([str(BIN / "alignloop"), "retrain", "--config", str(retrain_yaml), "--submit", "http://127.0.0.1:8283"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
        state = json.loads((tmp_path / "loopcfg" / "loop" / "state.json").read_text())
        assert state["completed"] == 1 and state["production"].startswith("sft-")
    finally:  # stop this head only (``ray stop`` would stop every Ray on the machine): its processes and their children
        import psutil

        procs = []
        for p in psutil.process_iter(["cmdline"]):
            if any(short in part for part in (p.info["cmdline"] or [])):
                procs += [p, *p.children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass


def test_demo_command_on_tiny_models(tiny_model, tiny_data, tmp_path):
    """``alignloop demo`` is the pipeline plus a token for a person on the web page; here on a tiny config."""
    cfg = pipeline_config(tiny_model, tiny_data, tmp_path, launcher="process", engine="hf")
    cfg["run_name"] = "demo"
    gold = tmp_path / "gold.jsonl"  # gold items: pushed to the campaign, then the evaluation's gold agreement
    gold.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answers": [w, f"{w} {w} {w} and more"], "gold_best": 0}) + "\n"
                            for w in ("yes", "no")))
    cfg["feedback"]["gold"] = str(gold)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))
    r = alignloop("demo", "--config", str(tmp_path / "demo.yaml"), "--fresh")
    assert "labeler web page: http://127.0.0.1:" in r.stdout and "sign in with token" in r.stdout
    assert "answers with the preferred property" in r.stdout and "KL(after || before)" in r.stdout
    res = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert res["decision"]["gates_pass"] is True and res["export"]["rows"] > 0
    assert 0.0 <= res["eval"]["eval/gold_agreement"] <= 1.0
    (ev,) = (tmp_path / "registry" / "eval").glob("*/eval.json")
    assert json.loads(ev.read_text())["gold_items"] == 2
    assert (tmp_path / "demo" / "reward_calibration.png").exists()
    # the person's token works on the labeler API of the service the demo ran (its data stays on disk)
    tokens = json.loads((tmp_path / "demo" / "feedback" / "labeler_tokens.json").read_text())
    assert set(tokens) >= {"you", "sim-1", "sim-2"}
