"""The labeling hot paths (lease, rank, skip), as the routes call them: ``app.state.hot``.

``WriterHotPath`` (SQLite, and the reference): the units of ``service.py`` (a few indexed Core
statements each) run in the group-commit writer (``writer.py``).

``PgHotPath`` (PostgreSQL): the same work as one call of a server-side function per request
(``fs_lease``, ``fs_rank``, ``fs_skip``; migration 0006), where the units took 6-8 round trips
each (BEGIN, the statements, COMMIT, the pool's ping), every one a thread hop in the service
and a wake-up of a PostgreSQL backend. The functions run the units' statements in the same order
with the same row locks and return what the checks need; the checks themselves are the Python
functions ``service.py`` runs on SQLite (``check_campaign_context``, ``check_item_context``,
``ranking_outcome``, ``skip_allowed``), so answers and errors are the same on both databases.

Group commit, as on SQLite: the calls that arrive while a batch commits form the next batch, sent
at once on one connection (libpq pipeline mode: BEGIN, the calls, COMMIT; one network round trip)
and committed once. A batch never waits for a row lock (``p_wait`` false: a call that would wait
for an item row another transaction holds writes nothing and says "busy"), so batches of two
worker processes cannot deadlock and one slow lock holds up only its own request: a busy call,
and every call of a batch where a statement failed (nothing of that batch is stored), runs again
on its own connection in a transaction of its own, waiting for locks like the units do. At most
``max_batches`` batches per process are in flight.

Durability is unchanged: a request is answered only after the COMMIT that holds its work
returned (``synchronous_commit`` as configured, on by default). The connections are driven on the
event loop through psycopg's libpq wrapper (``_Connection``), in autocommit mode (a call on its
own is an implicit transaction). ``ALIGNLOOP_PG_GROUP_COMMIT=0``: every call on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from datetime import datetime
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors, pq
from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError

from feedback_service import service
from feedback_service.errors import ServiceError
from feedback_service.schemas import AnswerPublic, AssignmentPublic, RankingCreate, RankingPublic
from feedback_service.writer import Writer


class WriterHotPath:
    """The hot paths as ``service.py`` units in the group-commit writer."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    async def next_assignment(self, campaign_id: int, actor: service.Actor, now: datetime) -> AssignmentPublic | None:
        return await self.writer.submit(lambda session: service.next_assignment(session.connection(), campaign_id, actor, now))

    async def lease_items(self, campaign_id: int, actor: service.Actor, now: datetime, count: int) -> list[AssignmentPublic]:
        return await self.writer.submit(lambda session: service.lease_items(session.connection(), campaign_id, actor, now, count))

    async def submit_ranking(self, item_id: int, actor: service.Actor, data: RankingCreate, now: datetime) -> tuple[RankingPublic, bool]:
        return await self.writer.submit(lambda session: service.submit_ranking(session.connection(), item_id, actor, data, now))

    async def skip_item(self, item_id: int, actor: service.Actor, now: datetime) -> None:
        await self.writer.submit(lambda session: service.skip_item(session.connection(), item_id, actor, now))


# False: PostgreSQL apps built from now on run the writer's units too (tests compare the two)
PG_FUNCTIONS = True
# "0": each call in a transaction of its own, no group commit (for comparisons)
PG_GROUP_COMMIT_ENV = "ALIGNLOOP_PG_GROUP_COMMIT"


def _text(v: bytes) -> str:
    return v.decode()


def _bool(v: bytes) -> bool:
    return v == b"t"


def _timestamp(v: bytes) -> datetime:
    return datetime.fromisoformat(v.decode())  # DateStyle ISO: "2026-01-01 12:00:00[.fraction]"


def _ints(v: bytes) -> list[int]:
    inner = v[1:-1]
    return [int(x) for x in inner.split(b",")] if inner else []


_CONTEXT = (_bool, _bool, int, int, int, _text, _timestamp, int, json.loads, _text, _timestamp)


class _Statement:
    """A function call prepared on every pooled connection: its name, SQL, one text-format
    decoder per result column (None stays None), and how its rows say "a row lock is held by
    another transaction" (``busy``: only when called with p_wait false, in a group commit)."""

    def __init__(self, name: str, sql: str, columns: tuple, busy: Callable[[list[tuple]], bool]) -> None:
        self.name, self.sql, self.columns, self.busy = name.encode(), sql, columns, busy
        self.prepare = f"PREPARE {name} AS {sql}"


