"""The reward stage through the real CLI on a tiny model: learning a synthetic preference, bad rows,
PEFT + listwise loss, training from a live feedback service's export, HTTP vs in-process scores,
and ZeRO-3 on 2 Ray workers against one process."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from reward.synthetic import marker_rows, write_rows

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
QUIET = {"OMP_NUM_THREADS": "2"}


def alignloop(*args, env=None, check=True, timeout=900):
    e = dict(os.environ)
    e.update(QUIET)
    e.update(env or {})
    r = subprocess.run([str(BIN / "alignloop"), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def common(model, out, **kw):
    args = {"model.path": model, "output_dir": out, "optim.lr": "1e-3", "optim.warmup_steps": 0,
            "train.global_batch_size": 8, "train.micro_batch_size": 4, "peft.method": "full", **kw}
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def marker_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_rows(marker_rows(64, seed=1), d / "train.jsonl"), write_rows(marker_rows(32, seed=2), d / "eval.jsonl")


@pytest.fixture(scope="module")
def trained(tiny_model, marker_files, tmp_path_factory):
    """One full fine-tuning run: 16 steps of 8 pairs, evaluated on 32 held-out pairs."""
    out = tmp_path_factory.mktemp("runs")
    train, held = marker_files
    r = alignloop("reward", *common(tiny_model, out, **{"data.train": train, "data.eval": held,
                                                         "train.max_steps": 16, "train.save_every": 8}))
    return out / "reward", r


def test_cli_learns_a_synthetic_preference(trained):
    run, r = trained
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "calibration.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "final/reward_stats.json",
                 "checkpoints/step-16/DONE"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    ev = json.loads((run / "eval.json").read_text())
    assert ev["examples"] == 32 and ev["source"] == "eval"
    assert ev["eval/accuracy"] >= 0.9, ev["eval/accuracy"]  # chance is 0.5
    assert ev["eval/reward_chosen_mean"] > ev["eval/reward_rejected_mean"]
    m = metrics(run)
    losses = [x["loss/reward"] for x in m if x.get("loss/reward") is not None]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
    assert any(x.get("eval/accuracy") is not None for x in m)
    assert '"eval_accuracy"' in r.stdout
    stats = json.loads((run / "final/reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["max_length"] == 512
    # final/ is a standard HF sequence-classification model (num_labels=1)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert hf.config.num_labels == 1 and hf.score.weight.shape[0] == 1


def test_malformed_pair_fails_with_file_and_line_before_training(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    r = alignloop("reward", *common(tiny_model, tmp_path, **{"data.train": bad}), check=False)
    assert r.returncode == 2
    assert f"{bad}:2: missing field 'rejected'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "reward").exists()  # nothing started
    r = alignloop("reward", *common(tiny_model, tmp_path, **{"data.train": bad, "loss.tpye": "x"}), check=False)
    assert r.returncode == 2 and "loss.tpye" in r.stderr
    r = alignloop("reward", *common(tiny_model, tmp_path, **{"data.train": bad, "peft.method": "prompt_tuning"}), check=False)
    assert r.returncode == 2 and "not supported for reward models" in r.stderr


def test_http_scorer_and_in_process_scorer_agree(trained):
    from reward.scorer import HTTPRewardScorer, RewardScorer

    run, _ = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = dict(os.environ)
    e.update(QUIET)
    proc = subprocess.Popen([str(BIN / "alignloop"), "reward-serve", "--model", str(run), "--port", str(port),
                             "--batch-size", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "reward-serve did not start"
            time.sleep(0.5)
        rows = marker_rows(10, seed=5)
        prompts = [r["prompt"] for r in rows] * 2
        answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        prompts[0] = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"}]
        local = RewardScorer(run, batch_size=8)
        remote = HTTPRewardScorer(url, chunk=7)
        assert remote.score(prompts, answers) == pytest.approx(local.score(prompts, answers), abs=1e-5)
        assert remote.score(prompts, answers, normalize=True) == pytest.approx(
            local.score(prompts, answers, normalize=True), abs=1e-5)
        # the learned preference shows in served scores too
        s = remote.score(prompts[1:10], answers[1:10]), remote.score(prompts[11:20], answers[11:20])
        assert sum(a > b for a, b in zip(*s)) >= 8
        # bad requests are 4xx with the reason, never 500
        bad_bodies = [{}, {"items": []}, {"items": [{"prompt": "x"}]}, {"items": [{"prompt": 3, "answer": "a"}]},
                      {"items": [{"prompt": "x", "answer": "a", "extra": 1}]},
                      {"items": [{"prompt": [{"role": "assistant", "content": "hi"}], "answer": "a"}]},
                      {"items": [{"prompt": "x", "answer": "a"}] * 257}, {"items": [{"prompt": "x" * 100_001, "answer": "a"}]}]
        for body in bad_bodies:
            r = httpx.post(url + "/score", json=body, timeout=30)
            assert r.status_code == 422, (body if len(str(body)) < 300 else "big", r.status_code, r.text[:300])
        assert httpx.post(url + "/score", content=b"not json", headers={"content-type": "application/json"},
                          timeout=30).status_code == 422
        assert httpx.get(url + "/info", timeout=30).json()["stats"]["std"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lora_with_plackett_luce_on_ranked_lists(tiny_model, tmp_path):
    train = write_rows(marker_rows(48, seed=3, ranked_k=3), tmp_path / "ranked.jsonl")
    alignloop("reward", *common(tiny_model, tmp_path, **{"data.train": train, "data.eval_fraction": 0.25,
                                                          "peft.method": "lora", "peft.lora_r": 8, "optim.lr": "3e-3",
                                                          "loss.type": "plackett_luce", "train.max_steps": 10}))
    run = tmp_path / "reward"
    assert (run / "final/adapter/adapter_model.safetensors").exists()
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(run / "final")  # adapter merged, head included
    assert merged.config.num_labels == 1
    ev = json.loads((run / "eval.json").read_text())
    assert ev["pairs"] == 12 * 3  # 12 held-out lists of 3 answers: 3 pairs each
    assert ev["eval/accuracy"] >= 0.75, ev["eval/accuracy"]
    # the merged final/ model (what PPO loads) ranks the held-out lists as the trained model did at eval time
    from alignloop.config import load_config
    from reward.config import RewardConfig
    from reward.evaluate import summarize
    from reward.scorer import RewardScorer
    from reward.trainer import split_preferences

    _, held = split_preferences(load_config(RewardConfig, run / "config.yaml"), run)
    scorer = RewardScorer(run)
    again = summarize([scorer.score_conversations(p.conversations) for p in held])
    assert again["eval/accuracy"] == pytest.approx(ev["eval/accuracy"], abs=1.5 / 36)
    assert again["eval/loss"] == pytest.approx(ev["eval/loss"], rel=1e-3)


# ---------------------------------------------------------------- live feedback service

class LiveService:
    """The real feedback service (SQLite) under uvicorn in a background thread, as tests/feedback_service do."""

    def __init__(self, tmp: Path, admin_token: str):
        import uvicorn

        from feedback_service.app import create_app
        from feedback_service.config import Settings

        self.app = create_app(Settings(db_url=f"sqlite:///{tmp / 'feedback.db'}", data_dir=tmp, admin_token=admin_token,
                                       log_requests=False))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "feedback service did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.engine.dispose()
        self.app.state.read_engine.dispose()


def test_training_from_a_live_feedback_service_export(tiny_model, tmp_path):
    from feedback_service.client import FeedbackClient

    admin_token = "alf_reward-test-admin-0123456789abcdef"
    svc = LiveService(tmp_path, admin_token)
    try:
        with FeedbackClient(svc.url, admin_token) as admin:
            camp = admin.create_campaign("marker-v1", guidelines="Prefer the polite answer.", overlap=1)
            rows = marker_rows(48, seed=7)
            # answers in both orders, so the better one is not always the first shown
            items = [{"prompt": r["prompt"], "answers": [{"text": a, "model_id": "sft-tiny"} for a in
                                                          ((r["chosen"], r["rejected"]) if i % 2 else (r["rejected"], r["chosen"]))]}
                     for i, r in enumerate(rows)]
            assert admin.add_items(camp["id"], items)["created"] == 48
            labeler = admin.create_labeler("ann")
            with FeedbackClient(svc.url, labeler["token"]) as ann:
                while (a := ann.next_item(camp["id"])) is not None:
                    ans = a["item"]["answers"]
                    best = [x["id"] for x in ans if "please" in x["text"].split()]
                    ann.submit_ranking(a["item"]["id"], best + [x["id"] for x in ans if x["id"] not in best])
        env = {"ALIGNLOOP_FEEDBACK_TOKEN": admin_token}
        fb = {"data.feedback.url": svc.url, "data.feedback.campaign": "marker-v1", "data.eval_fraction": 0.25,
              "train.max_steps": 12}
        r = alignloop("reward", *common(tiny_model, tmp_path, **fb), env=env)
        run = tmp_path / "reward"
        rec = json.loads((run / "feedback_export.json").read_text())
        assert rec["rows"] == 48 and rec["version"] >= 1 and rec["watermark"] >= 48 and rec["campaign"] == "marker-v1"
        assert f"feedback export version {rec['version']}" in r.stdout
        assert len((run / "feedback_export.jsonl").read_text().splitlines()) == 48
        assert admin_token not in (run / "config.yaml").read_text()  # the token never reaches the run directory
        ev = json.loads((run / "eval.json").read_text())
        assert ev["examples"] == 12 and ev["eval/accuracy"] >= 0.9, ev["eval/accuracy"]
        # incremental: nothing new since that export -> a clear error, exit 2, before any model loads
        r = alignloop("reward", *common(tiny_model, tmp_path, **fb, **{"data.feedback.since_last": "true",
                                                                        "run_name": "again"}), env=env, check=False)
        assert r.returncode == 2 and "has no preference pairs" in r.stderr, r.stderr[-2000:]
        r = alignloop("reward", *common(tiny_model, tmp_path, **fb, run_name="nokey"), env={"ALIGNLOOP_FEEDBACK_TOKEN": "wrong"},
                      check=False)
        assert r.returncode == 2 and "HTTP 401" in r.stderr, r.stderr[-2000:]
    finally:
        svc.stop()


def test_zero3_on_two_ray_workers_matches_one_process(tiny_model, marker_files, tmp_path):
    train, held = marker_files
    # group_by_length off: 1 process would group its 8 pairs into other micro-batches than 2 ranks of 4 form, and
    # the same summed gradient in another float order moves a few weights by ~1e-5 through Adam's normalisation
    args = common(tiny_model, tmp_path, **{"data.train": train, "data.eval": held, "data.eval_limit": 8,
                                           "train.max_steps": 3, "data.group_by_length": "false"})
    alignloop("reward", *args, "run_name=one", "train.strategy=single")
    alignloop("reward", *args, "run_name=two", "train.strategy=deepspeed", "deepspeed.zero_stage=3", "ray.num_workers=2")
    l1 = [x["loss/reward"] for x in metrics(tmp_path / "one") if x.get("loss/reward") is not None]
    l2 = [x["loss/reward"] for x in metrics(tmp_path / "two") if x.get("loss/reward") is not None]
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=2e-4)
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    assert w1.keys() == w2.keys() and "score.weight" in w1
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)


def test_ray_actor_scores_like_the_plain_class(trained):
    import ray

    from reward.scorer import RewardScorer, reward_scorer_actor

    run, _ = trained
    rows = marker_rows(6, seed=9)
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        actor = reward_scorer_actor(run, normalize=True, batch_size=4)
        remote = ray.get(actor.score.remote(prompts, answers))
        assert ray.get(actor.stats.remote())["std"] > 0
    finally:
        ray.shutdown()
    assert remote == pytest.approx(RewardScorer(run, normalize=True, batch_size=4).score(prompts, answers), abs=1e-5)


def test_resume_after_crash_matches_uninterrupted(tiny_model, marker_files, tmp_path):
    from safetensors.torch import load_file

    train, held = marker_files
    args = common(tiny_model, tmp_path, **{"data.train": train, "data.eval": held, "data.eval_limit": 4,
                                           "train.max_steps": 4, "train.save_every": 2})
    alignloop("reward", *args, "run_name=straight")
    r = alignloop("reward", *args, "run_name=crashed", env={"ALIGNLOOP_CRASH_AFTER_STEP": "2"}, check=False)
    assert r.returncode != 0 and (tmp_path / "crashed/checkpoints/step-2/DONE").exists()
    r = alignloop("reward", *args, "run_name=crashed", check=False)
    assert r.returncode == 2 and "resume=true" in r.stderr  # never clobbers a run silently
    assert "resumed from" in alignloop("reward", *args, "run_name=crashed", "resume=true").stdout
    a, b = load_file(tmp_path / "straight/final/model.safetensors"), load_file(tmp_path / "crashed/final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = {x["step"]: x["loss/reward"] for x in metrics(tmp_path / "straight") if x.get("loss/reward") is not None}
    lb = {x["step"]: x["loss/reward"] for x in metrics(tmp_path / "crashed") if x.get("loss/reward") is not None}
    assert la[3] == pytest.approx(lb[3], rel=1e-5) and la[4] == pytest.approx(lb[4], rel=1e-5)
