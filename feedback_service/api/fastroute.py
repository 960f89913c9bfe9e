"""Lean request handling for the labeling hot paths (lease, rank, skip).

These routes are declared like every other FastAPI route (path, response model, status codes,
OpenAPI), but FastAPI's generic per-request machinery (dependency solving, content-type parsing
with ``email.message``, two exit stacks, per-route exception wrapping) cost about as much CPU as
the database work of a ranking. ``HotRoute`` keeps the declaration and replaces only the handler
by ``fast(...)``: it reads the same inputs in the same order and reports problems in the same
shape as FastAPI would:

1. the body: invalid JSON is a 422 ``json_invalid`` (before authentication, as in FastAPI);
2. the caller: ``deps.get_actor`` (401 without a live token);
3. path and query parameters and the body model, validated by pydantic with the same
   constraints, every error collected into one 422 (``loc`` starting with path/query/body).

The endpoint function itself is the same one FastAPI documents; it is called with keyword
arguments ``actor``, ``request``, ``body`` (if any) and the declared path and query parameters.
Errors raised anywhere go through the app's exception handlers as usual.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from feedback_service.deps import get_actor

Endpoint = Callable[..., Awaitable[Response]]

# False: serve these routes with FastAPI's own handler (the tests compare the two, request by request)
FAST_HANDLERS = True


class FastSpec:
    def __init__(self, path: dict[str, TypeAdapter], query: dict[str, tuple[TypeAdapter, Any]], body: type[BaseModel] | None) -> None:
        self.path, self.query, self.body = path, query, body

    def handler(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        path, query, body_model = self.path, self.query, self.body

        async def handle(request: Request) -> Response:
            raw = await _json_body(request) if body_model is not None else None
            kwargs: dict[str, Any] = {"actor": await get_actor(request), "request": request}
            errors: list[dict[str, Any]] = []
            for name, adapter in path.items():
                _validate(adapter, request.path_params[name], ("path", name), name, kwargs, errors)
            if query:
                params = request.query_params
                for name, (adapter, default) in query.items():
                    value = params.get(name)
                    if value is None:
                        kwargs[name] = default
                    else:
                        _validate(adapter, value, ("query", name), name, kwargs, errors)
            if body_model is not None:
                if raw is None:
                    errors.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
                else:
                    try:
                        kwargs["body"] = body_model.model_validate(raw, from_attributes=True)  # as FastAPI validates a body
                    except ValidationError as e:
                        errors += [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
            if errors:
                raise RequestValidationError(errors)
            return await endpoint(**kwargs)

        return handle


def fast(path: dict[str, TypeAdapter] | None = None, query: dict[str, tuple[TypeAdapter, Any]] | None = None, body: type[BaseModel] | None = None):  # noqa: ANN201
    """Mark an endpoint for ``HotRoute``: its path and query parameters (name: adapter, and for
    query parameters the default) and its JSON body model. Put it below the route decorator."""

    def mark(endpoint: Endpoint) -> Endpoint:
        endpoint._fast_spec = FastSpec(path or {}, query or {}, body)  # type: ignore[attr-defined]
        return endpoint

    return mark


class HotRoute(APIRoute):
    """An ``APIRoute`` whose handler is the endpoint's ``fast`` spec, when it has one."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        spec: FastSpec | None = getattr(endpoint, "_fast_spec", None)
        if spec is None:
            return
        handle = spec.handler(endpoint)
        fastapi_app = self.app

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if not FAST_HANDLERS:
                await fastapi_app(scope, receive, send)
                return
            response = await handle(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app


def _validate(adapter: TypeAdapter, value: Any, loc: tuple, name: str, kwargs: dict[str, Any], errors: list[dict[str, Any]]) -> None:
    try:
        kwargs[name] = adapter.validate_python(value)
    except ValidationError as e:
        errors += [{**err, "loc": (*loc, *err["loc"])} for err in e.errors(include_url=False)]


async def _json_body(request: Request) -> Any:
    """The body as FastAPI reads it for a JSON body parameter: None when empty, parsed JSON for a
    JSON content type, else the raw bytes (which then fail validation)."""
    raw = await request.body()  # BodyLimit's 413 (an HTTPException) passes through
    if not raw:
        return None
    content_type = request.headers.get("content-type")
    if content_type is None:
        return raw
    mime = content_type.split(";", 1)[0].strip().lower()
    maintype, _, subtype = mime.partition("/")
    if maintype != "application" or not (subtype == "json" or subtype.endswith("+json")):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {}, "ctx": {"error": e.msg}}]) from e
    except Exception as e:  # e.g. bytes that are no UTF-8 / UTF-16 / UTF-32 text
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
