"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import IntegrityError, OperationalError

from feedback_service import __version__, service
from feedback_service.api.routes import hot, router, system
from feedback_service.config import Settings
from feedback_service.db import Checkpointer, make_engine, make_sessionmaker, migrate, session_scope
from feedback_service.deps import ActorCache, utc_now
from feedback_service.errors import ServiceError
from feedback_service import hotpath
from feedback_service.hotpath import PgHotPath, WriterHotPath
from feedback_service.writer import Writer
from feedback_service.observability import BodyLimit, Metrics, RequestObserver, log

STATIC = Path(__file__).parent / "static"


def _file_sqlite(url: str) -> bool:
    return url.startswith("sqlite") and url.split("///", 1)[-1] not in ("", ":memory:")


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Everything built so far (modules, SQLAlchemy and pydantic machinery, the app) lives as long
    # as the process: move it out of the collector's way. Otherwise every full collection walks
    # those ~130,000 objects and stops the event loop for 60-90 ms, every few seconds under load.
    gc.collect()
    gc.freeze()
    yield


def create_app(settings: Settings, run_migrations: bool = True) -> FastAPI:
    """Build the app on ``settings.db_url``; migrate the schema and bootstrap the admin token."""
    engine = make_engine(settings.db_url, background_checkpoints=_file_sqlite(settings.db_url))
    if _file_sqlite(settings.db_url):
        Checkpointer(engine).start()  # WAL checkpoints off the commit path (db.py)
    if run_migrations:
        migrate(engine)
    factory = make_sessionmaker(engine)
    if settings.admin_token:
        with session_scope(factory) as session:
            service.bootstrap_admin(session, "admin", datetime.now(timezone.utc).replace(tzinfo=None), settings.admin_token)

    app = FastAPI(
        lifespan=_lifespan,
        title="alignloop feedback service",
        version=__version__,
        description="Labelers rank model answers; versioned export of preference pairs. See feedback_service/README.md.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = factory
    # SQLite: reads that need no write lock (authentication) go through a second, read-only engine.
    app.state.read_engine = make_engine(settings.db_url, read_only=True) if engine.dialect.name == "sqlite" else engine
    app.state.read_sessionmaker = make_sessionmaker(app.state.read_engine)
    app.state.writer = Writer(factory, group_commit=engine.dialect.name == "sqlite")
    # lease, rank, skip: PostgreSQL functions on PostgreSQL, the writer's units elsewhere
    app.state.hot = PgHotPath(engine) if engine.dialect.name == "postgresql" and hotpath.PG_FUNCTIONS else WriterHotPath(app.state.writer)
    app.state.actor_cache = ActorCache()
    app.state.clock = utc_now  # naive UTC now; tests replace it to move time

    app.state.metrics = Metrics()

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_: Request, exc: IntegrityError) -> JSONResponse:
        # A uniqueness race the service's own checks could not see (two concurrent creates).
        log.warning("integrity error", extra={"fields": {"error": str(exc.orig)[:500]}})
        return JSONResponse({"detail": "conflicts with data stored concurrently; retry the request"}, status_code=409)

    @app.exception_handler(OperationalError)
    async def _operational_error(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable", extra={"fields": {"error": str(exc.orig)[:500]}})
        return JSONResponse({"detail": "database unavailable, retry later"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's shape, minus the echoed input (it can be large, and it can be a secret).
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.include_router(hot)  # the labeling hot paths first: routes are matched in order
    app.include_router(system)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def labeler_page() -> FileResponse:
        # Same-origin scripts and API calls only; the page renders item text as text, never HTML.
        csp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    bulk = settings.max_bulk_bytes
    app.add_middleware(BodyLimit, limit_for=lambda path: bulk if path.endswith("/items/bulk") else settings.max_body_bytes)
    app.add_middleware(RequestObserver, metrics=app.state.metrics, log_requests=settings.log_requests)
    log.debug("app created", extra={"fields": {"db": engine.url.render_as_string(hide_password=True)}})
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes (``--workers N``): the CLI has already migrated the
    schema and bootstrapped the admin, and passes the settings through the environment."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    from feedback_service.config import WORKER_ENV  # noqa: PLC0415
    from feedback_service.observability import setup_logging  # noqa: PLC0415

    import sys  # noqa: PLC0415

    from feedback_service.cli import SWITCH_INTERVAL_S  # noqa: PLC0415

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    worker = json.loads(os.environ.get(WORKER_ENV, "{}"))
    setup_logging(worker.get("log_level", "info"))
    settings = Settings.from_env().model_copy(update={"log_requests": worker.get("log_requests", True)})
    return create_app(settings, run_migrations=False)
