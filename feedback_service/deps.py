"""FastAPI dependencies, as ``Annotated`` aliases the routes declare in their signatures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from feedback_service import service
from feedback_service.config import Settings
from feedback_service.models import ApiToken, Labeler

Clock = Callable[[], datetime]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_clock() -> Clock:
    """Naive UTC now; tests override this dependency to move time (lease expiry)."""
    return lambda: datetime.now(timezone.utc).replace(tzinfo=None)


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request, committed before the response is sent (durable 2xx)."""
    with request.app.state.sessionmaker() as session, session.begin():
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # commit before the response goes out
ClockDep = Annotated[Clock, Depends(get_clock)]

_bearer = HTTPBearer(auto_error=False, description="API token: `Authorization: Bearer alf_...`")


def get_auth(
    request: Request, session: SessionDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> tuple[Labeler, ApiToken]:
    if creds is None or not creds.credentials:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    found = service.authenticate(session, creds.credentials)
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    request.state.labeler_id = found[0].id  # for the request log line
    return found


AuthDep = Annotated[tuple[Labeler, ApiToken], Depends(get_auth)]


def get_current_user(auth: AuthDep) -> Labeler:
    return auth[0]


CurrentUser = Annotated[Labeler, Depends(get_current_user)]


def get_admin(user: CurrentUser) -> Labeler:
    if user.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
    return user


AdminUser = Annotated[Labeler, Depends(get_admin)]
