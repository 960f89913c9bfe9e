"""Schema migrations keep data; the CLI entry points; the package imports stay light."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from fs_helpers import ADMIN_TOKEN
from sqlalchemy import text

from feedback_service.config import Settings
from feedback_service.db import current_revision, make_engine, migrate

REPO = Path(__file__).resolve().parents[2]


def test_upgrade_from_first_revision_keeps_data(db_url, tmp_path) -> None:
    engine = make_engine(db_url)
    migrate(engine, "0001")
    assert current_revision(engine) == "0001"
    now = datetime(2026, 1, 1)
    with engine.begin() as conn:  # rows written by a service at revision 0001
        conn.execute(text("INSERT INTO labelers (name, role, active, created_at) VALUES ('old', 'labeler', true, :t)"), {"t": now})
        conn.execute(text("INSERT INTO campaigns (name, guidelines, overlap, lease_seconds, created_at) VALUES ('old-c', 'g', 1, 60, :t)"), {"t": now})
        conn.execute(text("INSERT INTO items (campaign_id, content_hash, prompt, created_at) VALUES (1, 'h', 'old prompt', :t)"), {"t": now})
        for aid in (1, 2):
            conn.execute(text("INSERT INTO answers (item_id, position, text, model_id) VALUES (1, :p, :x, 'm')"), {"p": aid - 1, "x": f"ans{aid}"})
        conn.execute(text("INSERT INTO rankings (item_id, labeler_id, campaign_id, ranking, created_at) VALUES (1, 1, 1, '[[2], [1]]', :t)"), {"t": now})
    engine.dispose()

    from feedback_service.app import create_app  # upgrades to head at start-up
    from fastapi.testclient import TestClient

    app = create_app(Settings(db_url=db_url, data_dir=tmp_path, admin_token=ADMIN_TOKEN, log_requests=False))
    assert current_revision(app.state.engine) == "0007"
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        assert client.get("/health").json()["schema_revision"] == "0007"
        assert client.get("/api/v1/items/1").json()["prompt"] == "old prompt"
        export = client.post("/api/v1/campaigns/1/exports", json={"aggregation": "none"}).json()
        rows = client.get(f"/api/v1/exports/{export['id']}/rows").text.splitlines()
        assert len(rows) == 1 and '"chosen": "ans2"' in rows[0]
        # 0003 backfilled items.complete: the ranked item (overlap 1) is not offered again
        token = client.post("/api/v1/labelers", json={"name": "new"}).json()["token"]
        assert client.post("/api/v1/campaigns/1/next", headers={"Authorization": f"Bearer {token}"}).status_code == 204
        assert client.get("/api/v1/campaigns/1/items").json()[0]["prompt"] == "old prompt"
    app.state.engine.dispose()
    # migrating again is a no-op
    engine = make_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rankings")).scalar() == 1
    engine.dispose()


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_create_admin_prints_a_working_token_once(tmp_path) -> None:
    out = _run("-m", "feedback_service", "--data-dir", str(tmp_path), "--create-admin", "root")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("alf_") and (tmp_path / "feedback.db").exists()

    from fastapi.testclient import TestClient

    from feedback_service.app import create_app

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'feedback.db'}", data_dir=tmp_path, log_requests=False))
    with TestClient(app) as client:
        me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
        assert me["labeler"]["name"] == "root" and me["labeler"]["role"] == "admin"
    app.state.engine.dispose()
    # a second call gives a second, different token
    again = _run("-m", "feedback_service", "--data-dir", str(tmp_path), "--create-admin", "root")
    assert again.returncode == 0 and again.stdout.strip() != token


def test_alignloop_serve_dispatches_to_the_service_cli(tmp_path) -> None:
    out = _run("-m", "alignloop.cli", "serve", "--help")
    assert out.returncode == 0 and "--create-admin" in out.stdout and "--db" in out.stdout
    out = _run("-m", "alignloop.cli", "serve", "--migrate-only", env={"ALIGNLOOP_DATA_DIR": str(tmp_path / "d")})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d" / "feedback.db").exists()


def test_sqlite_default_is_wal(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()


@pytest.mark.parametrize("module", ["feedback_service", "feedback_service.client"])
def test_imports_stay_light(module: str) -> None:
    code = f"import sys, {module}; heavy = [m for m in ('torch', 'transformers', 'datasets', 'ray', 'fastapi', 'sqlalchemy') if m in sys.modules]; print(heavy)"
    out = _run("-c", code)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
