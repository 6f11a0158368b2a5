"""ix_jobs_endpoint_status_finished_at: an endpoint's newest completed jobs, for the poll plan

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Each worker process reads an endpoint's newest 200 completed jobs every 30 s (jobs.flow.endpoint_times):
    # without this index that is a scan and sort of every completed job of every endpoint.
    op.create_index("ix_jobs_endpoint_status_finished_at", "jobs", ["endpoint_id", "status", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_endpoint_status_finished_at", table_name="jobs")
