"""Group commit (SQLite): many requests' writes in one transaction, a savepoint each."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from sqlalchemy import func, select

from feedback_service.db import make_engine, make_sessionmaker, migrate
from feedback_service.errors import Conflict
from feedback_service.models import Labeler
from feedback_service.writer import Writer


@pytest.fixture
def writer(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    w = Writer(make_sessionmaker(engine), group_commit=engine.dialect.name == "sqlite")
    yield w
    engine.dispose()


def _add(name: str, fail_after_write: bool = False):  # noqa: ANN202
    def unit(session):  # noqa: ANN001, ANN202
        session.add(Labeler(name=name, role="labeler", active=True, created_at=datetime(2026, 1, 1)))
        session.flush()
        if fail_after_write:
            raise Conflict(f"{name} refused after writing")
        return name

    return unit


def _names(writer: Writer) -> set[str]:
    with writer.factory() as s:
        return set(s.scalars(select(Labeler.name)))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL runs each unit on its own
def test_units_queue_into_one_commit_and_failures_stay_local(writer: Writer) -> None:
    assert writer.group_commit
    gate = threading.Event()
    results: dict[str, object] = {}

    def blocker(session):  # noqa: ANN001, ANN202
        gate.wait(30)  # holds the writer thread while the others queue up
        return "blocker"

    def call(key: str, unit) -> None:  # noqa: ANN001
        try:
            results[key] = writer.run(unit)
        except Exception as e:  # noqa: BLE001
            results[key] = e

    threads = [threading.Thread(target=call, args=("blocker", blocker))]
    threads[0].start()
    while writer.units == 0 and writer._queue.qsize() > 0:  # wait until the writer took the blocker
        time.sleep(0.01)
    time.sleep(0.1)
    units = {f"ok{k}": _add(f"ok{k}") for k in range(8)} | {"bad": _add("bad", fail_after_write=True)}
    for key, unit in units.items():
        threads.append(threading.Thread(target=call, args=(key, unit)))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while writer._queue.qsize() < len(units) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(30)

    assert writer.batches == 2 and writer.units == 10  # the blocker alone, then the nine together
    assert isinstance(results["bad"], Conflict)
    assert all(results[f"ok{k}"] == f"ok{k}" for k in range(8))
    assert _names(writer) == {f"ok{k}" for k in range(8)}  # "bad" was rolled back to its savepoint


def test_a_failed_unit_leaves_nothing_and_the_next_one_works(writer: Writer) -> None:
    with pytest.raises(Conflict):
        writer.run(_add("x", fail_after_write=True))
    assert writer.run(_add("y")) == "y"
    assert _names(writer) == {"y"}
    with writer.factory() as s:
        assert s.scalar(select(func.count()).select_from(Labeler)) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_async_submits_are_group_committed_and_a_broken_flush_costs_only_its_unit(writer: Writer) -> None:
    """submit() (the app's path): units queued while a batch commits form the next batch; a unit
    whose ORM flush fails (here a duplicate name) breaks the transaction, so it gets its error and
    the other units of its batch run again in a new one; nobody is answered before the commit."""
    import asyncio

    from sqlalchemy.exc import IntegrityError

    async def main() -> list:
        units = [_add(f"a{k}") for k in range(30)] + [_add("a3"), _add("bad", fail_after_write=True), _add("z")]
        return await asyncio.gather(*(writer.submit(u) for u in units), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:30] == [f"a{k}" for k in range(30)] and results[-1] == "z"
    assert isinstance(results[30], IntegrityError) and isinstance(results[31], Conflict)
    assert _names(writer) == {f"a{k}" for k in range(30)} | {"z"}
    assert 1 <= writer.batches < 30  # grouped (the first unit may go alone)
