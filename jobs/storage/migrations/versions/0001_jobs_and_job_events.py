"""jobs and job_events

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written out by hand (no imports from the models) so the migration still runs after the models move on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _time(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("endpoint_name", sa.String(64), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_status", sa.String(16)),
        sa.Column("runpod_job_id", sa.String(128)),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON()),
        sa.Column("webhook", sa.Text()),
        sa.Column("output", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("progress", sa.JSON()),
        sa.Column("metadata", sa.JSON()),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("poll_count", sa.Integer(), nullable=False),
        sa.Column("poll_errors", sa.Integer(), nullable=False),
        sa.Column("polls_since_change", sa.Integer(), nullable=False),
        _time("next_poll_at"),
        _time("deadline_at"),
        sa.Column("last_runpod_status", sa.String(16)),
        sa.Column("runpod_retry_of", sa.String(128)),
        sa.Column("correlation_id", sa.String(128)),
        sa.Column("idempotency_key", sa.String(255)),
        _time("created_at", nullable=False),
        _time("updated_at", nullable=False),
        _time("submitted_at"),
        _time("started_at"),
        _time("finished_at"),
        sa.Column("delay_time_ms", sa.Integer()),
        sa.Column("execution_time_ms", sa.Integer()),
        sa.Column("worker_id", sa.String(128)),
        sa.UniqueConstraint("endpoint_id", "idempotency_key", name="uq_jobs_endpoint_idempotency_key"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_status_next_poll_at", "jobs", ["status", "next_poll_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_index("ix_jobs_runpod_job_id", "jobs", ["runpod_job_id"])
    op.create_index("ix_jobs_correlation_id", "jobs", ["correlation_id"])

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16), nullable=False),
        _time("at", nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text()),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"])


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("jobs")
