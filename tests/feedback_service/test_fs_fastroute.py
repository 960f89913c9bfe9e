"""The hot routes' lean handlers (api/fastroute.py) answer exactly as FastAPI's own would."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from fs_helpers import ADMIN_TOKEN, item

from feedback_service.api import fastroute

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _requests(token: str, campaign: int) -> list[tuple[str, str, dict, bytes | None]]:
    L = {"Authorization": f"Bearer {token}"}
    J = {**L, "Content-Type": "application/json"}
    ok = b'{"ranking": [1, 2, 3]}'
    return [
        ("POST", "/api/v1/items/1/rankings", {}, None),  # no token, no body
        ("POST", "/api/v1/items/1/rankings", {"Content-Type": "application/json"}, b"{bad"),  # invalid JSON comes before auth
        ("POST", "/api/v1/items/1/rankings", {"Authorization": "Bearer alf_nope", "Content-Type": "application/json"}, ok),
        ("POST", "/api/v1/items/1/rankings", {"Authorization": "Basic abc", "Content-Type": "application/json"}, ok),
        ("POST", "/api/v1/items/1/rankings", J, b"{bad"),
        ("POST", "/api/v1/items/abc/rankings", J, ok),
        ("POST", "/api/v1/items/0/rankings", J, b'{"x": 1}'),  # path and body errors together
        ("POST", "/api/v1/items/99999999999/rankings", L, None),
        ("POST", "/api/v1/items/1/rankings", {**L, "Content-Type": "text/plain"}, ok),
        ("POST", "/api/v1/items/1/rankings", L, ok),  # no content type
        ("POST", "/api/v1/items/1/rankings", J, b"[1, 2]"),
        ("POST", "/api/v1/items/1/rankings", J, b"\xff\xfe\xfa"),
        ("POST", "/api/v1/items/1/rankings", J, b'{"ranking": [1, 2, 3], "rationale": "\\u0000"}'),
        ("POST", "/api/v1/items/1/rankings", J, b'{"ranking": [1, 2, 3], "extra": 1}'),
        ("POST", "/api/v1/items/1/rankings", J, ok + b" " * (1 << 20)),  # 413
        ("POST", "/api/v1/items/1/rankings", J, ok),  # not leased yet: 404 for a labeler
        ("POST", f"/api/v1/campaigns/{campaign}/next", L, None),
        ("POST", "/api/v1/items/1/rankings", J, b'{"ranking": [1, 2]}'),  # 422 from the service
        ("POST", "/api/v1/items/1/rankings", {**L, "Content-Type": "application/vnd.x+json; charset=utf-8"}, ok),  # 201
        ("POST", "/api/v1/items/1/rankings", J, ok),  # idempotent: 200
        ("POST", "/api/v1/items/1/rankings", J, b'{"ranking": [3, 2, 1]}'),  # 409
        ("POST", "/api/v1/items/1/skip", L, None),
        ("POST", "/api/v1/items/x/skip", L, None),
        ("POST", f"/api/v1/campaigns/{campaign}/leases?count=0", L, None),
        ("POST", f"/api/v1/campaigns/{campaign}/leases?count=x&count=2", L, None),  # the last value counts
        ("POST", f"/api/v1/campaigns/{campaign}/leases?count=2&count=x", L, None),
        ("POST", f"/api/v1/campaigns/{campaign}/leases", L, None),
        ("POST", "/api/v1/campaigns/0/leases?count=200", L, None),
        ("POST", "/api/v1/campaigns/77/next", L, None),
        ("GET", "/api/v1/items/1/rankings", L, None),  # 405
    ]


def _answers(app, fast: bool, monkeypatch) -> list[tuple]:  # noqa: ANN001
    monkeypatch.setattr(fastroute, "FAST_HANDLERS", fast)
    client = TestClient(app)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    campaign = client.post("/api/v1/campaigns", json={"name": f"c{fast}"}, headers=admin).json()["id"]
    client.post(f"/api/v1/campaigns/{campaign}/items", json={"items": [item(f"p{fast}")]}, headers=admin).raise_for_status()
    token = client.post("/api/v1/labelers", json={"name": f"bob{fast}"}, headers=admin).json()["token"]
    out = []
    for n, (method, path, headers, body) in enumerate(_requests(token, campaign)):
        r = client.request(method, path, headers=headers, content=body)
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        if isinstance(payload, dict):  # ids and times differ between the two runs
            payload = {k: v for k, v in payload.items() if k not in ("created_at", "lease_expires_at", "item", "leases", "id", "labeler_id", "campaign_id")}
        out.append((n, r.status_code, payload, r.headers.get("www-authenticate"), r.headers.get("content-type")))
    return out


def test_fast_handlers_answer_like_fastapi(app, monkeypatch) -> None:
    fast = _answers(app, True, monkeypatch)
    with app.state.engine.begin() as conn:  # the second run starts from item, answer and ranking id 1 again
        for table in ("rankings", "assignments", "answers", "items"):
            conn.execute(text(f"DELETE FROM {table}"))
    slow = _answers(app, False, monkeypatch)
    assert [a[1] for a in fast] == [401, 422, 401, 401, 422, 422, 422, 422, 422, 422, 422, 400, 422, 422, 413, 404, 200, 422, 201, 200, 409, 409, 422, 422, 200, 422, 200, 422, 404, 405]
    for f, s in zip(fast, slow):
        assert f == s
