"""The service end to end over HTTP, through the Python client, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from sqlalchemy import text

from feedback_service.client import FeedbackClient, FeedbackError

from fs_helpers import ADMIN_TOKEN, item


@pytest.fixture
def make_labeler(admin, live):
    made = []

    def make(name: str, role: str = "labeler") -> FeedbackClient:
        created = admin.create_labeler(name, role)
        client = FeedbackClient(live.url, created["token"], retries=0)
        client.labeler_id = created["labeler"]["id"]  # type: ignore[attr-defined]
        client.token_id = created["token_id"]  # type: ignore[attr-defined]
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


def rank_all(client: FeedbackClient, campaign_id: int, order=lambda ids: ids) -> list[dict]:  # noqa: ANN001
    """Rank every item offered to this labeler (answers in ``order``); returns the rankings."""
    out = []
    while (a := client.next_item(campaign_id)) is not None:
        ids = [x["id"] for x in a["item"]["answers"]]
        out.append(client.submit_ranking(a["item"]["id"], order(ids)))
    return out


# ---- auth and roles ------------------------------------------------------------------------


def test_every_endpoint_but_health_needs_a_token(live) -> None:
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    for method, path in [("GET", "/api/v1/me"), ("GET", "/api/v1/campaigns"), ("POST", "/api/v1/campaigns/1/next"), ("GET", "/metrics"), ("GET", "/api/v1/exports")]:
        r = httpx.request(method, f"{live.url}{path}")
        assert r.status_code == 401, (method, path)
        r = httpx.request(method, f"{live.url}{path}", headers={"Authorization": "Bearer alf_wrong"})
        assert r.status_code == 401, (method, path)


def test_tokens_are_stored_hashed_and_revocation_is_immediate(admin, make_labeler, app) -> None:
    bob = make_labeler("bob")
    assert bob.me()["labeler"]["name"] == "bob"
    with app.state.engine.connect() as conn:
        stored = [row[0] for row in conn.execute(text("SELECT token_hash FROM api_tokens"))]
    token = bob._http.headers["Authorization"].split()[1]
    assert token not in stored and all(len(h) == 64 for h in stored)
    admin.revoke_token(bob.token_id)
    with pytest.raises(FeedbackError) as e:
        bob.me()
    assert e.value.status == 401
    # a new token works, deactivation revokes every token of the labeler
    fresh = admin.issue_token(bob.labeler_id)
    bob2 = FeedbackClient(admin.base_url, fresh["token"])
    assert bob2.me()["labeler"]["id"] == bob.labeler_id
    admin.deactivate_labeler(bob.labeler_id)
    with pytest.raises(FeedbackError) as e:
        bob2.me()
    assert e.value.status == 401


def test_revocation_by_another_process_is_refused_at_once_on_the_hot_routes(admin, make_labeler, app) -> None:
    """Lease, rank and skip remember who a token belongs to (no lookup per request), but re-check
    it in their own write transaction: a revocation committed elsewhere (another worker process,
    here a plain SQL update that this process's cache never hears of) is refused at once."""
    c = admin.create_campaign("c", overlap=1)
    admin.add_items(c["id"], [item(f"p{k}") for k in range(3)])
    bob, eve = make_labeler("bob"), make_labeler("eve")
    held = bob.next_item(c["id"])  # bob's and eve's tokens are now in the actor cache
    eve_held = eve.next_item(c["id"])
    ids = [x["id"] for x in held["item"]["answers"]]
    with app.state.engine.begin() as conn:
        conn.execute(text("UPDATE api_tokens SET revoked_at = created_at WHERE id = :t"), {"t": bob.token_id})
        conn.execute(text("UPDATE labelers SET active = :f WHERE id = :l"), {"f": False, "l": eve.labeler_id})
    for client, call in (
        (bob, lambda: bob.submit_ranking(held["item"]["id"], ids)),
        (bob, lambda: bob.next_item(c["id"])),
        (bob, lambda: bob.skip(held["item"]["id"])),
        (bob, lambda: bob.next_item(999)),  # 401 before 404
        (eve, lambda: eve.submit_ranking(eve_held["item"]["id"], [x["id"] for x in eve_held["item"]["answers"]])),
        (eve, lambda: eve.skip(eve_held["item"]["id"])),
    ):
        with pytest.raises(FeedbackError) as e:
            call()
        assert e.value.status == 401, e.value
    assert admin.list_rankings() == [] and admin.stats(c["id"])["skips"] == 0


def test_labeler_gets_403_on_admin_endpoints(admin, make_labeler) -> None:
    c = admin.create_campaign("c", overlap=1)
    bob = make_labeler("bob")
    for call in (
        lambda: bob.create_campaign("x"),
        lambda: bob.create_labeler("eve"),
        lambda: bob.add_items(c["id"], [item("p")]),
        lambda: bob.export(c["id"]),
        lambda: bob.list_exports(),
        lambda: bob.quality(c["id"]),
        lambda: bob.stats(c["id"]),
        lambda: bob.metrics(),
        lambda: bob.list_labelers(),
        lambda: bob.list_rankings(labeler_id=1),
    ):
        with pytest.raises(FeedbackError) as e:
            call()
        assert e.value.status == 403


def test_labeler_sees_only_own_items_and_rankings(admin, make_labeler) -> None:
    c = admin.create_campaign("c", overlap=1)
    admin.add_items(c["id"], [item("p1"), item("p2")])
    bob, eve = make_labeler("bob"), make_labeler("eve")
    a_bob = bob.next_item(c["id"])
    a_eve = eve.next_item(c["id"])
    assert a_bob["item"]["id"] != a_eve["item"]["id"]
    assert "gold_answer_id" not in a_bob["item"]
    r_bob = bob.submit_ranking(a_bob["item"]["id"], [x["id"] for x in a_bob["item"]["answers"]])
    with pytest.raises(FeedbackError) as e:
        eve.get_item(a_bob["item"]["id"])
    assert e.value.status == 404
    with pytest.raises(FeedbackError) as e:
        eve._json("GET", f"/api/v1/rankings/{r_bob['id']}")
    assert e.value.status == 404
    with pytest.raises(FeedbackError) as e:  # ranking an item that is not yours
        eve.submit_ranking(a_bob["item"]["id"], [x["id"] for x in a_bob["item"]["answers"]])
    assert e.value.status == 404
    assert eve.list_rankings() == []
    assert [r["id"] for r in bob.list_rankings()] == [r_bob["id"]]
    assert eve.get_item(a_eve["item"]["id"])["id"] == a_eve["item"]["id"]
    assert len(admin.list_rankings()) == 1


# ---- campaigns and items -------------------------------------------------------------------


def test_items_bulk_ndjson_dedup_and_provenance(admin) -> None:
    c = admin.create_campaign("c", guidelines="be kind", overlap=2)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}], "answers": item("x")["answers"]}
    out = admin.add_items(c["id"], [item("p1", gold_best=1), item("p2"), item("p1", gold_best=1), chat])
    assert out["created"] == 3 and out["duplicates"] == 1
    assert out["item_ids"][0] == out["item_ids"][2]
    again = admin.add_items(c["id"], [item("p2"), chat])
    assert again == {"created": 0, "duplicates": 2, "item_ids": [out["item_ids"][1], out["item_ids"][3]]}
    stored = admin.get_item(out["item_ids"][0])
    assert stored["answers"][1]["id"] == stored["gold_answer_id"]
    assert stored["answers"][0]["model_id"] == "sft-tiny" and stored["answers"][0]["sampling"] == {"temperature": 0.7, "seed": 0}
    chat_item = admin.get_item(out["item_ids"][3])
    assert chat_item["prompt"] == "2+2?" and len(chat_item["messages"]) == 3
    # the same content in another campaign is a new item
    c2 = admin.create_campaign("c2")
    assert admin.add_items(c2["id"], [item("p1")])["created"] == 1


