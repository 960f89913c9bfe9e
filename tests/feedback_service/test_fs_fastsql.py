"""fastsql.Prepared: Core statements run on the DBAPI cursor keep SQLAlchemy's types and errors."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import JSON

from feedback_service.db import make_engine
from feedback_service.fastsql import Prepared

meta = MetaData()
things = Table(
    "fastsql_things",
    meta,
    Column("id", Integer, primary_key=True),
    Column("name", String(32), unique=True),
    Column("at", DateTime),
    Column("data", JSON),
)
INSERT = Prepared(insert(things).values(name=bindparam("name"), at=bindparam("at"), data=bindparam("data", type_=JSON())).returning(things.c.id))
BY_TIME = Prepared(select(things.c.id, things.c.at, things.c.data).where(things.c.at > bindparam("after", type_=DateTime()), things.c.name != "skip").order_by(things.c.id))


def test_types_round_trip_and_errors_are_sqlalchemy_errors(db_url) -> None:
    engine = make_engine(db_url)
    meta.create_all(engine)
    try:
        t1, t2 = datetime(2026, 1, 1, 12, 0, 0), datetime(2026, 1, 1, 12, 0, 0, 123456)
        with engine.begin() as conn:
            a = INSERT.scalar(conn, name="a", at=t1, data={"x": [1, 2]})
            b = INSERT.scalar(conn, name="b", at=t2, data=[[3], [4, 5]])
            INSERT.scalar(conn, name="skip", at=t2, data=None)
            assert b > a
            # DateTime compares as SQLAlchemy stores it (on SQLite: a string with microseconds)
            assert BY_TIME.all(conn, after=t1) == [(b, t2, [[3], [4, 5]])]
            assert BY_TIME.first(conn, after=datetime(2025, 1, 1)) == (a, t1, {"x": [1, 2]})
            assert BY_TIME.scalar(conn, after=t2) is None
        with pytest.raises(IntegrityError), engine.begin() as conn:  # wrapped like Connection.execute
            INSERT.scalar(conn, name="a", at=t1, data=None)
        with pytest.raises(ValueError), engine.connect() as conn:  # expanding IN: not supported
            Prepared(select(things.c.id).where(things.c.id.in_(bindparam("ids", expanding=True)))).all(conn, ids=[1])
    finally:
        meta.drop_all(engine)
        engine.dispose()
