"""Named leases in the database, so a periodic job runs once however many beats there are.

A lease, not a session lock: it survives no process, expires on its own if its holder dies, and
works the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from jobs.db import session_scope
from jobs.models import Lock, utcnow


def try_acquire(engine: Engine, name: str, *, owner: str, lease: timedelta) -> bool:
    """Take the lease `name` for `owner` if it is free, expired or already ours."""
    now = utcnow()
    with session_scope(engine) as session:
        taken = session.execute(
            update(Lock)
            .where(col(Lock.name) == name, (col(Lock.expires_at) < now) | (col(Lock.owner) == owner))
            .values(owner=owner, expires_at=now + lease)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return True
    try:
        with session_scope(engine) as session:
            session.add(Lock(name=name, owner=owner, expires_at=now + lease))
        return True
    except IntegrityError:
        return False  # someone else holds it (or took it between our two statements)


def release(engine: Engine, name: str, *, owner: str) -> None:
    with session_scope(engine) as session:
        session.execute(update(Lock).where(col(Lock.name) == name, col(Lock.owner) == owner)
                        .values(expires_at=utcnow()))


@contextmanager
def held(engine: Engine, name: str, *, lease: timedelta) -> Iterator[bool]:
    """`with held(engine, "reconciler", lease=...) as mine:` runs the block's work only if `mine`."""
    owner = f"{uuid.uuid4()}"
    mine = try_acquire(engine, name, owner=owner, lease=lease)
    try:
        yield mine
    finally:
        if mine:
            release(engine, name, owner=owner)