def test_bulk_import_reports_bad_lines_and_stores_nothing(admin, live) -> None:
    c = admin.create_campaign("c")
    body = "\n".join([json.dumps(item("ok")), "{not json", json.dumps({"prompt": "one answer", "answers": [{"text": "a", "model_id": "m"}]}), json.dumps({**item("z"), "extra": 1})])
    r = httpx.post(f"{live.url}/api/v1/campaigns/{c['id']}/items/bulk", content=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/x-ndjson"})
    assert r.status_code == 422
    lines = {e["loc"][1] for e in r.json()["detail"]}
    assert lines == {"line 2", "line 3", "line 4"}
    assert admin.stats(c["id"])["items"] == 0


def test_campaign_validation_is_422_and_duplicates_409(admin) -> None:
    admin.create_campaign("c")
    with pytest.raises(FeedbackError) as e:
        admin.create_campaign("c")
    assert e.value.status == 409
    for bad in ({"name": "", "overlap": 1}, {"name": "x", "overlap": 0}, {"name": "x", "unknown": 1}, {"name": "x\u0000"}):
        with pytest.raises(FeedbackError) as e:
            admin._json("POST", "/api/v1/campaigns", json=bad)
        assert e.value.status == 422, bad


# ---- assignment ----------------------------------------------------------------------------


def test_overlap_skip_and_exhaustion(admin, make_labeler) -> None:
    c = admin.create_campaign("c", overlap=2)
    admin.add_items(c["id"], [item("p1"), item("p2")])
    a, b, d = make_labeler("a"), make_labeler("b"), make_labeler("d")
    first = a.next_item(c["id"])
    assert a.next_item(c["id"])["item"]["id"] == first["item"]["id"]  # the held lease comes back
    a.skip(first["item"]["id"])
    second = a.next_item(c["id"])
    assert second["item"]["id"] != first["item"]["id"]  # a skipped item is not offered again
    a.submit_ranking(second["item"]["id"], [x["id"] for x in second["item"]["answers"]])
    assert a.next_item(c["id"]) is None
    assert len(rank_all(b, c["id"])) == 2
    # p1: b ranked it, a skipped (slot freed) → d gets it; p2 now has a and b = overlap 2
    got = rank_all(d, c["id"])
    assert [r["item_id"] for r in got] == [first["item"]["id"]]
    assert a.progress(c["id"]) == {"campaign_id": c["id"], "items_total": 2, "items_complete": 2, "my_rankings": 1, "my_skips": 1}
    s = admin.stats(c["id"])
    assert (s["rankings"], s["skips"], s["queue_depth"], s["items_complete"]) == (4, 1, 0, 2)


def test_lease_several_items_at_once(admin, make_labeler, app, live) -> None:
    now = [datetime(2026, 1, 1, 12, 0, 0)]
    app.state.clock = lambda: now[0]
    c = admin.create_campaign("c", overlap=2, lease_seconds=60)
    ids = admin.add_items(c["id"], [item(f"p{k}") for k in range(4)])["item_ids"]
    a, b, d = make_labeler("a"), make_labeler("b"), make_labeler("d")
    first = a.next_item(c["id"])
    got = a.lease_items(c["id"], 3)  # the lease already held counts, and comes first
    assert [x["item"]["id"] for x in got] == ids[:3] and got[0]["assignment_id"] == first["assignment_id"]
    assert a.next_item(c["id"])["item"]["id"] == ids[0]  # next returns the oldest lease held
    assert [x["item"]["id"] for x in a.lease_items(c["id"], 2)] == ids[:2]  # never gives leases back
    assert [x["item"]["id"] for x in b.lease_items(c["id"], 10)] == ids  # overlap 2: b may take all four
    assert d.lease_items(c["id"], 10)[0]["item"]["id"] == ids[3]  # slots left: only the one a did not take
    assert len(d.lease_items(c["id"], 10)) == 1
    for x in got:  # ranked one by one, like leases from next
        a.submit_ranking(x["item"]["id"], [ans["id"] for ans in x["item"]["answers"]])
    assert a.lease_items(c["id"], 5) == []  # a ranked 3, the 4th is taken by b and d
    s = admin.stats(c["id"])
    assert (s["rankings"], s["active_leases"]) == (3, 5)
    now[0] += timedelta(seconds=61)  # every lease expired: b's and d's items come back
    assert [x["item"]["id"] for x in a.lease_items(c["id"], 5)] == [ids[3]]
    for bad in ("0", "101", "x"):
        r = httpx.post(f"{live.url}/api/v1/campaigns/{c['id']}/leases", params={"count": bad}, headers=a._http.headers)
        assert r.status_code == 422, bad
    with pytest.raises(FeedbackError) as e:
        a.lease_items(999, 1)
    assert e.value.status == 404


def test_lease_expiry_returns_item_to_queue(admin, make_labeler, app) -> None:
    now = [datetime(2026, 1, 1, 12, 0, 0)]
    app.state.clock = lambda: now[0]
    c = admin.create_campaign("c", overlap=1, lease_seconds=60)
    admin.add_items(c["id"], [item("p1")])
    a, b = make_labeler("a"), make_labeler("b")
    held = a.next_item(c["id"])
    assert b.next_item(c["id"]) is None
    assert admin.stats(c["id"])["queue_depth"] == 0
    now[0] += timedelta(seconds=61)
    assert admin.stats(c["id"])["queue_depth"] == 1
    got = b.next_item(c["id"])
    assert got["item"]["id"] == held["item"]["id"]
    ids = [x["id"] for x in held["item"]["answers"]]
    with pytest.raises(FeedbackError) as e:  # a's lease expired and b holds the item now
        a.submit_ranking(held["item"]["id"], ids)
    assert e.value.status == 409 and "expired" in e.value.detail
    b.submit_ranking(got["item"]["id"], ids)


def test_late_submission_after_expiry_accepted_while_slot_free(admin, make_labeler, app) -> None:
    now = [datetime(2026, 1, 1, 12, 0, 0)]
    app.state.clock = lambda: now[0]
    c = admin.create_campaign("c", overlap=1, lease_seconds=60)
    admin.add_items(c["id"], [item("p1")])
    a = make_labeler("a")
    held = a.next_item(c["id"])
    now[0] += timedelta(hours=1)
    r = a.submit_ranking(held["item"]["id"], [x["id"] for x in held["item"]["answers"]])
    assert r["item_id"] == held["item"]["id"]


# ---- rankings ------------------------------------------------------------------------------


def test_ranking_validation_names_what_is_wrong(admin, make_labeler, live) -> None:
    c = admin.create_campaign("c")
    admin.add_items(c["id"], [item("p1", n=3)])
    bob = make_labeler("bob")
    a = bob.next_item(c["id"])
    i, (x, y, z) = a["item"]["id"], [ans["id"] for ans in a["item"]["answers"]]
    cases = {
        "missing answer ids: [%d]" % z: [x, y],
        "listed more than once: [%d]" % x: [x, [x, y], z],
        "not answers of item %d: [999]" % i: [x, y, z, 999],
    }
    for expected, ranking in cases.items():
        with pytest.raises(FeedbackError) as e:
            bob.submit_ranking(i, ranking)
        assert e.value.status == 422
        assert e.value.detail[0]["loc"] == ["body", "ranking"] and expected in e.value.detail[0]["msg"], e.value.detail
    for body in ({"ranking": []}, {"ranking": "x"}, {"ranking": [x, y, z], "extra": 1}, {"ranking": [[]]}, {"ranking": [x, y, 0]}, {}):
        r = httpx.post(f"{live.url}/api/v1/items/{i}/rankings", json=body, headers=bob._http.headers)
        assert r.status_code == 422, body
    assert bob.list_rankings() == []


def test_submission_is_idempotent(admin, make_labeler) -> None:
    c = admin.create_campaign("c")
    admin.add_items(c["id"], [item("p1", n=3)])
    bob = make_labeler("bob")
    a = bob.next_item(c["id"])
    i, (x, y, z) = a["item"]["id"], [ans["id"] for ans in a["item"]["answers"]]
    first = bob._call("POST", f"/api/v1/items/{i}/rankings", json={"ranking": [z, [y, x]], "rationale": "z is right"})
    again = bob._call("POST", f"/api/v1/items/{i}/rankings", json={"ranking": [z, [x, y]], "rationale": "z is right"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json() and first.json()["ranking"] == [[z], [x, y]]
    with pytest.raises(FeedbackError) as e:
        bob.submit_ranking(i, [x, y, z])
    assert e.value.status == 409
    assert len(admin.list_rankings()) == 1
    assert admin.stats(c["id"])["rankings"] == 1


# ---- export --------------------------------------------------------------------------------


def _campaign_with_three_labelers(admin, make_labeler):  # noqa: ANN001, ANN202
    """Two items, three labelers; on item 1 they agree (0 > 1 > 2), on item 2 they split."""
    c = admin.create_campaign("prefs", overlap=3)
    ids = admin.add_items(c["id"], [item("agree"), item("split", n=2)])["item_ids"]
    orders = {"l1": lambda a: a, "l2": lambda a: a, "l3": lambda a: a if len(a) == 3 else a[::-1]}
    for name, order in orders.items():
        rank_all(make_labeler(name), c["id"], order)
    return c, ids


def test_export_aggregations_and_disagreement(admin, make_labeler, tmp_path) -> None:
    c, (agree, split) = _campaign_with_three_labelers(admin, make_labeler)
    texts = {k: f"agree / answer {k}" for k in range(3)}
    ex = admin.export(c["id"], strategy="all_pairs", aggregation="majority")
    rows = [r for r in ex.rows if r["item_id"] == agree]
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in rows] == [(texts[0], texts[1], 1.0), (texts[0], texts[2], 1.0), (texts[1], texts[2], 1.0)]
    split_rows = [r for r in ex.rows if r["item_id"] == split]
    assert [(r["chosen"], r["rejected"]) for r in split_rows] == [("split / answer 0", "split / answer 1")]
    assert split_rows[0]["margin"] == pytest.approx(1 / 3)
    r0 = rows[0]
    assert set(r0) == {"prompt", "chosen", "rejected", "margin", "item_id", "campaign", "labeler_ids", "created_at"}
    assert r0["prompt"] == "agree" and r0["campaign"] == "prefs" and len(r0["labeler_ids"]) == 3

    best = admin.export(c["id"], strategy="best_vs_rest", aggregation="mean_rank")
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in best.rows if r["item_id"] == agree] == [(texts[0], texts[1], 1.0), (texts[0], texts[2], 2.0)]

    per_ranking = admin.export(c["id"], aggregation="none")
    assert len(per_ranking.rows) == 3 * 3 + 3 * 1
    # split item: 2 vs 1 votes → disagreement 1/3; dropped at a threshold of 0.2
    strict = admin.export(c["id"], aggregation="majority", max_disagreement=0.2)
    assert strict.info["dropped_items"] == [split]
    assert {r["item_id"] for r in strict.rows} == {agree}


def test_export_is_versioned_immutable_and_incremental(admin, make_labeler, tmp_path) -> None:
    c = admin.create_campaign("c", overlap=1)
    admin.add_items(c["id"], [item(f"p{k}") for k in range(4)])
    bob = make_labeler("bob")
    for _ in range(2):
        a = bob.next_item(c["id"])
        bob.submit_ranking(a["item"]["id"], [x["id"] for x in a["item"]["answers"]])
    first = admin.export(c["id"], aggregation="none", jsonl_path=tmp_path / "v1.jsonl", dataset_dir=tmp_path / "v1_ds")
    assert first.info["since_watermark"] == 0 and len(first.rows) == 2 * 3
    rank_all(bob, c["id"])
    second = admin.export(c["id"], aggregation="none", since_last=True)
    assert second.version > first.version and second.info["since_watermark"] == first.watermark
    assert second.watermark > first.watermark
    assert len(second.rows) == 2 * 3 and not {r["item_id"] for r in first.rows} & {r["item_id"] for r in second.rows}
    # the first version is unchanged, byte for byte
    again = admin.get_export(first.version)
    assert again.rows == first.rows and again.info == first.info
    assert (tmp_path / "v1.jsonl").read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in first.rows]
    # explicit since_watermark equals since_last; nothing new → an empty export with the same watermark
    explicit = admin.export(c["id"], aggregation="none", since_watermark=first.watermark)
    assert explicit.rows == second.rows
    empty = admin.export(c["id"], aggregation="none", since_last=True)
    assert empty.rows == [] and empty.watermark == explicit.watermark
    full = admin.export(c["id"], aggregation="none")
    assert len(full.rows) == 4 * 3
    assert [e["id"] for e in admin.list_exports(c["id"])] == [first.version, second.version, explicit.version, empty.version, full.version]


