"""endpoint_health and rpq_locks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COUNTERS = [
    "jobs_completed", "jobs_failed", "jobs_in_progress", "jobs_in_queue", "jobs_retried",
    "workers_idle", "workers_initializing", "workers_ready", "workers_running", "workers_throttled",
    "workers_unhealthy",
]


def upgrade() -> None:
    op.create_table(
        "endpoint_health",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("endpoint_name", sa.String(64), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
        *[sa.Column(name, sa.Integer()) for name in COUNTERS],
    )
    op.create_index("ix_endpoint_health_endpoint_observed", "endpoint_health", ["endpoint_name", "observed_at"])
    op.create_table(
        "rpq_locks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rpq_locks")
    op.drop_table("endpoint_health")
