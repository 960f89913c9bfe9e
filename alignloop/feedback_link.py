"""The pipeline's side of the feedback service: start an embedded one, campaigns, labelers, candidates, exports."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from feedback_service.client import FeedbackClient, FeedbackError


class FeedbackLinkError(RuntimeError):
    pass


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free (0: any free port)."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise FeedbackLinkError("no free TCP port")


def _secret_file(path: Path, make) -> str:  # noqa: ANN001
    """A token kept on disk (mode 600) so a restarted pipeline talks to its service with the same credentials."""
    if path.is_file():
        return path.read_text().strip()
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


class EmbeddedService:
    """``alignloop serve`` as a child process (SQLite in ``data_dir`` unless ``db`` is given)."""

    def __init__(self, data_dir: str | Path, *, port: int = 0, host: str = "127.0.0.1", db: str | None = None,
                 startup_timeout: float = 90.0):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port, self.db, self.timeout = host, free_port(port, host), db, startup_timeout
        self.admin_token = _secret_file(self.data_dir / "admin_token", lambda: "al_" + secrets.token_urlsafe(32))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "EmbeddedService":
        env = dict(os.environ, ALIGNLOOP_ADMIN_TOKEN=self.admin_token)
        cmd = [sys.executable, "-m", "feedback_service", "--data-dir", str(self.data_dir), "--host", self.host,
               "--port", str(self.port), "--no-request-log", "--log-level", "warning"]
        if self.db:
            cmd += ["--db", self.db]
        log = open(self.data_dir / "service.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "service.log").read_text(errors="replace")[-2000:]
                raise FeedbackLinkError(f"the feedback service exited with code {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise FeedbackLinkError(f"the feedback service did not answer on {self.url} within {self.timeout:.0f}s "
                                f"(log: {self.data_dir / 'service.log'})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "EmbeddedService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_campaign(fc: FeedbackClient, name: str, guidelines: str, overlap: int) -> dict:
    for c in fc.list_campaigns():
        if c["name"] == name:
            return c
    return fc.create_campaign(name, guidelines=guidelines, overlap=overlap)


def ensure_labelers(fc: FeedbackClient, names: list[str], store: Path) -> dict[str, str]:
    """Labeler tokens by name; tokens are shown once by the service, so they are kept in ``store`` (mode 600)."""
    known: dict[str, str] = json.loads(store.read_text()) if store.is_file() else {}
    existing = {lab["name"]: lab for lab in fc.list_labelers()}
    for name in names:
        if name in known:
            continue
        if name in existing:  # a labeler from an earlier run whose token we lost: issue a fresh one
            known[name] = fc.issue_token(existing[name]["id"])["token"]
        else:
            known[name] = fc.create_labeler(name, "labeler")["token"]
    store.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(known, f)
    return {n: known[n] for n in names}


def candidate_items(prompts: list[Any], completions: list[list[str]], *, model_id: str, model_version: str,
                    sampling: dict) -> list[dict]:
    """Feedback-service items: distinct answers per prompt (at least two), with their provenance."""
    items = []
    for prompt, answers in zip(prompts, completions):
        # NUL cannot be stored (PostgreSQL text refuses it; the service rejects it): a model can emit it, so drop it here.
        cleaned = (a.replace("\x00", "").strip() for a in answers)
        distinct = list(dict.fromkeys(a for a in cleaned if a))
        if len(distinct) < 2:
            continue
        item: dict[str, Any] = {"answers": [{"text": a, "model_id": model_id, "model_version": model_version,
                                             "sampling": sampling} for a in distinct]}
        if isinstance(prompt, str):
            item["prompt"] = prompt
        else:
            item["messages"] = prompt
        items.append(item)
    return items


def wait_for_rankings(fc: FeedbackClient, campaign_id: int, since_watermark: int, at_least: int, timeout_s: float,
                      poll_s: float = 5.0, clock=time) -> dict:  # noqa: ANN001
    """Block until the campaign has ``at_least`` rankings newer than the watermark (or the timeout passes)."""
    deadline = clock.time() + timeout_s
    last = -1
    while True:
        st = fc.stats(campaign_id, since_watermark=since_watermark)
        if st["rankings_since"] != last:
            print(f"[pipeline] feedback: {st['rankings_since']}/{at_least} new rankings, "
                  f"{st['queue_depth']} still queued", flush=True)
            last = st["rankings_since"]
        if st["rankings_since"] >= at_least:
            return st
        if clock.time() >= deadline:
            raise FeedbackLinkError(f"campaign {campaign_id}: only {st['rankings_since']} of {at_least} new rankings "
                                    f"after {timeout_s:.0f}s")
        clock.sleep(poll_s)


__all__ = ["EmbeddedService", "FeedbackClient", "FeedbackError", "FeedbackLinkError", "candidate_items",
           "ensure_campaign", "ensure_labelers", "free_port", "wait_for_rankings"]