def test_stats_since_watermark_counts_new_rankings(admin, make_labeler, live) -> None:
    c = admin.create_campaign("c", overlap=1)
    other = admin.create_campaign("other", overlap=1)
    admin.add_items(c["id"], [item(f"p{k}") for k in range(5)])
    admin.add_items(other["id"], [item("o1")])
    s = admin.stats(c["id"])
    assert (s["rankings"], s["max_ranking_id"], s["rankings_since"]) == (0, 0, 0)
    assert admin.stats(c["id"], since_watermark=0)["rankings_since"] == 0
    bob = make_labeler("bob")
    for _ in range(2):
        a = bob.next_item(c["id"])
        bob.submit_ranking(a["item"]["id"], [x["id"] for x in a["item"]["answers"]])
    first = admin.export(c["id"], aggregation="none")
    s = admin.stats(c["id"])
    assert s["rankings"] == s["rankings_since"] == 2 and first.watermark >= s["max_ranking_id"] > 0
    assert admin.stats(c["id"], since_watermark=first.watermark)["rankings_since"] == 0
    rank_all(bob, other["id"])  # another campaign's ranking counts in neither field
    mine = rank_all(bob, c["id"])
    assert len(mine) == 3
    s = admin.stats(c["id"], since_watermark=first.watermark)
    assert s["rankings"] == 5 and s["rankings_since"] == 3 and s["max_ranking_id"] == max(r["id"] for r in mine)
    assert admin.stats(c["id"], since_watermark=0)["rankings_since"] == 5
    assert admin.stats(c["id"], since_watermark=s["max_ranking_id"])["rankings_since"] == 0
    assert admin.export(c["id"], aggregation="none", since_last=True).watermark >= s["max_ranking_id"]
    o = admin.stats(other["id"], since_watermark=first.watermark)
    assert (o["rankings"], o["rankings_since"]) == (1, 1) and first.watermark < o["max_ranking_id"] < s["max_ranking_id"]
    for bad in ("-1", "x", str(2**62 + 1)):
        r = httpx.get(f"{live.url}/api/v1/campaigns/{c['id']}/stats", params={"since_watermark": bad}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 422, bad
    with pytest.raises(FeedbackError) as e:
        bob.stats(c["id"], since_watermark=0)
    assert e.value.status == 403


def test_export_dataset_dir_loads_with_datasets(admin, make_labeler, tmp_path) -> None:
    import datasets

    c = admin.create_campaign("c")
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}], "answers": [{"text": "4", "model_id": "m"}, {"text": "5", "model_id": "m"}]}
    admin.add_items(c["id"], [item("plain", n=2), chat])
    rank_all(make_labeler("bob"), c["id"])
    ex = admin.export(c["id"], aggregation="majority", jsonl_path=tmp_path / "p.jsonl", dataset_dir=tmp_path / "ds")
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert ds.num_rows == 2 and ds.column_names[:8] == ["prompt", "chosen", "rejected", "margin", "item_id", "campaign", "labeler_ids", "created_at"]
    chat_row = [r for r in ds if r["messages"] is not None][0]
    assert chat_row["prompt"] == "2+2?" and chat_row["chosen"] == "4" and chat_row["messages"][0] == {"role": "system", "content": "be brief"}
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines == ex.rows and sum("messages" in x for x in lines) == 1


