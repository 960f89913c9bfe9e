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

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

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

    def _ensure_thread(self) -> None:
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
                    if self._queue.empty():  # a put after this check starts a new thread
                        self._thread = None
                        return
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[tuple[Unit, Future]]) -> None:
        done: list[tuple[Future, object]] = []
        failed: list[tuple[Future, BaseException]] = []
        try:
            with self.factory() as session:
                for unit, future in batch:
                    savepoint = session.begin_nested()
                    try:
                        value = unit(session)
                        session.flush()
                        savepoint.commit()
                        done.append((future, value))
                    except BaseException as e:  # noqa: BLE001  (handed to that request only)
                        if savepoint.is_active:
                            savepoint.rollback()
                        failed.append((future, e))
                session.commit()
        except BaseException as e:  # noqa: BLE001  the commit failed: nothing of the batch is stored
            for future, _ in done:
                future.set_exception(e)
            for future, err in failed:
                future.set_exception(err)
            return
        self.batches += 1
        self.units += len(batch)
        for future, value in done:
            future.set_result(value)
        for future, err in failed:
            future.set_exception(err)
