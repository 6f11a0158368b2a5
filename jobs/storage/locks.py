"""Named leases in the database, so a periodic job runs once however many beats there are.

A lease, not a session lock: it survives no process, expires on its own if its holder dies, and
works the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from jobs.storage.db import session_scope
from jobs.storage.models import Lock, utcnow


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


@dataclass
class Lease:
    """A lease taken (or not) by `held`: true when ours. A holder that works longer than one lease
    renews it as it goes, so the lease can be short: a holder killed mid-run (SIGKILL) blocks the
    others only until its lease runs out."""

    engine: Engine
    name: str
    owner: str
    length: timedelta
    mine: bool

    def __bool__(self) -> bool:
        return self.mine

    def renew(self) -> bool:
        """Extend the lease by its length from now; False if it is no longer ours (it ran out and
        someone else took it), and the holder should stop."""
        self.mine = self.mine and try_acquire(self.engine, self.name, owner=self.owner, lease=self.length)
        return self.mine


@contextmanager
def held(engine: Engine, name: str, *, lease: timedelta, keep_for: timedelta = timedelta(0)) -> Iterator[Lease]:
    """`with held(engine, "reconciler", lease=...) as mine:` runs the block's work only if `mine`.

    `keep_for`: the lease is kept until that long after it was taken, not released when the block ends. A
    periodic round passes most of its interval, because every beat sends one round per interval: released at
    once, the lease would let the next beat's round of the same interval run too."""
    started = utcnow()
    taken = Lease(engine, name, owner=f"{uuid.uuid4()}", length=lease, mine=False)
    taken.mine = try_acquire(engine, name, owner=taken.owner, lease=lease)
    try:
        yield taken
    finally:
        left = started + keep_for - utcnow()
        if taken.mine and left > timedelta(0):
            try_acquire(engine, name, owner=taken.owner, lease=left)
        elif taken.mine:
            release(engine, name, owner=taken.owner)
