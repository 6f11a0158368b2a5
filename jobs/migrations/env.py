"""Alembic environment: the URL comes from the caller (`rpq db upgrade`) or DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import jobs.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from jobs.db import make_engine, sqlite_foreign_keys_off
from jobs.settings import Settings

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
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=sqlite)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run()
