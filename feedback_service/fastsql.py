"""Core statements for the hot paths, compiled once per dialect and run on the DBAPI cursor.

SQLAlchemy's ``Connection.execute`` costs 60-90 µs of Python per statement on this hardware
(cache key, compiled-cache lookup, execution context, result object), several times what SQLite
itself needs for an indexed lookup. A lease or a ranking runs a few such statements, so that
overhead capped the service. ``Prepared`` keeps SQLAlchemy for everything that matters to
correctness and portability: the statement is a Core construct, compiled by SQLAlchemy for the
engine's dialect (SQLite or PostgreSQL: one code path), its parameters go through the column
types' own bind processors and its rows through their result processors (``DateTime`` on SQLite,
``JSON``), and it runs inside the transaction SQLAlchemy began on that connection (SQLite
``BEGIN IMMEDIATE``, see ``db.py``). What it skips is the per-call bookkeeping.

Supported: plain bind parameters (no ``expanding`` IN lists, no post-compile parameters).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement

_Proc = Callable[[Any], Any]


class _Compiled:
    __slots__ = ("sql", "defaults", "bind_procs", "order", "result_procs")

    def __init__(self, stmt: ClauseElement, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        if getattr(compiled, "_post_compile_expanded_state", None) is not None or getattr(compiled, "literal_execute_params", None) or getattr(compiled, "post_compile_params", None):
            raise ValueError("Prepared statements take plain bind parameters only")
        self.sql: str = compiled.string
        self.bind_procs: dict[str, _Proc] = {}
        defaults: dict[str, Any] = {}
        for bind in compiled.binds.values():
            name = compiled.bind_names.get(bind, bind.key)
            if bind.expanding:
                raise ValueError("Prepared statements take plain bind parameters only (no expanding IN)")
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self.bind_procs[name] = proc
            if bind.callable is None and bind.value is not None:  # a literal in the statement, e.g. status = 'leased'
                defaults[name] = proc(bind.value) if proc is not None else bind.value
        self.defaults = defaults
        self.order: tuple[str, ...] | None = tuple(compiled.positiontup) if dialect.positional else None
        self.result_procs: list[tuple[int, _Proc]] = []
        for index, column in enumerate(compiled._result_columns):
            proc = column[3].dialect_impl(dialect).result_processor(dialect, None)
            if proc is not None:
                self.result_procs.append((index, proc))


class Prepared:
    """A Core statement run on the transaction's DBAPI connection; see the module docstring."""

    __slots__ = ("stmt", "_by_dialect", "__weakref__")

    def __init__(self, stmt: ClauseElement) -> None:
        self.stmt = stmt
        self._by_dialect: weakref.WeakKeyDictionary[Dialect, _Compiled] = weakref.WeakKeyDictionary()

    def _compiled(self, dialect: Dialect) -> _Compiled:
        got = self._by_dialect.get(dialect)
        if got is None:
            got = self._by_dialect[dialect] = _Compiled(self.stmt, dialect)
        return got

    def _run(self, conn: Connection, params: Mapping[str, Any]):  # noqa: ANN202
        c = self._compiled(conn.dialect)
        values = dict(c.defaults)
        procs = c.bind_procs
        for name, value in params.items():
            proc = procs.get(name)
            values[name] = proc(value) if proc is not None and value is not None else value
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        args = tuple(values[n] for n in c.order) if c.order is not None else values
        try:
            cursor.execute(c.sql, args)
        except conn.dialect.loaded_dbapi.Error as e:
            # Wrapped as Connection.execute would (IntegrityError, OperationalError, ...), so the
            # app's handlers answer 409 / 503 instead of 500.
            cursor.close()
            raise DBAPIError.instance(c.sql, args, e, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect) from e
        return c, cursor

    def all(self, conn: Connection, **params: Any) -> list[tuple]:
        c, cursor = self._run(conn, params)
        try:
            rows = cursor.fetchall()
        finally:
            cursor.close()
        if not c.result_procs:
            return [tuple(r) for r in rows]
        out = []
        for row in rows:
            row = list(row)
            for index, proc in c.result_procs:
                row[index] = proc(row[index])
            out.append(tuple(row))
        return out

    def first(self, conn: Connection, **params: Any) -> tuple | None:
        rows = self.all(conn, **params)
        return rows[0] if rows else None

    def scalar(self, conn: Connection, **params: Any) -> Any:
        row = self.first(conn, **params)
        return row[0] if row else None

    def execute(self, conn: Connection, **params: Any) -> int:
        """Run a statement without rows; returns the DBAPI rowcount."""
        _, cursor = self._run(conn, params)
        try:
            return cursor.rowcount
        finally:
            cursor.close()
