"""Load benchmark (not a test): concurrent labeler clients lease items and post rankings against a
real server process over loopback for a fixed time; reports acknowledged (durable) rankings per
second, the p50 / p99 latency of the ranking POST and of the whole next+submit cycle, the load
average, and how much CPU the server and the load generator used.

    python -m feedback_service.bench --workers 2          # SQLite in a temporary directory
    python -m feedback_service.bench --workers 2 --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    python -m feedback_service.bench --clients 32 --seconds 20 --workers 2 --lease-batch 8

The load generator is deliberately cheap, so that on a small machine the server gets the CPU: raw
HTTP/1.1 keep-alive connections on one asyncio (uvloop when present) event loop, one connection
per labeler, requests written as prebuilt bytes and responses parsed by hand. Every labeler runs
the real cycle: ``POST /campaigns/{id}/next`` (a durable lease), then
``POST /items/{id}/rankings`` with a full order of that item's answers (a durable ranking); a
ranking counts when its 201 arrived. With ``--lease-batch N`` a labeler holds N leases at once
(``POST /campaigns/{id}/leases?count=N``) and posts their rankings one by one. The first
``--warmup`` seconds are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
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


def _pct_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL server process on this machine, exited backends included
    (they do part of the work of a request; other users of the same server are counted too)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            # utime + stime, plus cutime + cstime: backends that exited are in the postmaster's
            total += sum(int(f) for f in fields[11:15]) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


class _Conn:
    """One keep-alive HTTP/1.1 connection; ``request`` returns (status, body bytes)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "_Conn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, (await self.reader.readexactly(length) if length else b"")
        body = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += data[:-2]

    def close(self) -> None:
        self.writer.close()


