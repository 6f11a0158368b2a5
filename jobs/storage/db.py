"""Engines, sessions and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session, create_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str) -> Engine:
    """An engine tuned for many short transactions from workers and web processes."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        # Workers are threads and processes writing one file: wait for the lock instead of
        # failing at once, and let readers run beside the writer (WAL).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            connection.isolation_level = None  # SQLAlchemy's "begin" hook below starts transactions
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            # A transaction that may write takes the write lock up front: a deferred one that reads
            # and then writes fails with "database is locked" instead of waiting when another writer
            # got in first. A read-only one must not queue behind writers, and with WAL it needn't.
            readonly = connection.get_execution_options().get(READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


READ_ONLY = "rpq_read_only"


def unreachable(exc: BaseException) -> bool:
    """The database did not answer (down, restarting, refusing connections, the connection cut), as opposed to
    refusing what was asked of it: the same transaction may well succeed later."""
    return isinstance(exc, OperationalError | InterfaceError)


@contextmanager
def session_scope(engine: Engine, *, read_only: bool = False) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises.

    `read_only` promises no writes; on SQLite it then does not take the write lock."""
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    with Session(bind, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


class ForeignKeyViolation(RuntimeError):
    """A migration left rows that refer to rows that are not there; it was not committed."""


def sqlite_foreign_keys_off(connection: Connection) -> None:
    """Stop SQLite enforcing foreign keys on `connection`, for a migration run.

    SQLite cannot ALTER most things, so Alembic's batch mode rebuilds a table: create a new one, copy
    the rows, DROP the old one, rename. With foreign keys enforced, that DROP first deletes every row
    of the old table, with the usual actions: rows referring to it ON DELETE CASCADE go too (rebuilding
    `jobs` emptied `job_events`), SET NULL references are cleared, and any other reference fails the
    migration. Alembic's batch documentation says the pragma must be off while batch mode runs.
    SQLite ignores the pragma inside a transaction, so this must run before anything on `connection`
    begins one; it reads the setting back and raises if it did not take.
    """
    cursor = connection.connection.cursor()  # the driver's own: no SQLAlchemy autobegin
    try:
        cursor.execute("PRAGMA foreign_keys=OFF")
        cursor.execute("PRAGMA foreign_keys")
        row = cursor.fetchone()
    finally:
        cursor.close()
    if row is None or row[0] != 0:
        raise RuntimeError("SQLite still enforces foreign keys: a transaction was open when they were turned off")


def check_foreign_keys(connection: Connection, *, after: str) -> None:
    """Raise ForeignKeyViolation if any row refers to a row that is not there (SQLite only).

    With enforcement off for a migration, nothing else would notice a step that orphans rows. Run it
    inside the step's transaction, so that a failing step is rolled back rather than committed."""
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if violations:
        listed = "; ".join(f"{table} rowid {rowid} -> {parent}" for table, rowid, parent, _fk in violations[:10])
        more = f" and {len(violations) - 10} more" if len(violations) > 10 else ""
        raise ForeignKeyViolation(f"after {after}, {len(violations)} row(s) refer to rows that are not there "
                                  f"({listed}{more}); the step was rolled back")


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` up to `revision` with Alembic."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = url
    command.upgrade(config, revision)
