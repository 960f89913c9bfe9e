"""Property-based API testing with schemathesis against the service's own OpenAPI schema:
no generated request may produce a 5xx, and documented responses must match their schemas."""

from __future__ import annotations

import pytest
import schemathesis
from fs_helpers import ADMIN_TOKEN, item
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value):  # noqa: ANN001, ANN202
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else str(value).encode()


@pytest.fixture
def api_schema(app):
    from fastapi.testclient import TestClient

    # Some data, so generated ids hit real rows: a campaign, items, a labeler with a leased item.
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        c = client.post("/api/v1/campaigns", json={"name": "seed", "overlap": 2}).json()
        client.post(f"/api/v1/campaigns/{c['id']}/items", json={"items": [item("p1", gold_best=0), item("p2")]})
        client.post("/api/v1/labelers", json={"name": "seeded"})
        a = client.post(f"/api/v1/campaigns/{c['id']}/next").json()
        client.post(f"/api/v1/items/{a['item']['id']}/rankings", json={"ranking": [x["id"] for x in a["item"]["answers"]]})
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case) -> None:  # noqa: ANN001
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=[not_a_server_error, response_schema_conformance])
