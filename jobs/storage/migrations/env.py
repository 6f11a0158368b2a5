"""Alembic environment: the URL comes from the caller (`rpq db upgrade`) or DATABASE_URL."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from alembic import context
from alembic.migration import MigrationContext, MigrationInfo
from sqlmodel import SQLModel

import jobs.storage.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from jobs.settings import Settings
from jobs.storage.db import check_foreign_keys, make_engine, sqlite_foreign_keys_off

url = context.config.attributes.get("database_url") or Settings.from_env().database_url
target_metadata = SQLModel.metadata


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                          render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    try:
        with engine.connect() as connection:
            if sqlite:
                # Batch mode's table rebuilds must not cascade; see sqlite_foreign_keys_off. The
                # engine is this run's own and is disposed below, so the setting goes with it.
                sqlite_foreign_keys_off(connection)
            # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=sqlite,
                              on_version_apply=_check_foreign_keys if sqlite else None)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def _check_foreign_keys(ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any],
                        run_args: Mapping[str, Any]) -> None:
    """Alembic calls this after each step, before the step's transaction commits."""
    assert ctx.connection is not None
    direction = "upgrade" if step.is_upgrade else "downgrade"
    target = ", ".join(step.destination_revision_ids) or "base"
    check_foreign_keys(ctx.connection, after=f"the {direction} to {target}")


run()
