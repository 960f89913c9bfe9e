"""PostgreSQL: the hot paths as server-side functions (hotpath.PgHotPath, migration 0006) answer
exactly as the writer's units of service.py do, request by request, errors included."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from fs_helpers import ADMIN_TOKEN, item

from feedback_service import hotpath

pytestmark = pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)

T0 = datetime(2026, 1, 1, 12, 0, 0)


def _script(app) -> list[tuple]:  # noqa: ANN001
    """Leases, rankings and skips of three labelers, with every refusal the hot routes have."""
    now = [T0]
    app.state.clock = lambda: now[0]
    out: list[tuple] = []
    with TestClient(app) as client:
        A = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        def call(what: str, method: str, path: str, token: str | None, body: dict | None = None) -> dict | list | str | None:
            r = client.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {}, json=body)
            payload = r.json() if r.content else None
            out.append((len(out), what, r.status_code, payload))
            return payload

        c = client.post("/api/v1/campaigns", json={"name": "c", "overlap": 2, "lease_seconds": 60}, headers=A).json()["id"]
        client.post(f"/api/v1/campaigns/{c}/items", json={"items": [item(f"p{k}") for k in range(4)]}, headers=A).raise_for_status()
        bob, eve, carl, dan = (client.post("/api/v1/labelers", json={"name": n}, headers=A).json()["token"] for n in ("bob", "eve", "carl", "dan"))
        nxt, leases = f"/api/v1/campaigns/{c}/next", f"/api/v1/campaigns/{c}/leases"

        def rank(i: int, ids: list, token: str, rationale: str | None = None) -> None:
            call(f"rank {i} {ids}", "POST", f"/api/v1/items/{i}/rankings", token, {"ranking": ids, "rationale": rationale})

        call("no campaign", "POST", "/api/v1/campaigns/77/next", bob)
        call("no campaign, leases", "POST", "/api/v1/campaigns/77/leases?count=2", bob)
        a = call("bob next", "POST", nxt, bob)
        call("bob next again: the same lease", "POST", nxt, bob)
        call("bob holds 3", "POST", f"{leases}?count=3", bob)
        call("bob holds 2: never gives leases back", "POST", f"{leases}?count=2", bob)
        e = call("eve next: overlap 2", "POST", nxt, eve)
        i1 = a["item"]["id"]
        ids = [x["id"] for x in a["item"]["answers"]]
        rank(i1, ids[:2], bob)  # one missing
        rank(i1, [*ids, 999999], bob)  # unknown
        rank(i1, [ids[0], ids[0], ids[1], ids[2]], bob)  # twice
        rank(i1, [[ids[2], ids[0]], ids[1]], bob, "tie")  # stored: tie group sorted
        rank(i1, [[ids[0], ids[2]], ids[1]], bob, "tie")  # the same again: 200
        rank(i1, [[ids[0], ids[2]], ids[1]], bob, "other rationale")  # 409
        rank(i1, ids, bob)  # differently: 409
        call("bob skips a ranked item", "POST", f"/api/v1/items/{i1}/skip", bob)
        held = call("bob's leases", "POST", f"{leases}?count=3", bob)
        i2 = held["leases"][0]["item"]["id"]
        ids2 = [x["id"] for x in held["leases"][0]["item"]["answers"]]
        call("bob skips", "POST", f"/api/v1/items/{i2}/skip", bob)
        call("bob skips again", "POST", f"/api/v1/items/{i2}/skip", bob)
        rank(i2, ids2, bob)  # skipped: 409
        rank(i2, ids2, carl)  # not carl's: 404
        rank(i1, ids, ADMIN_TOKEN)  # an admin sees the item, holds no lease: 409
        call("admin skips", "POST", f"/api/v1/items/{i1}/skip", ADMIN_TOKEN)
        call("no item", "POST", "/api/v1/items/99999/skip", bob)
        rank(99999, ids, bob)
        # Expiry: eve's lease on item 1 runs out and carl takes the free slot.
        now[0] = T0 + timedelta(seconds=61)
        call("carl next: eve's expired slot", "POST", nxt, carl)
        rank(i1, ids, eve)  # expired and taken: 409
        call("eve next: a new item", "POST", nxt, eve)
        now[0] = T0 + timedelta(seconds=200)
        e2 = call("eve next: her expired lease renewed", "POST", nxt, eve)
        rank(e2["item"]["id"], [x["id"] for x in e2["item"]["answers"]], eve)
        now[0] = T0 + timedelta(seconds=400)
        # An expired lease whose slot is still free: the ranking is taken.
        e3 = call("eve next", "POST", nxt, eve)
        now[0] = T0 + timedelta(seconds=500)
        rank(e3["item"]["id"], [x["id"] for x in e3["item"]["answers"]], eve)
        call("carl holds up to 10 (runs out)", "POST", f"{leases}?count=10", carl)
        call("eve next", "POST", nxt, eve)
        call("eve leases: runs out", "POST", f"{leases}?count=5", eve)
        call("dan next: every slot taken", "POST", nxt, dan)
        call("dan leases: none", "POST", f"{leases}?count=5", dan)
        assert e is not None
        # Revoked behind the process's back (its token cache still knows bob): refused at once.
        with app.state.engine.begin() as conn:
            conn.execute(text("UPDATE api_tokens SET revoked_at = :t WHERE labeler_id = (SELECT id FROM labelers WHERE name = 'bob')"), {"t": now[0]})
        call("revoked: next", "POST", nxt, bob)
        call("revoked: leases", "POST", f"{leases}?count=2", bob)
        call("revoked: no campaign", "POST", "/api/v1/campaigns/77/next", bob)
        rank(i2, ids2, bob)
        rank(99999, ids2, bob)
        call("revoked: skip", "POST", f"/api/v1/items/{i2}/skip", bob)
        with app.state.engine.begin() as conn:
            conn.execute(text("UPDATE labelers SET active = false WHERE name = 'carl'"))
        call("deactivated: next", "POST", nxt, carl)
        out.append(("stats", client.get(f"/api/v1/campaigns/{c}/stats", headers=A).json()))
        out.append(("rankings", client.get("/api/v1/rankings", headers=A).json()))
    return out


def test_functions_answer_like_the_writer_units(settings, monkeypatch) -> None:
    from feedback_service.app import create_app

    app = create_app(settings)
    assert isinstance(app.state.hot, hotpath.PgHotPath)
    functions = _script(app)
    assert app.state.hot.calls > 40
    with app.state.engine.begin() as conn:  # the second run starts from the same ids
        conn.execute(text("TRUNCATE export_rows, exports, rankings, assignments, answers, items, campaigns, api_tokens, labelers RESTART IDENTITY CASCADE"))
    app.state.engine.dispose()

    monkeypatch.setattr(hotpath, "PG_FUNCTIONS", False)
    app = create_app(settings)
    assert isinstance(app.state.hot, hotpath.WriterHotPath)
    units = _script(app)
    app.state.engine.dispose()

    assert [row[2] for row in functions if len(row) == 4] == [
        404, 404, 200, 200, 200, 200, 200, 422, 422, 422, 201, 200, 409, 409, 409, 200, 200, 200, 409, 404, 409, 409, 404, 404,
        200, 409, 200, 200, 201, 200, 201, 200, 200, 200, 204, 200, 401, 401, 401, 401, 401, 401, 401,
    ]  # fmt: skip
    for f, u in zip(functions, units, strict=True):
        assert f == u


def test_group_commit_batches_waits_alone_and_a_failed_batch_costs_only_its_unit(settings) -> None:
    """Concurrent calls share a transaction; a call that would wait for a row lock another
    transaction holds leaves the batch and waits on its own; a statement that fails makes every
    call of its batch run again alone, so only its own request fails."""
    import asyncio

    import psycopg
    from sqlalchemy.exc import DBAPIError

    from feedback_service import service
    from feedback_service.app import create_app
    from feedback_service.db import session_scope
    from feedback_service.schemas import CampaignCreate, ItemCreate, LabelerCreate, RankingCreate

    app = create_app(settings)
    hot = app.state.hot
    assert isinstance(hot, hotpath.PgHotPath) and hot.group_commit
    with session_scope(app.state.sessionmaker) as s:
        c = service.create_campaign(s, CampaignCreate(name="g", overlap=2), T0, 600)
        service.import_items(s, c, [ItemCreate.model_validate(item(f"p{k}")) for k in range(6)], T0)
        actors = []
        for k in range(8):
            labeler, _, token = service.create_labeler(s, LabelerCreate(name=f"lab{k}"), T0)
            actors.append(service.Actor(labeler.id, "labeler", token.id))
        campaign = c.id
    pg = psycopg.connect(settings.db_url.replace("+psycopg", ""))  # another transaction, to hold a row lock

    async def main() -> None:
        leases = await asyncio.gather(*(hot.next_assignment(campaign, a, T0) for a in actors))
        assert hot.batches >= 1  # the first call may go alone, the others queue behind it
        held = [(lease.item.id, [x.id for x in lease.item.answers]) for lease in leases]
        assert max(sorted(i for i, _ in held).count(i) for i, _ in held) == 2  # overlap 2, 8 labelers: 4 items twice

        # labeler 0's item is locked by another transaction: its rankings wait alone until the
        # lock goes, the others commit meanwhile
        pg.execute("SELECT id FROM items WHERE id = %s FOR UPDATE", (held[0][0],))
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, pg.commit)
        batches, alone = hot.batches, hot.alone
        results = await asyncio.gather(*(hot.submit_ranking(i, a, RankingCreate(ranking=ids), T0) for a, (i, ids) in zip(actors[:4], held)))
        assert all(created for _, created in results)
        assert hot.batches == batches + 1 and hot.alone == alone + sum(i == held[0][0] for i, _ in held[:4])
        alone = hot.alone

        # a statement that fails (an answer id beyond bigint; the API refuses it before) fails its
        # batch: every other call of it runs again alone and is stored
        bad = RankingCreate.model_construct(ranking=[*held[4][1], 2**63], rationale=None)
        calls = [hot.submit_ranking(held[4][0], actors[4], bad, T0)]
        calls += [hot.submit_ranking(i, a, RankingCreate(ranking=ids), T0) for a, (i, ids) in zip(actors[5:], held[5:])]
        outcome = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcome[0], DBAPIError)
        assert all(created for _, created in outcome[1:])
        assert hot.alone == alone + 4

    try:
        asyncio.run(main())
    finally:
        pg.close()
    with app.state.engine.connect() as conn:
        stored = conn.execute(text("SELECT labeler_id FROM rankings ORDER BY labeler_id")).scalars().all()
    assert stored == [a.id for a in actors[:4]] + [a.id for a in actors[5:]]
    app.state.engine.dispose()
