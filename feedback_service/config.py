"""Service settings: one typed object, read from the environment once, handed out by a dependency."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

DATA_DIR_ENV = "ALIGNLOOP_DATA_DIR"
DB_ENV = "ALIGNLOOP_DB"
ADMIN_TOKEN_ENV = "ALIGNLOOP_ADMIN_TOKEN"
WORKER_ENV = "ALIGNLOOP_FEEDBACK_WORKER"  # set by the CLI for worker processes (--workers > 1)


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "alignloop-data"))


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'feedback.db').resolve()}"


class Settings(BaseModel):
    """Everything the running service needs; built by the CLI or by tests."""

    db_url: str = Field(description="SQLAlchemy URL: sqlite:///... (default) or postgresql+psycopg://...")
    data_dir: Path = Field(default_factory=default_data_dir, description="where the default SQLite file lives")
    max_body_bytes: int = Field(default=1 << 20, description="request body limit for JSON endpoints")
    max_bulk_bytes: int = Field(default=32 << 20, description="request body limit for NDJSON bulk item import")
    default_lease_seconds: int = Field(default=900, description="lease of an assigned item when a campaign sets none")
    admin_token: str | None = Field(default=None, description="bootstrap admin token (ALIGNLOOP_ADMIN_TOKEN)")
    log_requests: bool = Field(default=True, description="one structured JSON log line per request")

    @classmethod
    def from_env(cls, db_url: str | None = None, data_dir: Path | None = None) -> "Settings":
        data_dir = data_dir or default_data_dir()
        url = db_url or os.environ.get(DB_ENV) or sqlite_url(data_dir)
        return cls(db_url=url, data_dir=data_dir, admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
