"""Property-based API testing with schemathesis against the service's own OpenAPI schema:
no generated request may produce a 5xx, and documented responses must match their schemas."""

from __future__ import annotations

import pytest
import schemathesis
from fs_helpers import ADMIN_TOKEN, item
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
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
        labeler_token = client.post("/api/v1/labelers", json={"name": "seeded"}).json()["token"]
        client.post(f"/api/v1/campaigns/{c['id']}/next", headers={"Authorization": f"Bearer {labeler_token}"})
        a = client.post(f"/api/v1/campaigns/{c['id']}/next").json()
        client.post(f"/api/v1/items/{a['item']['id']}/rankings", json={"ranking": [x["id"] for x in a["item"]["answers"]]})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.labeler_token = labeler_token
    return schema


def test_no_server_errors(api_schema) -> None:
    """Every operation in the schema, positive and negative generated inputs, as admin and as a
    labeler (who holds a lease, so labeler-only paths run too).

    (Driven with hypothesis directly: schemathesis' pytest fixture loader does not work with
    pytest 9, see schemathesis/pytest/lazy.py `request.node._nodeid`.)
    """
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    runs = [(op, mode, ADMIN_TOKEN, 6) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    runs += [(op, GenerationMode.POSITIVE, api_schema.labeler_token, 3) for op in operations]

    for operation, mode, token, examples in runs:
        headers = {"Authorization": f"Bearer {token}"}

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def run(case) -> None:  # noqa: ANN001
            case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance])

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones
