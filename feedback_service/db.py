"""Engine, sessions and migrations: one SQLAlchemy 2 code path for SQLite and PostgreSQL.

SQLite: WAL journal, ``synchronous=FULL`` (a commit is on disk before the 2xx goes out, so a
SIGKILL loses nothing acknowledged), and every write transaction starts with ``BEGIN IMMEDIATE``
so check-then-insert (overlap, idempotent submit) is serialized across threads and processes;
read-only engines (token checks, GET routes) read WAL snapshots without the write lock. The hot
write paths are group-committed (``writer.py``).
PostgreSQL: READ COMMITTED plus row locks (``SELECT ... FOR UPDATE``) where it matters.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

try:
    import fcntl
except ImportError:  # not on Windows: processes then meet at SQLite's own lock only
    fcntl = None  # type: ignore[assignment]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str, read_only: bool = False, background_checkpoints: bool = False) -> Engine:
    """An engine for ``url``. SQLite: ``read_only`` engines begin plain (deferred) transactions,
    which in WAL mode read a snapshot without taking the write lock (used for authentication).
    ``background_checkpoints``: commits never checkpoint the WAL themselves; a ``Checkpointer``
    thread does it (the app starts one)."""
    if not url.startswith("sqlite"):
        # pool_size above Writer.max_concurrent (the hot units) plus room for the other routes
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def _pg_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
            # Short OLTP statements only: the JIT compiler costs 10-300 ms on a query whose
            # estimate crosses jit_above_cost (the lease query's does on a large campaign).
            autocommit = dbapi_conn.autocommit
            dbapi_conn.autocommit = True
            dbapi_conn.execute("SET jit = off")
            dbapi_conn.autocommit = autocommit

        return engine
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8, max_overflow=32)
    # Writers queue before BEGIN IMMEDIATE: SQLite's own busy handler sleeps in growing steps (up
    # to 100 ms), which turns contention into long tails. Within a process on a thread lock,
    # between processes (uvicorn --workers) on an flock of a file beside the database; anything
    # else that writes (another tool) still meets them at SQLite's lock, with busy_timeout.
    write_lock = _WriteLock(f"{path}-writelock" if path and path != ":memory:" and not read_only else None)
    if write_lock.fd is not None:
        weakref.finalize(engine, os.close, write_lock.fd)
    _write_locks[engine] = write_lock

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
        dbapi_conn.isolation_level = None  # let us emit BEGIN ourselves (pysqlite would defer it)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if background_checkpoints and not read_only:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn) -> None:  # noqa: ANN001
        if read_only:
            conn.exec_driver_sql("BEGIN")
            return
        if not write_lock.acquire(timeout=60):
            raise TimeoutError("waited 60 s for the SQLite write lock")
        dbapi_conn = conn.connection.dbapi_connection
        _holders[id(dbapi_conn)] = write_lock
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(dbapi_conn)
            raise

    @event.listens_for(engine, "checkin")
    def _sqlite_checkin(dbapi_conn, _record) -> None:  # noqa: ANN001
        _release(dbapi_conn)  # released once the committed (or rolled back) connection is back in the pool

    return engine


class _WriteLock:
    """A thread lock, then (with a path, where fcntl exists) an exclusive flock of that file."""

    def __init__(self, lock_path: str | None) -> None:
        self._thread = threading.Lock()
        self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path and fcntl is not None else None

    def acquire(self, timeout: float) -> bool:
        if not self._thread.acquire(timeout=timeout):
            return False
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)  # blocks until the other process commits; freed if it dies
            except BaseException:
                self._thread.release()
                raise
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._thread.release()


_holders: dict[int, _WriteLock] = {}
_write_locks: weakref.WeakKeyDictionary[Engine, _WriteLock] = weakref.WeakKeyDictionary()


class Checkpointer:
    """Copies the SQLite WAL back into the database file in a thread of its own.

    By default the commit that grows the WAL past 1,000 pages runs the checkpoint itself: it
    writes those pages into the database file and fsyncs it, and every request of the next group
    commit waits meanwhile (tens of ms, several times a second at a thousand rankings/s).
    Here commits only append to the WAL (``wal_autocheckpoint=0`` on the writer connections) and
    this thread, on its own connection, runs a PASSIVE checkpoint every ``interval_s``: it never
    blocks writers or readers. Under steady writes a passive checkpoint never catches up with
    the end of the WAL, though, and the WAL only starts over from its beginning once it has been
    copied completely; so past ``restart_frames`` the thread takes the writers' lock for one more
    passive checkpoint, which then only has the last few frames to copy (a pause of a few ms
    instead of one per 1,000 pages), and the next commit starts the WAL over. Durability is
    unchanged: a commit is on disk once its WAL frames are fsynced. Stops when the engine is
    disposed (or the process ends).
    """

    def __init__(self, engine: Engine, interval_s: float = 0.2, restart_frames: int = 4000) -> None:
        self.path = engine.url.database
        self.lock = _write_locks.get(engine)
        self.interval_s, self.restart_frames = interval_s, restart_frames
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feedback-checkpoint", daemon=True)
        event.listen(engine, "engine_disposed", lambda _engine: self._stop.set())

    def start(self) -> Checkpointer:
        self._thread.start()
        return self

    def _run(self) -> None:
        import sqlite3  # noqa: PLC0415

        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            conn.execute("PRAGMA journal_size_limit=67108864")  # a WAL that starts over shrinks back to 64 MiB
            while not self._stop.wait(self.interval_s):
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames >= self.restart_frames and self.lock is not None and self.lock.acquire(timeout=5):
                        try:
                            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        finally:
                            self.lock.release()
                except sqlite3.Error:  # e.g. another process checkpoints right now: next time
                    pass
        finally:
            conn.close()


def _release(dbapi_conn) -> None:  # noqa: ANN001
    lock = _holders.pop(id(dbapi_conn), None)
    if lock is not None:
        lock.release()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision``; existing rows are kept (migrations only add)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session
