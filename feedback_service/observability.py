"""Prometheus metrics (one registry per app, so several apps can live in one process) and
structured JSON logs, one line per request."""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("feedback_service")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("feedback_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "feedback_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.rankings = Counter("feedback_rankings_stored_total", "rankings stored (not counting idempotent replays)", registry=self.registry)
        self.exports = Counter("feedback_exports_total", "export versions created", registry=self.registry)
        self.queue = Gauge("feedback_queue_depth", "rankings still needed across all campaigns (computed at scrape time)", registry=self.registry)


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestObserver:
    """ASGI middleware: request id, latency histogram, request counter, one JSON log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_requests: bool = True) -> None:
        self.app, self.metrics, self.log_requests = app, metrics, log_requests
        # Request ids: a random prefix per process and a counter (no system call per request).
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._children: dict[tuple[str, str, str], tuple] = {}  # (method, route, status) -> metric children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = f"{self._id_prefix}{next(self._ids) & 0xFFFFFFFF:08x}"
        status = 500

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_of(scope)
            key = (scope["method"], route, status)
            children = self._children.get(key)
            if children is None:  # labels() looks up a child under a lock: do it once per key
                children = (self.metrics.requests.labels(key[0], route, str(status)), self.metrics.latency.labels(key[0], route))
                if len(self._children) < 10_000:
                    self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
            state = scope.get("state", {})
            if state.get("ranking_stored") and status < 300:
                self.metrics.rankings.inc()
            if state.get("export_created") and status < 300:
                self.metrics.exports.inc()
            if self.log_requests:
                log.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": request_id,
                            "method": scope["method"],
                            "path": scope["path"],
                            "route": route,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "labeler_id": state.get("labeler_id"),
                        }
                    },
                )


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_413(send, limit)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # no (or a lying) Content-Length: stop reading at the limit
                    raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
