"""DPO on a live feedback service (SQLite, real HTTP): labelers rank, `alignloop dpo data.feedback=...` trains on the
export; online DPO's human path pushes sampled answers to a campaign for ranking."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ADMIN = "alf_dpo-test-admin-token-0123456789abcdef"


def alignloop(*args, env=None, check=True):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([str(BIN / "alignloop"), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture()
def service(tmp_path):
    """The feedback service app under uvicorn on a free loopback port, in a thread."""
    import uvicorn

    from feedback_service.app import create_app
    from feedback_service.config import Settings

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'feedback.db'}", data_dir=tmp_path, admin_token=ADMIN,
                              log_requests=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def test_offline_dpo_trains_on_a_live_feedback_export(service, tiny_model, tmp_path):
    from feedback_service.client import FeedbackClient

    with FeedbackClient(service, ADMIN) as admin:
        camp = admin.create_campaign("dpo-campaign")
        items = [{"prompt": f"Add {i} and {i + 1}.", "answers": [
            {"text": f"The answer is {2 * i + 1}. Done.", "model_id": "tiny"},
            {"text": f"I do not know, {i} is hard.", "model_id": "tiny"}]} for i in range(8)]
        admin.add_items(camp["id"], items)
        labeler = admin.create_labeler("ann")
    ranked = 0
    with FeedbackClient(service, labeler["token"]) as lab:
        while (a := lab.next_item(camp["id"])) is not None:
            good = next(x["id"] for x in a["item"]["answers"] if "Done." in x["text"])
            bad = next(x["id"] for x in a["item"]["answers"] if "Done." not in x["text"])
            lab.submit_ranking(a["item"]["id"], [good, bad])
            ranked += 1
    assert ranked == 8
    r = alignloop("dpo", f"model.path={tiny_model}", f"output_dir={tmp_path}", "train.max_steps=3", "optim.lr=5e-3",
                  "loss.beta=0.5", "train.global_batch_size=8", "train.micro_batch_size=4",
                  f"data.feedback={{url: {service}, campaign: dpo-campaign}}",
                  env={"ALIGNLOOP_FEEDBACK_TOKEN": ADMIN})
    run = tmp_path / "dpo"
    assert "8 pairs" in r.stdout
    meta = json.loads((run / "feedback_export.json").read_text())
    assert meta["rows"] == 8 and meta["campaign"] == "dpo-campaign"
    rows = [json.loads(x) for x in (run / "feedback_export.jsonl").read_text().splitlines()]
    assert all(x["chosen"].endswith("Done.") for x in rows)
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss/dpo" in x]
    assert m[-1]["dpo/margin"] > m[0]["dpo/margin"] and (run / "final/adapter/adapter_config.json").exists()
    # a wrong token fails before training, naming the service
    r = alignloop("dpo", f"model.path={tiny_model}", f"output_dir={tmp_path}", "run_name=badtoken",
                  f"data.feedback={{url: {service}, campaign: dpo-campaign}}",
                  env={"ALIGNLOOP_FEEDBACK_TOKEN": "alf_wrong"}, check=False)
    assert r.returncode == 2 and "data.feedback" in r.stderr and "Traceback" not in r.stderr


def test_online_human_path_pushes_samples_to_the_campaign(service, tiny_model, tmp_path):
    from feedback_service.client import FeedbackClient

    with FeedbackClient(service, ADMIN) as admin:
        camp = admin.create_campaign("dpo-online")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}."}) + "\n" for i in range(4)))
    r = alignloop("dpo", f"model.path={tiny_model}", f"output_dir={tmp_path}", f"online.prompts={prompts}",
                  "online.prompts_per_round=4", "online.k=3", "online.max_new_tokens=8", "online.engine=hf",
                  "online.scorer.kind=feedback", f"online.scorer.feedback={{url: {service}, campaign: dpo-online}}",
                  env={"ALIGNLOOP_FEEDBACK_TOKEN": ADMIN})
    assert "for ranking" in r.stdout
    rec = json.loads((tmp_path / "dpo/feedback_items.json").read_text())
    assert rec["prompts"] == 4 and rec["items"] == rec["created"] >= 1  # prompts with < 2 pushable answers are skipped
    with FeedbackClient(service, ADMIN) as admin:
        a = admin.next_item(camp["id"])
        assert a is not None and len(a["item"]["answers"]) >= 2
        assert a["item"]["answers"][0]["model_id"] == str(tiny_model)