# The last parameter of each is p_wait.
_LEASE = _Statement(
    "fs_lease_call",
    "SELECT * FROM fs_lease($1::bigint, $2::bigint, $3::bigint, $4::timestamp, $5::integer, $6::boolean)",
    (_text, int, _timestamp, int, int, _text, json.loads, _timestamp, json.loads),
    lambda rows: rows[0][0] == "busy",
)
_RANK = _Statement(
    "fs_rank_call",
    "SELECT * FROM fs_rank($1::bigint, $2::bigint, $3::bigint, $4::bigint[], $5::text, $6::text, $7::timestamp, $8::boolean)",
    (*_CONTEXT, _ints, int, int, _bool),
    lambda rows: rows[0][-1] is True,
)
_SKIP = _Statement("fs_skip_call", "SELECT * FROM fs_skip($1::bigint, $2::bigint, $3::bigint, $4::boolean)", (*_CONTEXT, _bool, _bool), lambda rows: rows[0][-1] is True)
_STATEMENTS = (_LEASE, _RANK, _SKIP)


def _param(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format."""
    if value is None:
        return None
    if value is True or value is False:
        return b"t" if value else b"f"
    if isinstance(value, str):
        if "\x00" in value:  # libpq would cut the text there; psycopg's own dumper refuses it too
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return value.encode()
    if isinstance(value, datetime):
        return value.isoformat(sep=" ").encode()
    if isinstance(value, list):
        return ("{" + ",".join(str(int(x)) for x in value) + "}").encode()
    return str(int(value)).encode()


def _decode(result: Any, statement: _Statement, rows: list[tuple]) -> None:
    get = result.get_value
    columns = tuple(enumerate(statement.columns))
    for r in range(result.ntuples):
        rows.append(tuple(None if (v := get(r, c)) is None else decode(v) for c, decode in columns))


def _error(failure: Any) -> psycopg.Error:
    """The psycopg exception of a failed result's SQLSTATE (e.g. DeadlockDetected)."""
    sqlstate = (failure.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    message = (failure.error_message or b"").decode(errors="replace").strip()
    try:
        return errors.lookup(sqlstate)(message)
    except KeyError:
        return errors.DatabaseError(message)


class _Connection:
    """One pooled PostgreSQL connection, in autocommit mode, driven on the event loop through
    psycopg's libpq wrapper (``psycopg.pq``): a prepared statement is sent, the loop wakes this
    connection when its socket is readable, the rows are decoded per column. psycopg opens the
    connection (authentication, the URL's options); its cursor machinery is left out, which
    costs 70-110 µs of Python per statement against 18-25 µs here."""

    __slots__ = ("psy", "pg", "fd", "loop", "waiter", "broken", "generation")

    def __init__(self, psy: Any, loop: asyncio.AbstractEventLoop, generation: object) -> None:
        self.psy, self.pg, self.loop, self.generation = psy, psy.pgconn, loop, generation
        self.fd = self.pg.socket
        self.waiter: asyncio.Future | None = None
        self.broken = False
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        # Read whatever arrived into libpq's buffer (also between calls: a notice, or the server
        # going away), so that a level-triggered readable socket never spins the loop.
        try:
            self.pg.consume_input()
        except Exception:  # noqa: BLE001  (psycopg.OperationalError: the connection is gone)
            self._broke()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _broke(self) -> None:
        if not self.broken:
            self.broken = True
            if not self.loop.is_closed():
                self.loop.remove_reader(self.fd)

    async def _wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def _wait_writable(self) -> None:
        future = self.loop.create_future()
        self.loop.add_writer(self.fd, lambda: future.done() or future.set_result(None))
        try:
            await future
        finally:
            self.loop.remove_writer(self.fd)

    async def _flush(self) -> None:
        while self.pg.flush():  # the rest of what was sent, when the socket takes it
            await self._wait_writable()

    async def _result(self) -> Any:
        """The next result of the connection (None: the current query has no more)."""
        pg = self.pg
        while True:
            if self.broken:
                raise psycopg.OperationalError("the connection to PostgreSQL was lost")
            if not pg.is_busy():
                return pg.get_result()
            await self._wait()

    async def call(self, statement: _Statement, params: tuple) -> list[tuple]:
        """Run a prepared statement (its own implicit transaction: committed when the answer
        arrives) and return its decoded rows; a failure raises the psycopg error class of its
        SQLSTATE."""
        encoded = [_param(p) for p in params]
        try:
            self.pg.send_query_prepared(statement.name, encoded)
            await self._flush()
            rows: list[tuple] = []
            failure = None
            while (result := await self._result()) is not None:
                if result.status == pq.ExecStatus.TUPLES_OK:
                    _decode(result, statement, rows)
                elif result.status != pq.ExecStatus.COMMAND_OK and failure is None:
                    failure = result
        except BaseException:  # lost, or cancelled half-way: the protocol state is unknown
            self._broke()
            raise
        if failure is not None:
            raise _error(failure)
        return rows

    async def batch(self, units: list[tuple[_Statement, tuple]]) -> list[list[tuple]] | None:
        """Run the units in one transaction, sent at once (libpq pipeline mode: BEGIN, the
        calls, COMMIT, one network flush) and committed once: each unit's rows, or None when a
        statement or the commit failed (then nothing of the batch is stored)."""
        pg = self.pg
        encoded = [(statement.name, [_param(p) for p in params]) for statement, params in units]
        try:
            pg.enter_pipeline_mode()
            pg.send_query_params(b"BEGIN", None)
            for name, values in encoded:
                pg.send_query_prepared(name, values)
            pg.send_query_params(b"COMMIT", None)
            pg.pipeline_sync()
            await self._flush()
            out: list[list[tuple]] = []
            failed = False
            for query in range(len(units) + 2):  # BEGIN, the units, COMMIT: each ends with None
                rows: list[tuple] = []
                while (result := await self._result()) is not None:
                    if result.status == pq.ExecStatus.TUPLES_OK:
                        _decode(result, units[query - 1][0], rows)
                    elif result.status != pq.ExecStatus.COMMAND_OK:
                        failed = True  # FATAL_ERROR, or PIPELINE_ABORTED after one
                if 0 < query <= len(units):
                    out.append(rows)
            result = await self._result()
            if result is None or result.status != pq.ExecStatus.PIPELINE_SYNC:
                raise psycopg.OperationalError("unexpected pipeline state")
            pg.exit_pipeline_mode()
            if pg.transaction_status != pq.TransactionStatus.IDLE:  # a unit failed: the block is aborted
                pg.send_query(b"ROLLBACK")
                await self._flush()
                while await self._result() is not None:
                    pass
        except BaseException:  # lost, or cancelled half-way: the protocol state is unknown
            self._broke()
            raise
        return None if failed else out

    def close(self) -> None:
        self._broke()
        self.psy.pgconn.finish()  # what AsyncConnection.close() does, without needing the loop


class PgHotPath:
    """The hot paths as PostgreSQL function calls, group-committed; see the module docstring.

    The pool belongs to the event loop that first uses it (uvicorn's, one per process). A call
    from another loop (a test client that runs each request in a loop of its own) runs on its
    own, on a connection opened for it. ``size``: connections at most (batches in flight plus
    calls on their own); more wait for one. ``max_batch``: calls per batch at most.
    """

    def __init__(self, engine: Engine, size: int = 8, group_commit: bool | None = None, max_batch: int = 64, max_batches: int = 2) -> None:
        self.dialect = engine.dialect
        if group_commit is None:
            group_commit = os.environ.get(PG_GROUP_COMMIT_ENV, "1") != "0"
        self.group_commit, self.max_batch, self.max_batches = group_commit, max_batch, max_batches
        self._pending: list[tuple[_Statement, tuple, asyncio.Future]] = []  # units for the next batch
        self._draining = 0  # batches being formed or committed
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0  # commits of more than one unit (tests and metrics)
        self.alone = 0  # calls run again on their own: a row lock to wait for, or a failed batch
        _, kwargs = engine.dialect.create_connect_args(engine.url)
        kwargs.pop("context", None)  # SQLAlchemy's adapters: not used here
        self._connect_kwargs = {**kwargs, "client_encoding": "utf8"}
        self.size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []
        self._open = 0  # connections of the pool, idle or in use, or being opened
        self._waiters: deque[asyncio.Future] = deque()
        self._generation = object()  # changes when the pool is closed; connections remember theirs
        self.calls = 0
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    # ---- the hot paths -----------------------------------------------------------------------

    async def lease_items(self, campaign_id: int, actor: service.Actor, now: datetime, count: int) -> list[AssignmentPublic]:
        rows = await self._run(_LEASE, (actor.token_id, actor.id, campaign_id, now, count))
        state = rows[0][0]
        if state in ("revoked", "no_campaign"):
            service.check_campaign_context(state != "no_campaign", state != "revoked", campaign_id)
        if state == "none":
            return []
        return [
            service.lease_public(r[1], campaign_id, r[2], (r[3], r[4], r[5], r[6], r[7]), [AnswerPublic.model_construct(**a) for a in r[8] or ()])
            for r in rows
        ]

    async def next_assignment(self, campaign_id: int, actor: service.Actor, now: datetime) -> AssignmentPublic | None:
        leases = await self.lease_items(campaign_id, actor, now, 1)
        return leases[0] if leases else None

    async def submit_ranking(self, item_id: int, actor: service.Actor, data: RankingCreate, now: datetime) -> tuple[RankingPublic, bool]:
        groups = service.normalize_groups(data)
        named = sorted(a for g in groups for a in g)
        rows = await self._run(_RANK, (actor.token_id, item_id, actor.id, named, json.dumps(groups), data.rationale, now))
        found, live, campaign_id, overlap, assignment_id, status, expires_at, ranking_id, stored, rationale, created_at, answer_ids, slots_others, new_id, _ = rows[0]
        try:
            service.check_item_context(found, live, assignment_id, item_id, actor)
            ctx = (campaign_id, overlap, assignment_id, status, expires_at, ranking_id, stored, rationale, created_at)
            same = service.ranking_outcome(item_id, actor, data, groups, ctx, answer_ids, lambda: slots_others, now)
        except ServiceError:
            if new_id is not None:
                raise RuntimeError(f"fs_rank stored ranking {new_id} that the checks refuse") from None
            raise
        if same is not None:
            if new_id is not None:
                raise RuntimeError(f"fs_rank stored ranking {new_id} over ranking {same.id}")
            return same, False
        if new_id is None:
            raise RuntimeError(f"fs_rank did not store a ranking of item {item_id} that the checks allow")
        return service.new_ranking(new_id, item_id, campaign_id, actor, groups, data, now), True

    async def skip_item(self, item_id: int, actor: service.Actor, now: datetime) -> None:
        rows = await self._run(_SKIP, (actor.token_id, item_id, actor.id))
        found, live, _, _, assignment_id, status, *_, skipped, _ = rows[0]
        try:
            service.check_item_context(found, live, assignment_id, item_id, actor)
            service.skip_allowed(item_id, assignment_id, status)
        except ServiceError:
            if skipped:
                raise RuntimeError(f"fs_skip skipped item {item_id}, which the checks refuse") from None
            raise
        if not skipped:
            raise RuntimeError(f"fs_skip did not skip item {item_id}, which the checks allow")

    # ---- group commit ------------------------------------------------------------------------

    async def _run(self, statement: _Statement, params: tuple) -> list[tuple]:
        """The call's rows, once committed: in the next group commit of this process (see the
        class docstring), or on its own (then it may wait for row locks: ``_call``)."""
        loop = asyncio.get_running_loop()
        if self.group_commit and (loop is self._loop or self._loop is None or self._loop.is_closed()):
            if loop is not self._loop:
                self._adopt(loop)
            waiter = loop.create_future()
            self._pending.append((statement, params, waiter))
            if self._draining < self.max_batches:
                self._draining += 1
                task = loop.create_task(self._drain())
                self._tasks.add(task)  # referenced until done (the loop keeps only weak references)
                task.add_done_callback(self._tasks.discard)
            rows = await waiter
            if rows is not None and not statement.busy(rows):
                return rows
            self.alone += 1  # the batch failed (nothing of it is stored), or the call would wait for a row lock
        return await self._call(statement, (*params, True))

    async def _drain(self) -> None:
        """Commit batches of the pending calls until none is left; the calls that arrive while
        the batches in flight commit form the next ones."""
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                outcomes = await self._commit_batch([(statement, (*params, False)) for statement, params, _ in batch])
                for (_, _, waiter), rows in zip(batch, outcomes):
                    if not waiter.done():
                        waiter.set_result(rows)
        except BaseException as e:  # noqa: BLE001  (cancelled at shutdown: nobody will commit these)
            for _, _, waiter in self._pending:
                if not waiter.done():
                    waiter.set_exception(RuntimeError("the service is shutting down"))
            self._pending.clear()
            if not isinstance(e, Exception):
                raise
        finally:
            self._draining -= 1

    async def _commit_batch(self, units: list[tuple[_Statement, tuple]]) -> list[list[tuple] | None]:
        """Each unit's rows, committed; None for units to run again on their own (the batch
        failed, or the connection did)."""
        self.calls += len(units)
        try:
            conn = await self._acquire(asyncio.get_running_loop())
        except Exception:  # noqa: BLE001  (no connection now: each call tries on its own)
            return [None] * len(units)
        try:
            if len(units) == 1:  # no transaction block needed
                return [await conn.call(*units[0])]
            outcomes = await conn.batch(units)
            if outcomes is None:
                return [None] * len(units)
            self.batches += 1
            return outcomes  # type: ignore[return-value]
        except Exception:  # noqa: BLE001  (a failed statement, a lost connection: each call runs again alone)
            return [None] * len(units)
        finally:
            self._release(conn)

    # ---- connections -------------------------------------------------------------------------

    async def _call(self, statement: _Statement, params: tuple) -> list[tuple]:
        """Run one call on a connection of its own, in its own implicit transaction (committed when
        this returns), and return its rows. Database errors are raised as SQLAlchemy's
        DBAPIError subclasses, as ``Connection.execute`` would, so the app answers 409 / 503 as
        on the other routes."""
        self.calls += 1
        loop = asyncio.get_running_loop()
        if loop is not self._loop and self._loop is not None and not self._loop.is_closed():
            conn = await self._connect(loop)  # another loop than the pool's: a connection for this call
            try:
                return await conn.call(statement, params)
            except psycopg.Error as e:
                raise DBAPIError.instance(statement.sql, params, e, psycopg.Error, dialect=self.dialect) from e
            finally:
                conn.close()
        if loop is not self._loop:
            self._adopt(loop)
        conn = await self._acquire(loop)
        try:
            return await conn.call(statement, params)
        except psycopg.Error as e:
            raise DBAPIError.instance(statement.sql, params, e, psycopg.Error, dialect=self.dialect) from e
        finally:
            self._release(conn)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        setup = ";".join(
            [
                "SET jit = off",  # short OLTP statements only (see db.make_engine)
                "SET DateStyle = ISO",  # the timestamps' text format that _timestamp reads
                *(s.prepare for s in _STATEMENTS),
            ]
        )
        try:
            psy = await psycopg.AsyncConnection.connect(autocommit=True, **self._connect_kwargs)
            try:
                await psy.execute(setup)
            except BaseException:
                await psy.close()
                raise
        except psycopg.Error as e:
            raise DBAPIError.instance(setup, None, e, psycopg.Error, dialect=self.dialect) from e
        return _Connection(psy, loop, self._generation)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` the pool's (the first loop, or one after the previous loop closed: what
        was pending there can no longer be answered)."""
        self.close()
        self._loop = loop
        self._pending, self._draining, self._tasks = [], 0, set()

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.broken:
                return conn
            conn.close()
            self._open -= 1
        if self._open >= self.size:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter  # a connection handed over by _release, or None: open one
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    if waiter.result() is not None:
                        self._release(waiter.result())
                    else:
                        self._open -= 1  # the slot handed over for a new connection
                        self._wake_for_slot()
                raise
            if conn is not None:
                return conn
        else:
            self._open += 1
        try:
            return await self._connect(loop)
        except BaseException:
            self._open -= 1
            self._wake_for_slot()
            raise

    def _release(self, conn: _Connection) -> None:
        if conn.generation is not self._generation:  # opened before the pool was closed
            conn.close()
            return
        if conn.broken:
            conn.close()
            self._open -= 1
            self._wake_for_slot()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _wake_for_slot(self) -> None:
        """A connection slot came free: a waiter may open a connection."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections (those in use close when they are handed back)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self._open = 0
        self._loop = None
        self._generation = object()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()