def _post(path: str, token: str, body: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + body


async def _labeler(port: int, token: str, campaign: int, lease_batch: int, clock: dict, out: dict) -> None:
    conn = await _Conn.open(port)
    if lease_batch > 1:
        lease_req = _post(f"/api/v1/campaigns/{campaign}/leases?count={lease_batch}", token)
    else:
        lease_req = _post(f"/api/v1/campaigns/{campaign}/next", token)
    try:
        while time.perf_counter() < clock["end"]:
            t0 = time.perf_counter()
            status, body = await conn.request(lease_req)
            t1 = time.perf_counter()
            if status == 204:
                out["exhausted"] += 1
                break
            if status != 200:
                out["errors"][f"lease {status}"] = out["errors"].get(f"lease {status}", 0) + 1
                continue
            leases = json.loads(body)["leases"] if lease_batch > 1 else [json.loads(body)]
            if not leases:
                out["exhausted"] += 1
                break
            if t0 >= clock["start"] and t1 <= clock["end"]:
                out["lease"].append(t1 - t0)
            for lease in leases:
                item = lease["item"]
                ranking = json.dumps({"ranking": [x["id"] for x in reversed(item["answers"])]}).encode()
                t1 = time.perf_counter()
                status, body = await conn.request(_post(f"/api/v1/items/{item['id']}/rankings", token, ranking))
                t2 = time.perf_counter()
                if status not in (200, 201):
                    out["errors"][f"rank {status}"] = out["errors"].get(f"rank {status}", 0) + 1
                    continue
                if t1 >= clock["start"] and t2 <= clock["end"]:  # completed inside the measured window
                    out["rankings"] += 1
                    out["submit"].append(t2 - t1)
                    if lease_batch == 1:
                        out["cycle"].append(t2 - t0)
    finally:
        conn.close()


async def _run(port: int, tokens: list[str], campaign: int, lease_batch: int, seconds: float, warmup: float, server_pid: int, postgres: bool) -> dict:
    out: dict = {"rankings": 0, "submit": [], "cycle": [], "lease": [], "errors": {}, "exhausted": 0}
    now = time.perf_counter()
    clock = {"start": now + warmup, "end": now + warmup + seconds}
    tasks = [asyncio.create_task(_labeler(port, t, campaign, lease_batch, clock, out)) for t in tokens]
    await asyncio.sleep(max(0.0, clock["start"] - time.perf_counter()))
    cpu0, srv0, t0 = time.process_time(), _cpu_seconds(server_pid), time.perf_counter()
    pg0 = _postgres_cpu_seconds() if postgres else 0.0
    load0 = os.getloadavg()[0]
    await asyncio.sleep(max(0.0, clock["end"] - time.perf_counter()))
    cpu1, srv1, t1 = time.process_time(), _cpu_seconds(server_pid), time.perf_counter()
    pg1 = _postgres_cpu_seconds() if postgres else 0.0
    load1 = os.getloadavg()[0]
    await asyncio.gather(*tasks)
    elapsed = t1 - t0
    return {
        "rankings": out["rankings"],
        "seconds": round(elapsed, 2),
        "rankings_per_s": round(out["rankings"] / elapsed, 1),
        "submit_p50_ms": _pct_ms(out["submit"], 0.50),
        "submit_p99_ms": _pct_ms(out["submit"], 0.99),
        "cycle_p50_ms": _pct_ms(out["cycle"], 0.50),  # lease + rank (with --lease-batch 1)
        "cycle_p99_ms": _pct_ms(out["cycle"], 0.99),
        "lease_p50_ms": _pct_ms(out["lease"], 0.50),
        "lease_p99_ms": _pct_ms(out["lease"], 0.99),
        "server_cpu": round((srv1 - srv0) / elapsed, 2),  # cores the server used on average
        "client_cpu": round((cpu1 - cpu0) / elapsed, 2),  # cores this load generator used
        "server_cpu_ms_per_ranking": round(1000 * (srv1 - srv0) / max(1, out["rankings"]), 3),
        "client_cpu_ms_per_ranking": round(1000 * (cpu1 - cpu0) / max(1, out["rankings"]), 3),
        **({"postgres_cpu": round((pg1 - pg0) / elapsed, 2), "postgres_cpu_ms_per_ranking": round(1000 * (pg1 - pg0) / max(1, out["rankings"]), 3)} if postgres else {}),
        "load_avg_1m": [round(load0, 2), round(load1, 2)],
        "errors": out["errors"],
        "exhausted_clients": out["exhausted"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m feedback_service.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="database URL (default: SQLite in a temporary directory)")
    p.add_argument("--clients", type=int, default=16, help="concurrent labeler clients (one connection each)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured time")
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--overlap", type=int, default=1, help="labelers per item")
    p.add_argument("--lease-batch", type=int, default=1, help="1: POST next, then rank it (two requests per ranking); N > 1: POST leases?count=N, then rank each")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for the server command (repeatable)")
    args = p.parse_args(argv)

    try:
        import uvloop  # noqa: PLC0415

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop

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
    cmd = [sys.executable, "-m", "feedback_service", "--db", db, "--port", str(port), "--no-request-log", "--log-level", "warning", "--workers", str(args.workers), *args.server_arg]
    server = subprocess.Popen(cmd, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
        c = admin.post("/api/v1/campaigns", json={"name": "bench", "overlap": args.overlap}).json()
        lines = [
            json.dumps({"prompt": f"bench prompt {k}", "answers": [{"text": f"answer {k}.{j}", "model_id": "bench"} for j in range(3)]})
            for k in range(args.items)
        ]
        for chunk in range(0, len(lines), 5000):
            admin.post(f"/api/v1/campaigns/{c['id']}/items/bulk", content="\n".join(lines[chunk : chunk + 5000]), headers={"Content-Type": "application/x-ndjson"}).raise_for_status()
        tokens = [admin.post("/api/v1/labelers", json={"name": f"bench{k}"}).json()["token"] for k in range(args.clients)]
        print(f"bench: server pid {server.pid}, {args.items} items, {args.clients} clients, load starts", file=sys.stderr, flush=True)
        gc.collect()  # the load generator's own setup garbage must not pause it mid-run
        gc.freeze()
        loop = loop_factory()
        try:
            result = loop.run_until_complete(_run(port, tokens, c["id"], args.lease_batch, args.seconds, args.warmup, server.pid, schema is not None))
        finally:
            loop.close()
        stats = admin.get(f"/api/v1/campaigns/{c['id']}/stats").json()
        result.update({"db": db.split(":", 1)[0], "clients": args.clients, "workers": args.workers, "overlap": args.overlap, "lease_batch": args.lease_batch, "stored_total": stats["rankings"], "cpus": os.cpu_count()})
        print(json.dumps(result))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
        if schema:
            import psycopg

            with psycopg.connect(args.db.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    sys.exit(main())
