"""A floor made as an application's is: other people's libraries (an ORM with its tables,
a validation library, an HTTP client), logging configured and a database opened at import.

``idlers``: four workers that idle exactly as ``prefork probe``'s children do: they run the
probe's own loop (:func:`prefork.probe_run.serve`) on a pipe nobody writes to, after saying
``ready PID`` on the FIFO named by ``PREFORK_TEST_READY`` (as the probe's children say it on
their socket). So a test can set children of ``prefork run`` beside the probe's. Both
descriptors are opened at import: a child that looked its FIFO up in ``os.environ`` and
opened it held 15-20 pages (4-5%) more than the probe's children, which run nothing else.
"""

from __future__ import annotations

import datetime
import logging
import os

import pydantic
import sqlalchemy
import tornado.httpclient
from sqlmodel import Field, Session, SQLModel, select

from prefork import Fleet, Worker
from prefork.probe_run import serve

logging.basicConfig(format="APP %(name)s %(levelname)s %(message)s", level=logging.WARNING)
log = logging.getLogger("app")


def _table(name: str) -> type[SQLModel]:
    """One of the application's tables: a key, a few typed columns, an index."""
    namespace = {
        "__annotations__": {"id": int | None, "name": str, "amount": float,
                            "created": datetime.datetime, "note": str | None},
        "__tablename__": name.lower(),
        "id": Field(default=None, primary_key=True),
        "name": Field(index=True, max_length=120),
        "note": Field(default=None),
    }
    return type(name, (SQLModel,), namespace, table=True)


TABLES = [_table(f"Record{i:02d}") for i in range(24)]


class Order(pydantic.BaseModel):
    """What the application validates at its edge."""

    id: int
    customer: str = pydantic.Field(min_length=1)
    lines: list[tuple[str, int]]
    total: float = pydantic.Field(ge=0)


ENGINE = sqlalchemy.create_engine("sqlite://")
SQLModel.metadata.create_all(ENGINE)
with Session(ENGINE) as _session:  # a query at import, as an application's start-up runs
    _session.exec(select(TABLES[0])).all()
HTTP = tornado.httpclient.HTTPRequest("http://127.0.0.1:9/", method="GET")
log.warning("floor imported: %d tables", len(TABLES))


# Opened at import, in the master, as an application opens its files: the children
# inherit them, and their own code is the probe's loop alone.
_READY = os.open(os.environ.get("PREFORK_TEST_READY", os.devnull), os.O_WRONLY)
_QUIET, _NEVER_WRITTEN = os.pipe()


def idle_as_probed() -> None:
    """The probe's idle loop, forever: its ``ready PID`` to the test, then no command."""
    serve(WORKER, _QUIET, _READY)


WORKER = Worker("idler", idle_as_probed, replicas=4)
idlers = Fleet("real-floor", [WORKER])
