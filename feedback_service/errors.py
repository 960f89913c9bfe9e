"""Service errors with their HTTP status; the app turns them into JSON responses."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class Unauthorized(ServiceError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    """422 in FastAPI's own shape: a list of {loc, msg, type}."""

    status_code = 422

    def __init__(self, loc: list[str | int], msg: str, type_: str = "value_error") -> None:
        super().__init__([{"loc": loc, "msg": msg, "type": type_}])

    @classmethod
    def many(cls, errors: list[dict[str, Any]]) -> "Invalid":
        out = cls([], "")
        out.detail = errors
        return out
