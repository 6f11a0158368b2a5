"""jobs.output_missing and webhook_runpod_job_id, job_events.repeats/last_at, runpod_cancels

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN with a server default: no table rebuild on SQLite, existing rows keep their data.
    op.add_column("jobs", sa.Column("output_missing", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("webhook_runpod_job_id", sa.String(128)))
    op.add_column("job_events", sa.Column("repeats", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("job_events", sa.Column("last_at", sa.DateTime(timezone=True)))
    op.create_table(
        "runpod_cancels",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("runpod_job_id", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True)),
        sa.Column("result", sa.Text()),
        sa.UniqueConstraint("job_id", "attempt", "runpod_job_id", name="uq_runpod_cancels_job_attempt_runpod"),
    )
    op.create_index("ix_runpod_cancels_open", "runpod_cancels", ["done_at", "next_try_at"])


def downgrade() -> None:
    op.drop_index("ix_runpod_cancels_open", table_name="runpod_cancels")
    op.drop_table("runpod_cancels")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("last_at")
        batch.drop_column("repeats")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_runpod_job_id")
        batch.drop_column("output_missing")
