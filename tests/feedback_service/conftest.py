"""Fixtures for the feedback service tests: a fresh database per test (SQLite file, or a
PostgreSQL schema of its own), the app built on it, and a live uvicorn server in a thread."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BASE = os.environ.get("ALIGNLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
from fs_helpers import ADMIN_TOKEN
_pg_reason: list[str | None] = []


def pg_unreachable() -> str | None:
    """None when PostgreSQL answers, else why not (checked once per session)."""
    if not _pg_reason:
        try:
            import psycopg

            psycopg.connect(PG_BASE.replace("+psycopg", ""), connect_timeout=3).close()
            _pg_reason.append(None)
        except Exception as e:  # noqa: BLE001
            _pg_reason.append(f"PostgreSQL not reachable at {PG_BASE}: {e}")
    return _pg_reason[0]


def _pg_schema_url(schema: str) -> str:
    return f"{PG_BASE}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    reason = pg_unreachable()
    if reason:
        pytest.skip(reason)
    import psycopg

    schema = f"fs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield _pg_schema_url(schema)
    finally:
        with psycopg.connect(PG_BASE.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def settings(db_url: str, tmp_path: Path):
    from feedback_service.config import Settings

    return Settings(db_url=db_url, data_dir=tmp_path, admin_token=ADMIN_TOKEN, log_requests=False)


@pytest.fixture
def app(settings):
    from feedback_service.app import create_app

    app = create_app(settings)
    yield app
    app.dependency_overrides.clear()
    app.state.engine.dispose()
    app.state.read_engine.dispose()


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:  # noqa: ANN001
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live(app) -> Iterator[LiveServer]:
    server = LiveServer(app)
    yield server
    server.stop()


@pytest.fixture
def admin(live):
    from feedback_service.client import FeedbackClient

    with FeedbackClient(live.url, ADMIN_TOKEN, retries=0) as client:
        yield client


