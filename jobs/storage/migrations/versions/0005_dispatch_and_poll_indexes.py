"""jobs.priority, and the indexes the dispatcher and the poller read by

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    # The dispatcher's question: an endpoint's next PENDING jobs, by priority then age.
    op.create_index("ix_jobs_dispatch", "jobs", ["endpoint_id", "status", "priority", "created_at"])
    # The poller's question: an endpoint's jobs at RunPod whose poll is due.
    op.create_index("ix_jobs_poll_due", "jobs", ["endpoint_id", "status", "next_poll_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_poll_due", table_name="jobs")
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
