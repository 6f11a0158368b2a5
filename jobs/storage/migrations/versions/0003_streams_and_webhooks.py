"""job_stream, jobs.stream and jobs.webhook_token_hash

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("webhook_token_hash", sa.String(64)))
        batch.create_unique_constraint("uq_jobs_webhook_token_hash", ["webhook_token_hash"])
    op.create_table(
        "job_stream",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON()),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_stream_job_seq"),
    )


def downgrade() -> None:
    op.drop_table("job_stream")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_webhook_token_hash", type_="unique")
        batch.drop_column("webhook_token_hash")
        batch.drop_column("stream")