def test_aggregated_incremental_export_takes_items_once_complete(admin, make_labeler) -> None:
    c = admin.create_campaign("c", overlap=2)
    admin.add_items(c["id"], [item("p1")])
    a, b = make_labeler("a"), make_labeler("b")
    rank_all(a, c["id"])
    first = admin.export(c["id"], since_last=True)
    assert first.rows == []  # 1 of 2 rankings: not complete yet
    rank_all(b, c["id"])
    second = admin.export(c["id"], since_last=True)
    assert len(second.rows) == 3 and second.rows[0]["labeler_ids"] == sorted([a.labeler_id, b.labeler_id])
    assert admin.export(c["id"], since_last=True).rows == []


def test_empty_export_still_writes_loadable_files(admin, tmp_path) -> None:
    import datasets

    c = admin.create_campaign("c")
    ex = admin.export(c["id"], jsonl_path=tmp_path / "e.jsonl", dataset_dir=tmp_path / "e")
    assert ex.rows == [] and ex.watermark == 0 and (tmp_path / "e.jsonl").read_text() == ""
    assert datasets.load_from_disk(str(tmp_path / "e")).num_rows == 0


# ---- quality and metrics -------------------------------------------------------------------


def test_quality_alpha_agreement_and_gold(admin, make_labeler) -> None:
    c = admin.create_campaign("q", overlap=3)
    admin.add_items(c["id"], [item("g1", gold_best=0), item("g2", gold_best=2)])
    good = lambda ids: ids  # noqa: E731  answer 0 first
    rank_all(make_labeler("l1"), c["id"], good)
    rank_all(make_labeler("l2"), c["id"], good)
    rank_all(make_labeler("l3"), c["id"], lambda ids: ids[::-1])  # answer 2 first
    q = admin.quality(c["id"])
    assert q["rankings"] == 6 and q["items_multi_ranked"] == 2
    by_name = {lab["name"]: lab for lab in q["labelers"]}
    # l1 vs others {l2 agrees, l3 opposite}: every pair 1-1 → nothing judged
    assert by_name["l1"]["agreement"] is None and by_name["l1"]["agreement_pairs"] == 0
    assert by_name["l3"]["agreement"] == 0.0 and by_name["l3"]["agreement_pairs"] == 6
    assert (by_name["l1"]["gold_items"], by_name["l1"]["gold_accuracy"]) == (2, 0.5)
    assert by_name["l3"]["gold_accuracy"] == 0.5
    # per item: ranks (1,2,3),(1,2,3),(3,2,1) on three answers; worked value from the same formula
    from feedback_service.quality import krippendorff_alpha

    expected = krippendorff_alpha({i: {1: [[0], [1], [2]], 2: [[0], [1], [2]], 3: [[2], [1], [0]]} for i in (1, 2)})
    assert q["alpha"] == pytest.approx(expected) and q["alpha"] < 0.5


