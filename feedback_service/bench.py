"""Load benchmark (not a test): concurrent labeler clients lease items and post rankings against a
real server process over loopback for a fixed time; reports acknowledged (durable) rankings per
second and the p50 / p99 latency of the ranking POST and of the whole next+submit cycle.

    python -m feedback_service.bench                      # SQLite in a temporary directory
    python -m feedback_service.bench --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    python -m feedback_service.bench --clients 32 --seconds 20 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ADMIN = "alf_bench-admin-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _labeler(url: str, token: str, campaign: int, until: float, submit_lat: list[float], cycle_lat: list[float]) -> int:
    done = 0
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            r = await http.post(f"/api/v1/campaigns/{campaign}/next")
            if r.status_code == 204:
                break
            a = r.json()
            ids = [x["id"] for x in a["item"]["answers"]]
            t1 = time.perf_counter()
            r = await http.post(f"/api/v1/items/{a['item']['id']}/rankings", json={"ranking": ids[::-1]})
            t2 = time.perf_counter()
            if r.status_code in (200, 201):
                done += 1
                submit_lat.append(t2 - t1)
                cycle_lat.append(t2 - t0)
    return done


async def _run(url: str, tokens: list[str], campaign: int, seconds: float) -> dict:
    submit_lat: list[float] = []
    cycle_lat: list[float] = []
    start = time.perf_counter()
    counts = await asyncio.gather(*[_labeler(url, t, campaign, start + seconds, submit_lat, cycle_lat) for t in tokens])
    elapsed = time.perf_counter() - start
    return {
        "rankings": sum(counts),
        "seconds": round(elapsed, 2),
        "rankings_per_s": round(sum(counts) / elapsed, 1),
        "submit_p50_ms": round(_pct(submit_lat, 0.50) * 1000, 2),
        "submit_p99_ms": round(_pct(submit_lat, 0.99) * 1000, 2),
        "cycle_p50_ms": round(_pct(cycle_lat, 0.50) * 1000, 2),
        "cycle_p99_ms": round(_pct(cycle_lat, 0.99) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m feedback_service.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="database URL (default: SQLite in a temporary directory)")
    p.add_argument("--clients", type=int, default=16, help="concurrent labeler clients")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--workers", type=int, default=1, help="server processes")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    schema = None
    db = args.db or f"sqlite:///{tmp / 'feedback.db'}"
    if db.startswith("postgresql"):  # a schema of its own, dropped at the end
        import psycopg

        schema = f"fs_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(db.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        db = f"{db}{'&' if '?' in db else '?'}options=-csearch_path%3D{schema}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALIGNLOOP_ADMIN_TOKEN": ADMIN}
    cmd = [sys.executable, "-m", "feedback_service", "--db", db, "--port", str(port), "--no-request-log", "--log-level", "warning", "--workers", str(args.workers)]
    server = subprocess.Popen(cmd, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        c = admin.post("/api/v1/campaigns", json={"name": "bench", "overlap": 1}).json()
        lines = [
            json.dumps({"prompt": f"bench prompt {k}", "answers": [{"text": f"answer {k}.{j}", "model_id": "bench"} for j in range(3)]})
            for k in range(args.items)
        ]
        for chunk in range(0, len(lines), 5000):
            admin.post(f"/api/v1/campaigns/{c['id']}/items/bulk", content="\n".join(lines[chunk : chunk + 5000]), headers={"Content-Type": "application/x-ndjson"}).raise_for_status()
        tokens = [admin.post("/api/v1/labelers", json={"name": f"bench{k}"}).json()["token"] for k in range(args.clients)]
        result = asyncio.run(_run(url, tokens, c["id"], args.seconds))
        stats = admin.get(f"/api/v1/campaigns/{c['id']}/stats").json()
        result.update({"db": db.split(":", 1)[0], "clients": args.clients, "workers": args.workers, "stored": stats["rankings"]})
        print(json.dumps(result))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        if schema:
            import psycopg

            with psycopg.connect(args.db.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    sys.exit(main())
