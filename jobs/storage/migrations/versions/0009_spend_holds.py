"""spend_holds: each spell of the spend guard holding new jobs; an index for purging billing records by hour

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)
OPEN = sa.text("ended_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "spend_holds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("started_at", TIME, nullable=False),
        sa.Column("ended_at", TIME),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    # One open spell per scope: two dispatchers seeing the same hold begin cannot both record it.
    op.create_index("ix_spend_holds_scope_open", "spend_holds", ["scope"], unique=True,
                    sqlite_where=OPEN, postgresql_where=OPEN)
    op.create_index("ix_spend_holds_started_at", "spend_holds", ["started_at"])
    # Retention deletes billing records by hour; (endpoint_id, start) cannot serve a range on start alone.
    op.create_index("ix_billing_records_start", "billing_records", ["start"])


def downgrade() -> None:
    op.drop_index("ix_billing_records_start", table_name="billing_records")
    op.drop_index("ix_spend_holds_started_at", table_name="spend_holds")
    op.drop_index("ix_spend_holds_scope_open", table_name="spend_holds")
    op.drop_table("spend_holds")
