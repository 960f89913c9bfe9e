"""FastAPI dependencies, as ``Annotated`` aliases the routes declare in their signatures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from feedback_service import service
from feedback_service.config import Settings
from feedback_service.models import ApiToken, Labeler
from feedback_service.security import hash_token
from feedback_service.writer import Writer

Clock = Callable[[], datetime]


async def get_settings(request: Request) -> Settings:  # async: no threadpool hop for trivial deps
    return request.app.state.settings


def utc_now() -> datetime:
    """Naive UTC (the database keeps no zone)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


async def get_clock(request: Request) -> Clock:
    """``app.state.clock``: naive UTC now; tests replace it to move time (lease expiry). The hot
    routes read ``app.state.clock`` directly (one dependency less to resolve per request)."""
    return request.app.state.clock


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request, committed before the response is sent (durable 2xx).

    The hot write paths go through ``WriterDep`` instead (group commit on SQLite).
    """
    with request.app.state.sessionmaker() as session:
        yield session
        session.commit()


async def get_writer(request: Request) -> Writer:
    """Runs the hot write paths (lease, rank, skip); group commit on SQLite, see ``writer.py``."""
    return request.app.state.writer


def get_read_session(request: Request) -> Iterator[Session]:
    """A read-only transaction for GET routes: on SQLite it reads a WAL snapshot without the write lock."""
    with request.app.state.read_sessionmaker() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
WriterDep = Annotated[Writer, Depends(get_writer)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # commit before the response goes out
ClockDep = Annotated[Clock, Depends(get_clock)]

_bearer = HTTPBearer(auto_error=False, description="API token: `Authorization: Bearer alf_...`")


def get_auth(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> tuple[Labeler, ApiToken]:
    """The token's labeler, looked up on every request (a revoked token is refused at once).

    Its own short read transaction: on SQLite it takes no write lock, so the request's write
    transaction (``get_session``) stays as short as the route's work.
    """
    if creds is None or not creds.credentials:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    with request.app.state.read_sessionmaker() as session:
        found = service.authenticate(session, creds.credentials)
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    request.state.labeler_id = found[0].id  # for the request log line
    return found


AuthDep = Annotated[tuple[Labeler, ApiToken], Depends(get_auth)]


async def get_current_user(auth: AuthDep) -> Labeler:
    return auth[0]


CurrentUser = Annotated[Labeler, Depends(get_current_user)]


async def get_admin(user: CurrentUser) -> Labeler:
    if user.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
    return user


AdminUser = Annotated[Labeler, Depends(get_admin)]


class ActorCache:
    """token hash -> ``Actor`` (labeler id, role, token id) for the hot write paths.

    Only an optimisation of the lookup, never of the check: a hit says who a token belonged to,
    and every unit that uses it re-checks in its own write transaction that the token is still
    live (in the same statement as its first read: ``service._item_context`` and
    ``_next_context``, or the PostgreSQL functions of ``hotpath.py``), so a revoked token is refused
    at once, by every worker process.
    Revocations in this process also empty the cache. A token's labeler and role never change.
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._by_hash: dict[str, service.Actor] = {}

    def get(self, token_hash: str) -> service.Actor | None:
        return self._by_hash.get(token_hash)

    def put(self, token_hash: str, actor: service.Actor) -> None:
        if len(self._by_hash) >= self.max_entries:
            self._by_hash.clear()
        self._by_hash[token_hash] = actor

    def clear(self) -> None:
        self._by_hash.clear()


def _lookup_actor(request: Request, token_hash: str) -> service.Actor | None:
    with request.app.state.read_engine.connect() as conn:
        return service.actor_for_token_hash(conn, token_hash)


async def get_actor(request: Request) -> service.Actor:
    """The caller of a hot write route (lease, rank, skip), without a database round trip when
    the token was seen before; the route's unit then checks it is still live (``ActorCache``).

    Reads the header itself (as ``HTTPBearer`` does) instead of depending on it: on these routes
    every dependency FastAPI resolves is a measurable share of the request. The routes declare
    the same ``HTTPBearer`` security scheme in their OpenAPI entry (``ACTOR_SECURITY``)."""
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    token_hash = hash_token(token)
    cache: ActorCache = request.app.state.actor_cache
    actor = cache.get(token_hash)
    if actor is None:
        actor = await run_in_threadpool(_lookup_actor, request, token_hash)
        if actor is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
        cache.put(token_hash, actor)
    request.state.labeler_id = actor.id  # for the request log line
    return actor


ACTOR_SECURITY = {"security": [{"HTTPBearer": []}]}  # openapi_extra of the routes that use ActorDep
ActorDep = Annotated[service.Actor, Depends(get_actor)]
