"""Units of write work, committed durably before their requests are answered.

SQLite commits one writer at a time and each commit waits for an fsync (``synchronous=FULL``), so
one commit per request caps throughput at the disk's fsync rate. ``Writer`` therefore runs the
hot write paths (lease, rank, skip) of many concurrent requests in one transaction, each unit
inside its own SAVEPOINT, and commits the batch once: group commit. A unit that fails rolls back
only its savepoint; if the commit itself fails, every request of the batch gets the error. Nobody
is answered before the commit returned. PostgreSQL groups concurrent commits by itself, so there a
unit simply runs in a thread in a transaction of its own (row locks keep it correct).

Two ways in, one lock: ``submit`` (the app's async routes) batches on the event loop: BEGIN (which
may wait for the write lock) and COMMIT (the fsync) run in a helper thread, and the units
themselves run on the event loop thread in between. They are short (a few indexed statements,
no network), and running them there avoids a GIL convoy: a separate writer thread gives up the
GIL inside every SQLite call and then waits for the busy event loop to hand it back, which made a
batch of a few dozen statements take tens of milliseconds. ``run`` (plain threads, tests) queues
to a writer thread instead. Both take the same write lock (``db.py``), so they never overlap.

A unit must return plain values (e.g. Public schemas), not ORM rows: the session closes after the
commit, and another unit's rollback may expire rows they share.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
Unit = Callable[[Session], T]
Outcome = tuple[Any, object, BaseException | None]  # (waiter, value, error)

_IDLE_EXIT_S = 5.0  # the writer thread exits when idle this long and restarts on demand


class Writer:
    def __init__(self, factory: sessionmaker[Session], group_commit: bool, max_batch: int = 128, max_concurrent: int = 12) -> None:
        self.factory, self.group_commit, self.max_batch = factory, group_commit, max_batch
        # Without group commit (PostgreSQL) each unit holds a pooled connection: at most this many
        # at once, below the pool size, so a burst never opens (and closes) overflow connections,
        # each a new server process on PostgreSQL.
        self.max_concurrent = max_concurrent
        self._slots: asyncio.Semaphore | None = None
        self._queue: queue.SimpleQueue[tuple[Unit, Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pending: list[tuple[Unit, asyncio.Future]] = []  # submit(): units waiting for the next batch
        self._drainer: asyncio.Task | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-commit") if group_commit else None
        if self._io is not None:
            weakref.finalize(self, self._io.shutdown, wait=False)
        self.batches = 0  # how many commits the writer made (tests and metrics)
        self.units = 0

    # ---- plain threads -----------------------------------------------------------------------

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
                while batch:
                    outcomes, batch = self._try_batch(batch)
                    _deliver(outcomes)
            except BaseException as e:  # noqa: BLE001  never let the writer thread die with waiters queued
                _deliver([(waiter, None, e) for _, waiter in batch])

    def _try_batch(self, batch: list[tuple[Unit, Any]]) -> tuple[list[Outcome], list[tuple[Unit, Any]]]:
        """Run a batch in one transaction: (outcomes to deliver, units to run again)."""
        try:
            session, cursor = self._begin()
        except BaseException as e:  # noqa: BLE001  no transaction: every unit gets the error
            return [(waiter, None, e) for _, waiter in batch], []
        outcomes, retry = self._run_units(session, cursor, batch)
        return self._end(session, batch, outcomes, retry), retry

    # ---- the event loop ----------------------------------------------------------------------

    async def submit(self, unit: Unit[T]) -> T:
        """Run ``unit(session)`` in the next group commit; returns its value once it is durable."""
        if not self.group_commit:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.max_concurrent)
            async with self._slots:
                return await run_in_threadpool(self.run, unit)
        waiter = asyncio.get_running_loop().create_future()
        self._pending.append((unit, waiter))
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await waiter

    async def _drain(self) -> None:
        """Commit batches of the pending units until none is left; the units that arrive while a
        batch commits form the next one."""
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                while batch:
                    outcomes, batch = await self._try_batch_async(batch)
                    _resolve(outcomes)
        finally:
            self._drainer = None
            if self._pending:  # cancelled (shutdown): nobody will commit these
                _resolve([(waiter, None, RuntimeError("the service is shutting down")) for _, waiter in self._pending])
                self._pending.clear()

    async def _try_batch_async(self, batch: list[tuple[Unit, Any]]) -> tuple[list[Outcome], list[tuple[Unit, Any]]]:
        loop = asyncio.get_running_loop()
        begin = loop.run_in_executor(self._io, self._begin)
        try:
            session, cursor = await asyncio.shield(begin)
        except asyncio.CancelledError:
            begin.add_done_callback(lambda f: f.exception() is None and f.result()[0].close())  # frees the lock
            raise
        except BaseException as e:  # noqa: BLE001  no transaction: every unit gets the error
            return [(waiter, None, e) for _, waiter in batch], []
        outcomes, retry = self._run_units(session, cursor, batch)  # on the event loop thread, see the module docstring
        end = loop.run_in_executor(self._io, self._end, session, batch, outcomes, retry)
        return await asyncio.shield(end), retry  # a cancelled caller does not stop a commit half-way

    # ---- one transaction ---------------------------------------------------------------------

    def _begin(self) -> tuple[Session, Any]:
        """A session in a new transaction (SQLite: BEGIN IMMEDIATE, after the write lock) and a
        DBAPI cursor on its connection."""
        session = self.factory()
        try:
            # SAVEPOINTs go straight to the DBAPI cursor: SQLAlchemy's begin_nested() costs more
            # than a hot unit's own statements. SQLAlchemy still owns BEGIN and COMMIT.
            cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        except BaseException:
            session.close()
            raise
        return session, cursor

    def _run_units(self, session: Session, cursor: Any, batch: list[tuple[Unit, Any]]) -> tuple[list[Outcome], list[tuple[Unit, Any]]]:
        """Each unit in a savepoint: (outcomes, units to run again). When units must run again
        the transaction is unusable and must be rolled back (outcomes then hold only the unit
        that broke it)."""
        outcomes: list[Outcome] = []
        for n, (unit, waiter) in enumerate(batch):
            try:
                cursor.execute("SAVEPOINT feedback_unit")
                value = unit(session)
                session.flush()
            except BaseException as e:  # noqa: BLE001  (handed to that request only)
                transaction = session.get_transaction()
                if transaction is None or not transaction.is_active:
                    # An ORM flush failed and the session is unusable: drop the transaction
                    # (nothing of it is stored), answer this unit, run the others again.
                    return [(waiter, None, e)], [pair for pair, o in zip(batch, outcomes) if o[2] is None] + batch[n + 1 :]
                try:
                    cursor.execute("ROLLBACK TO SAVEPOINT feedback_unit")
                    cursor.execute("RELEASE SAVEPOINT feedback_unit")
                except BaseException:  # noqa: BLE001  the connection itself failed: give up the batch
                    return [(waiter, None, e)], [pair for pair, o in zip(batch, outcomes) if o[2] is None] + batch[n + 1 :]
                session.expunge_all()  # ORM objects of the rolled-back unit are gone
                outcomes.append((waiter, None, e))
                continue
            cursor.execute("RELEASE SAVEPOINT feedback_unit")
            outcomes.append((waiter, value, None))
        return outcomes, []

    def _end(self, session: Session, batch: list[tuple[Unit, Any]], outcomes: list[Outcome], retry: list) -> list[Outcome]:
        """Commit (or, when units must run again, roll back) and close; the outcomes to deliver."""
        try:
            with session:
                if retry:
                    session.rollback()
                    return outcomes
                session.commit()
        except BaseException as e:  # noqa: BLE001  the commit failed: nothing of the batch is stored
            return [(waiter, None, err or e) for waiter, _, err in outcomes]
        self.batches += 1
        self.units += len(batch)
        return outcomes


def _resolve(outcomes: list[Outcome]) -> None:
    """Complete the batch's asyncio futures (a request that went away is left alone). They
    normally belong to the running event loop; one of another loop (an app served by two loops,
    as tests can do) is completed through that loop."""
    running = asyncio.get_running_loop()
    for future, value, error in outcomes:
        if future.get_loop() is not running:
            future.get_loop().call_soon_threadsafe(_resolve_one, future, value, error)
        else:
            _resolve_one(future, value, error)


def _resolve_one(future: asyncio.Future, value: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _deliver(outcomes: list[Outcome]) -> None:
    """Complete the thread futures of a batch (from the writer thread)."""
    for waiter, value, error in outcomes:
        if waiter.done():
            continue
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(value)
