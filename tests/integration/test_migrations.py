"""Every migration keeps every row, on SQLite and on PostgreSQL.

For each revision before head, a fresh database is built at that revision, every column of every table
in it gets a value, and the upgrade to head must keep every row and every value that still has a column
(and the downgrade from head, every row of the tables the revision still has). Tables and columns are
reflected from the database, never written out here, and the revisions are read from the migration
files: a new migration is covered by this file as it stands. A migration that means to drop or rewrite
data fails here, and should, until this file is told so.

That the schema at head is exactly the models' is tested in test_store.py.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from jobs.storage.db import MIGRATIONS, ForeignKeyViolation, make_engine, upgrade
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.integration

ROWS_PER_TABLE = 3
MOMENT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# table name -> primary key -> column name -> value
Rows = dict[str, dict[tuple[Any, ...], dict[str, Any]]]


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = url
    return config


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def revisions_before_head() -> list[str]:
    """Every revision but the head, oldest first, read from the migration files themselves."""
    history = scripts().walk_revisions()  # newest first
    return [script.revision for script in reversed(list(history)) if not script.is_head]


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own: the session's PostgreSQL database is already at head."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rpq.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


# -- rows for any table ------------------------------------------------------------------------------


def reflect(connection: Connection) -> sa.MetaData:
    metadata = sa.MetaData()
    metadata.reflect(connection, only=lambda name, _: name != "alembic_version")
    return metadata


def sample_value(type_: sa.types.TypeEngine[Any], column: str, row: int) -> Any:
    """A value of `type_` that differs from row to row, so that unique constraints hold."""
    if isinstance(type_, sa.Enum):
        return type_.enums[row % len(type_.enums)]
    if isinstance(type_, sa.ARRAY):
        return [sample_value(type_.item_type, column, row)]
    if isinstance(type_, sa.JSON):
        return {"column": column, "row": row, "nested": [row, None, True]}
    try:
        kind = type_.python_type
    except NotImplementedError:
        raise AssertionError(f"no sample value for {column} of type {type_!r}: teach sample_value") from None
    if kind is bool:
        return row % 2 == 0
    if kind is int:
        return row + 1
    if kind is float:
        return row + 0.5
    if kind is Decimal:
        return Decimal(row) + Decimal("0.25")
    if kind is str:
        return sample_text(column, row, getattr(type_, "length", None))
    if kind is datetime:
        moment = MOMENT + timedelta(minutes=row)
        return moment if getattr(type_, "timezone", False) else moment.replace(tzinfo=None)
    if kind is date:
        return MOMENT.date() + timedelta(days=row)
    if kind is time:
        return time(12, row)
    if kind is timedelta:
        return timedelta(seconds=row + 1)
    if kind is bytes:
        return f"{column}-{row}".encode()
    if kind is uuid.UUID:
        return uuid.UUID(int=row + 1)
    raise AssertionError(f"no sample value for {column} of type {type_!r} ({kind}): teach sample_value")


def sample_text(column: str, row: int, length: int | None) -> str:
    suffix = f"-{row}"
    if length is None:
        return column + suffix
    return (column[: max(length - len(suffix), 0)] + suffix)[-length:]


def writable(column: sa.Column[Any]) -> bool:
    """False for columns the database fills in and refuses values for."""
    always_generated = column.identity is not None and bool(column.identity.always)
    return column.computed is None and not always_generated


def sample_rows(table: sa.Table, written: Rows) -> list[dict[str, Any]]:
    """Rows with a value in every column, nullable or not, so that a migration that drops one is caught.

    Values differ from row to row, so unique constraints hold. A foreign key points at a row already
    written to its parent (row i at the parent's row i), or at the row itself when the table refers to
    itself."""
    rows = [{column.name: sample_value(column.type, column.name, row)
             for column in table.columns if writable(column) and not column.foreign_keys}
            for row in range(ROWS_PER_TABLE)]
    for constraint in table.foreign_key_constraints:
        for index, row in enumerate(rows):
            if constraint.referred_table is table:
                parent = row
            else:
                parents = list(written[constraint.referred_table.name].values())
                parent = parents[index % len(parents)]
            for element in constraint.elements:
                row[element.parent.name] = parent[element.column.name]
    return rows


def read_table(connection: Connection, table: sa.Table) -> dict[tuple[Any, ...], dict[str, Any]]:
    key = list(table.primary_key.columns)
    assert key, f"{table.name} has no primary key, and this test tells rows apart by it"
    rows = connection.execute(sa.select(table).order_by(*key)).mappings()
    return {tuple(row[column.name] for column in key): dict(row) for row in rows}


def fill_every_table(url: str) -> None:
    """ROWS_PER_TABLE rows in every table there is, parents before children."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            written: Rows = {}
            for table in reflect(connection).sorted_tables:
                connection.execute(table.insert(), sample_rows(table, written))
                written[table.name] = read_table(connection, table)
    finally:
        engine.dispose()


def read_every_table(url: str) -> Rows:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {table.name: read_table(connection, table) for table in reflect(connection).sorted_tables}
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def every_table_has_rows(rows: Rows) -> bool:
    return bool(rows) and all(len(table) == ROWS_PER_TABLE for table in rows.values())


def lost_or_changed(before: Rows, after: Rows) -> list[str]:
    """What `after` no longer has of `before`: tables, rows (by primary key) and values of columns that
    are still there. New tables, rows and columns are not counted."""
    problems: list[str] = []
    for table, rows in before.items():
        if table not in after:
            problems.append(f"table {table} is gone")
            continue
        kept = after[table]
        lost = [key for key in rows if key not in kept]
        if lost:
            problems.append(f"{table}: {len(rows)} rows before, {len(kept)} after; lost {lost}")
        for key, row in rows.items():
            now = kept.get(key, {})
            problems += [f"{table} {key}: {column} was {value!r}, is {now[column]!r}"
                         for column, value in row.items() if column in now and now[column] != value]
    return problems


# -- the tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", revisions_before_head())
def test_upgrading_from_any_revision_to_head_keeps_every_row(fresh_db: str, revision: str) -> None:
    upgrade(fresh_db, revision)
    fill_every_table(fresh_db)
    before = read_every_table(fresh_db)
    assert every_table_has_rows(before)

    upgrade(fresh_db)

    assert lost_or_changed(before, read_every_table(fresh_db)) == []


@pytest.mark.parametrize("revision", revisions_before_head())
def test_downgrading_from_head_keeps_every_row_of_the_tables_the_revision_has(fresh_db: str, revision: str) -> None:
    upgrade(fresh_db)
    fill_every_table(fresh_db)
    before = read_every_table(fresh_db)
    assert every_table_has_rows(before)

    command.downgrade(alembic_config(fresh_db), revision)

    after = read_every_table(fresh_db)
    assert lost_or_changed({table: rows for table, rows in before.items() if table in after}, after) == []


def test_on_sqlite_a_step_that_leaves_rows_referring_to_nothing_fails_and_is_rolled_back(tmp_path: Path) -> None:
    # Foreign keys are off while migrations run on SQLite, so the check after each step is all that
    # notices a step orphaning rows. Rows orphaned beforehand (by any tool that left foreign keys off,
    # as SQLite does by default) stand in for such a step here.
    path = tmp_path / "rpq.db"
    url = f"sqlite:///{path}"
    revision = revisions_before_head()[-1]
    upgrade(url, revision)
    fill_every_table(url)
    delete_every_referred_row(path)
    before = read_every_table(url)

    with pytest.raises(ForeignKeyViolation, match="refer to rows that are not there"):
        upgrade(url)

    assert current_revision(url) == revision
    assert lost_or_changed(before, read_every_table(url)) == []


def delete_every_referred_row(path: Path) -> None:
    """Empty every table another table refers to, with foreign keys off, orphaning every child row."""
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            parents = {constraint.referred_table.name for table in reflect(connection).tables.values()
                       for constraint in table.foreign_key_constraints}
    finally:
        engine.dispose()
    raw = sqlite3.connect(path, isolation_level=None)  # each statement commits by itself
    try:
        raw.execute("PRAGMA foreign_keys=OFF")
        for parent in parents:
            raw.execute(f'DELETE FROM "{parent}"')
    finally:
        raw.close()
