"""Durability: labelers post rankings while the server process is SIGKILLed and restarted.
Every acknowledged ranking must be in the next export, none twice. Also checks the structured
request log of the real `python -m feedback_service` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fs_helpers import ADMIN_TOKEN, free_port, item

from feedback_service.client import FeedbackClient

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, db_url: str, data_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.db_url, self.data_dir, self.log_path, self.extra_args = db_url, data_dir, log_path, extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "ALIGNLOOP_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "feedback_service", "--db", self.db_url, "--data-dir", str(self.data_dir), "--port", str(self.port), *self.extra_args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()  # no server left behind by a failed start
        raise AssertionError("server did not come up in 60 s: " + self.log_path.read_text()[-2000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def server(db_url, tmp_path):
    s = ServerProcess(db_url, tmp_path, tmp_path / "server.log")
    s.start()
    yield s
    s.stop()


def test_acknowledged_rankings_survive_sigkill(server, tmp_path) -> None:
    admin = FeedbackClient(server.url, ADMIN_TOKEN, retries=0)
    c = admin.create_campaign("durable", overlap=2)
    admin.add_items(c["id"], [item(f"p{k}") for k in range(150)])
    labelers = [FeedbackClient(server.url, admin.create_labeler(f"lab{k}")["token"], retries=0, timeout=10) for k in range(4)]
    ids = {k: cl.me()["labeler"]["id"] for k, cl in enumerate(labelers)}
    acked: list[tuple[int, int, list[list[int]]]] = []  # (item, labeler, ranking) with a 2xx in hand
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def labeler_loop(k: int) -> None:
        cl = labelers[k]
        pending: tuple[int, list[int]] | None = None
        while not stop.is_set():
            try:
                if pending is None:
                    a = cl.next_item(c["id"])
                    if a is None:
                        return
                    answer_ids = [x["id"] for x in a["item"]["answers"]]
                    pending = (a["item"]["id"], answer_ids[k % 3 :] + answer_ids[: k % 3])
                r = cl.submit_ranking(*pending)  # after a lost answer this is a retry: idempotent
                with lock:
                    acked.append((r["item_id"], r["labeler_id"], r["ranking"]))
                pending = None
            except httpx.TransportError:
                time.sleep(0.05)  # server down: retry the same submission once it is back
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
                return

    threads = [threading.Thread(target=labeler_loop, args=(k,), daemon=True) for k in range(len(labelers))]
    for t in threads:
        t.start()

    def wait_for(n: int) -> None:  # returns as soon as n rankings are acknowledged
        deadline = time.monotonic() + 120
        while len(acked) < n and time.monotonic() < deadline and not failures:
            time.sleep(0.01)

    acked_at_kill = []
    for round_ in range(2):
        wait_for(30 * (round_ + 1))
        acked_at_kill.append(len(acked))
        server.kill()
        time.sleep(0.2)
        server.start()
    wait_for(90)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert len(acked) >= 90 and acked_at_kill[0] < acked_at_kill[1] < len(acked)  # work went on after every restart

    export = admin.export(c["id"], aggregation="none")
    rows_per_ranking = Counter((r["item_id"], r["labeler_ids"][0]) for r in export.rows)
    seen_pairs = Counter((r["item_id"], r["labeler_ids"][0], r["chosen"], r["rejected"]) for r in export.rows)
    assert max(seen_pairs.values()) == 1  # nothing twice
    for item_id, labeler_id, _ in acked:
        assert rows_per_ranking[(item_id, labeler_id)] == 3, (item_id, labeler_id)  # 3 answers strictly ordered
    assert len({(i, lab) for i, lab, _ in acked}) == len(acked)  # no ranking acknowledged twice as new
    stored = admin.list_rankings(campaign_id=c["id"], limit=1000)
    assert len(export.rows) == 3 * len(stored)
    assert set(ids.values()) >= {lab for _, lab, _ in acked}
    per_item = Counter(r["item_id"] for r in stored)
    assert max(per_item.values()) <= 2  # overlap held across restarts

    # structured logs: one JSON object per request line from the real server process
    lines = [json.loads(x) for x in (tmp_path / "server.log").read_text().splitlines() if x.startswith("{")]
    requests = [x for x in lines if x.get("msg") == "request"]
    assert requests and {"request_id", "method", "path", "status", "duration_ms", "ts", "level"} <= set(requests[-1])
    assert any(x["route"] == "/api/v1/items/{item_id}/rankings" and x["status"] in (200, 201) and x["labeler_id"] for x in requests)
    for cl in [admin, *labelers]:
        cl.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL: same row locks as threads
def test_two_worker_processes_share_one_database(db_url, tmp_path) -> None:
    """`--workers 2`: migrations and the admin bootstrap run once; both processes serve, and the
    overlap still holds across processes (the writers' lock file and SQLite's lock, not the
    in-process group commit)."""
    server = ServerProcess(db_url, tmp_path, tmp_path / "workers.log", ("--workers", "2"))
    server.start()  # returns once one worker answers; wait for the second to come up too
    log_path = tmp_path / "workers.log"
    deadline = time.monotonic() + 90
    while log_path.read_text().count("Started server process") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log_path.read_text().count("Started server process") == 2, log_path.read_text()[-2000:]
    try:
        with FeedbackClient(server.url, ADMIN_TOKEN) as admin:
            c = admin.create_campaign("w", overlap=2)
            admin.add_items(c["id"], [item(f"p{k}") for k in range(5)])
            clients = [FeedbackClient(server.url, admin.create_labeler(f"w{k}")["token"]) for k in range(6)]
            got: list[int] = []
            lock = threading.Lock()

            def work(cl: FeedbackClient) -> None:
                while (a := cl.next_item(c["id"])) is not None:
                    cl.submit_ranking(a["item"]["id"], [x["id"] for x in a["item"]["answers"]])
                    with lock:
                        got.append(a["item"]["id"])

            threads = [threading.Thread(target=work, args=(cl,)) for cl in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert sorted(Counter(got).values()) == [2] * 5
            assert admin.stats(c["id"])["rankings"] == 10
            for cl in clients:
                cl.close()
        log = log_path.read_text()
        assert log.count("Started server process") == 2, log[-2000:]  # no worker died and was replaced
    finally:
        server.stop()
