"""``alignloop serve`` / ``python -m feedback_service``: run the feedback service with uvicorn."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from feedback_service.config import ADMIN_TOKEN_ENV, DATA_DIR_ENV, DB_ENV, WORKER_ENV, Settings


# Threads that wait on the database (the group commit's BEGIN/COMMIT helper, PostgreSQL units in
# the thread pool) give up the GIL for every call and then wait for the busy event loop to hand
# it back: up to the 5 ms default switch interval each time, which adds up to tens of ms per
# request under load (a GIL convoy). 0.2 ms bounds that wait.
SWITCH_INTERVAL_S = 0.0002


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignloop serve",
        description="Run the alignloop feedback service (labeler API, web page, exports).",
        epilog=f"First admin token: `--create-admin NAME` prints one and exits, or set {ADMIN_TOKEN_ENV} before starting.",
    )
    p.add_argument("--db", help=f"SQLAlchemy URL (default: ${DB_ENV}, else SQLite <data-dir>/feedback.db in WAL mode)")
    p.add_argument("--data-dir", type=Path, help=f"data directory (default: ${DATA_DIR_ENV}, else ./alignloop-data)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1); >1 uses both cores, e.g. 2 on a 2-core machine")
    p.add_argument("--create-admin", metavar="NAME", help="create admin NAME (if needed), print a new token for it once, and exit")
    p.add_argument("--migrate-only", action="store_true", help="apply the schema migrations and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-request-log", action="store_true", help="do not log one JSON line per request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.from_env(db_url=args.db, data_dir=args.data_dir)
    settings = settings.model_copy(update={"log_requests": not args.no_request_log})

    from feedback_service import service  # noqa: PLC0415  (the web stack loads only when serving)
    from feedback_service.db import make_engine, make_sessionmaker, migrate, session_scope  # noqa: PLC0415
    from feedback_service.errors import ServiceError  # noqa: PLC0415
    from feedback_service.observability import setup_logging  # noqa: PLC0415

    setup_logging(args.log_level)
    if args.create_admin or args.migrate_only:
        engine = make_engine(settings.db_url)
        migrate(engine)
        if args.create_admin:
            try:
                with session_scope(make_sessionmaker(engine)) as session:
                    token = service.bootstrap_admin(session, args.create_admin, datetime.now(timezone.utc).replace(tzinfo=None))
            except ServiceError as e:
                print(f"alignloop serve: {e.detail}", file=sys.stderr)
                return 1
            print(token)
        engine.dispose()
        return 0

    import uvicorn  # noqa: PLC0415

    sys.setswitchinterval(SWITCH_INTERVAL_S)

    from feedback_service.app import create_app  # noqa: PLC0415

    run = {"host": args.host, "port": args.port, "access_log": False, "log_level": args.log_level, "timeout_graceful_shutdown": 5}
    if args.workers <= 1:
        app = create_app(settings)
        _hint_if_no_admin(app.state.sessionmaker)
        uvicorn.run(app, **run)
        return 0
    # Several processes: migrate and bootstrap once here, then each worker builds the app from env.
    engine = make_engine(settings.db_url)
    migrate(engine)
    if settings.admin_token:
        with session_scope(make_sessionmaker(engine)) as session:
            service.bootstrap_admin(session, "admin", datetime.now(timezone.utc).replace(tzinfo=None), settings.admin_token)
    engine.dispose()
    os.environ.update({DB_ENV: settings.db_url, DATA_DIR_ENV: str(settings.data_dir), WORKER_ENV: json.dumps({"log_requests": settings.log_requests, "log_level": args.log_level})})
    os.environ.pop(ADMIN_TOKEN_ENV, None)
    uvicorn.run("feedback_service.app:app_from_env", factory=True, workers=args.workers, **run)
    return 0


def _hint_if_no_admin(factory) -> None:  # noqa: ANN001
    from feedback_service import service  # noqa: PLC0415
    from feedback_service.db import session_scope  # noqa: PLC0415
    from feedback_service.observability import log  # noqa: PLC0415

    with session_scope(factory) as session:
        if not service.has_admin(session):
            log.warning(
                "no admin yet: run `alignloop serve --create-admin NAME` (prints a token once) "
                f"or start with {ADMIN_TOKEN_ENV} set"
            )