def test_metrics_prometheus_format(admin, make_labeler) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    c = admin.create_campaign("m", overlap=1)
    admin.add_items(c["id"], [item("p1"), item("p2"), item("p3")])
    rank_all(make_labeler("bob"), c["id"])
    admin.add_items(c["id"], [item("p4")])
    families = {f.name: f for f in text_string_to_metric_families(admin.metrics())}
    assert families["feedback_rankings_stored"].samples[0].value == 3
    assert [s.value for s in families["feedback_queue_depth"].samples] == [1.0]
    reqs = {(s.labels["route"], s.labels["status"]): s.value for s in families["feedback_http_requests"].samples if s.name.endswith("_total")}
    assert reqs[("/api/v1/items/{item_id}/rankings", "201")] == 3
    assert any(s.name.endswith("_bucket") for s in families["feedback_http_request_duration_seconds"].samples)


def test_body_size_limit(admin, live, settings) -> None:
    c = admin.create_campaign("c")
    big = {"name": "x", "guidelines": "a" * (settings.max_body_bytes + 10)}
    r = httpx.post(f"{live.url}/api/v1/campaigns", json=big, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 413

    def chunks():  # no Content-Length: chunked upload, cut off while streaming
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{live.url}/api/v1/campaigns", content=chunks(), headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 413
    assert [x["name"] for x in admin.list_campaigns()] == ["c"]
    # the bulk endpoint has its own, larger limit
    r = httpx.post(f"{live.url}/api/v1/campaigns/{c['id']}/items/bulk", content=json.dumps(item("p" * 2_000_000)), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 422  # past the body limit; refused by the field's own length limit



def test_client_timestamps_are_utc(admin) -> None:
    c = admin.create_campaign("c")
    created = datetime.fromisoformat(c["created_at"])
    assert created.tzinfo is not None and abs(created - datetime.now(timezone.utc)) < timedelta(minutes=5)


def test_concurrent_creates_with_one_name_never_500(admin, live) -> None:
    import threading

    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def create() -> None:
        barrier.wait()
        r = httpx.post(f"{live.url}/api/v1/labelers", json={"name": "same"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [201] + [409] * 5
    assert [lab["name"] for lab in admin.list_labelers()].count("same") == 1


def test_large_export_streams_every_row_in_order(admin, make_labeler) -> None:
    c = admin.create_campaign("big")
    admin.add_items(c["id"], [item(f"p{k}", n=16) for k in range(9)])  # 9 x C(16, 2) = 1,080 pairs
    rank_all(make_labeler("bob"), c["id"])
    ex = admin.export(c["id"], aggregation="none")
    assert ex.info["row_count"] == len(ex.rows) == 9 * 120
    assert [r["item_id"] for r in ex.rows] == sorted(r["item_id"] for r in ex.rows)
    assert len({(r["item_id"], r["chosen"], r["rejected"]) for r in ex.rows}) == 1080
