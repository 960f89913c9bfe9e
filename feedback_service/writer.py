"""Units of write work, committed durably before their requests are answered.

SQLite commits one writer at a time and each commit waits for an fsync (``synchronous=FULL``), so
one commit per request caps throughput at the disk's fsync rate. ``Writer`` therefore runs the
hot write paths (lease, rank, skip) of many concurrent requests in one thread, each unit inside
its own SAVEPOINT, and commits the batch once: group commit. A unit that fails rolls back only
its savepoint; if the commit itself fails, every request of the batch gets the error. Nobody is
answered before the commit returned. PostgreSQL groups concurrent commits by itself, so there a
unit simply runs in the caller's thread in a transaction of its own (row locks keep it correct).

A unit must return plain values (e.g. Public schemas), not ORM rows: the session closes after the
commit, and another unit's rollback may expire rows they share.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
Unit = Callable[[Session], T]

_IDLE_EXIT_S = 5.0  # the writer thread exits when idle this long and restarts on demand


class Writer:
    def __init__(self, factory: sessionmaker[Session], group_commit: bool, max_batch: int = 128) -> None:
        self.factory, self.group_commit, self.max_batch = factory, group_commit, max_batch
        self._queue: queue.SimpleQueue[tuple[Unit, Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # how many commits the writer made (tests and metrics)
        self.units = 0

    def run(self, unit: Unit[T]) -> T:
        """Run ``unit(session)`` and commit; returns its value once it is durable."""
        if not self.group_commit:
            with self.factory() as session:
                out = unit(session)
                session.commit()
                return out
        future: Future = Future()
        self._queue.put((unit, future))
        self._ensure_thread()
        return future.result()

    async def submit(self, unit: Unit[T]) -> T:
        """``run`` for async callers: the event loop is not blocked while the batch commits."""
        if not self.group_commit:
            return await run_in_threadpool(self.run, unit)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._queue.put((unit, _LoopFuture(loop, waiter)))
        self._ensure_thread()
        return await waiter

    def _ensure_thread(self) -> None:
        if self._thread is not None:  # fast path; see the idle exit in _loop for why this is safe
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="feedback-writer", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=_IDLE_EXIT_S)
            except queue.Empty:
                with self._start_lock:
                    if not self._queue.empty():
                        continue
                    self._thread = None
                # A unit put after the emptiness check may have seen this thread still set and not
                # started another one: look again now that _thread is None.
                if not self._queue.empty():
                    self._ensure_thread()
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._commit_batch(batch)
            except BaseException as e:  # noqa: BLE001  never let the writer thread die with waiters queued
                _deliver([(waiter, None, e) for _, waiter in batch])

    def _commit_batch(self, batch: list[tuple[Unit, Any]]) -> None:
        """Run the batch's units in one transaction, a savepoint each, commit once, then answer."""
        while batch:
            outcomes, batch = self._try_batch(batch)
            _deliver(outcomes)

    def _try_batch(self, batch: list[tuple[Unit, Any]]) -> tuple[list[tuple[Any, object, BaseException | None]], list[tuple[Unit, Any]]]:
        """(outcomes to deliver, units to run again in a new transaction)."""
        outcomes: list[tuple[Any, object, BaseException | None]] = []  # (waiter, value, error)
        try:
            with self.factory() as session:
                # SAVEPOINTs straight on the DBAPI cursor: SQLAlchemy's begin_nested() costs more
                # than a hot unit's own statements. SQLAlchemy still owns BEGIN and COMMIT.
                cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                for n, (unit, waiter) in enumerate(batch):
                    cursor.execute("SAVEPOINT feedback_unit")
                    try:
                        value = unit(session)
                        session.flush()
                    except BaseException as e:  # noqa: BLE001  (handed to that request only)
                        if not session.get_transaction().is_active:  # type: ignore[union-attr]
                            # An ORM flush failed and the session is unusable: drop the transaction
                            # (nothing of it is stored), answer this unit, run the others again.
                            session.rollback()
                            return [(waiter, None, e)], [pair for pair, o in zip(batch, outcomes) if o[2] is None] + batch[n + 1 :]
                        cursor.execute("ROLLBACK TO SAVEPOINT feedback_unit")
                        cursor.execute("RELEASE SAVEPOINT feedback_unit")
                        session.expunge_all()  # ORM objects of the rolled-back unit are gone
                        outcomes.append((waiter, None, e))
                        continue
                    cursor.execute("RELEASE SAVEPOINT feedback_unit")
                    outcomes.append((waiter, value, None))
                session.commit()
        except BaseException as e:  # noqa: BLE001  the commit failed: nothing of the batch is stored
            return [(waiter, None, outcome[2] if outcome is not None and outcome[2] is not None else e)
                    for (_, waiter), outcome in zip(batch, outcomes + [None] * (len(batch) - len(outcomes)))], []
        self.batches += 1
        self.units += len(batch)
        return outcomes, []


def _deliver(outcomes: list[tuple[Any, object, BaseException | None]]) -> None:
    """Answer every waiter of a batch: thread futures directly, asyncio futures with one
    ``call_soon_threadsafe`` per event loop (one wake-up for the whole batch)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object, BaseException | None]]] = {}
    for waiter, value, error in outcomes:
        if isinstance(waiter, _LoopFuture):
            by_loop.setdefault(waiter.loop, []).append((waiter.future, value, error))
        elif not waiter.done():
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(value)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def _resolve(items: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    for future, value, error in items:
        if future.done():  # the request went away meanwhile (cancelled)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class _LoopFuture:
    """An asyncio future of an event loop in another thread, waiting for a unit's outcome."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.loop, self.future = loop, future
