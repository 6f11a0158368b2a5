"""Tenants: jobs.tenant and file_uploads.tenant, idempotency keys scoped per tenant, and job_meta (indexed
metadata values)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UNTENANTED = sa.text("tenant IS NULL")


def upgrade() -> None:
    # Existing jobs and uploads have no tenant (NULL): admin tokens and Python see them, as before.
    op.add_column("file_uploads", sa.Column("tenant", sa.String(64)))
    # SQLite cannot drop a constraint in place: the batch rebuilds the table, rows and all.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64)))
        batch.drop_constraint("uq_jobs_endpoint_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_jobs_endpoint_idempotency_key_tenant",
                                       ["endpoint_id", "idempotency_key", "tenant"])
    op.create_index("uq_jobs_endpoint_idempotency_key_untenanted", "jobs", ["endpoint_id", "idempotency_key"],
                    unique=True, sqlite_where=UNTENANTED, postgresql_where=UNTENANTED)
    op.create_index("ix_jobs_tenant_created_at", "jobs", ["tenant", "created_at"])
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])
    op.create_table(
        "job_meta",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.create_index("ix_job_meta_key_value", "job_meta", ["key", "value", "job_id"])


def downgrade() -> None:
    op.drop_index("ix_job_meta_key_value", table_name="job_meta")
    op.drop_table("job_meta")
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
    op.drop_index("ix_jobs_tenant_created_at", table_name="jobs")
    op.drop_index("uq_jobs_endpoint_idempotency_key_untenanted", table_name="jobs")
    # Two tenants' jobs with one key would break the old constraint: the downgrade then fails, keeping them.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_endpoint_idempotency_key_tenant", type_="unique")
        batch.create_unique_constraint("uq_jobs_endpoint_idempotency_key", ["endpoint_id", "idempotency_key"])
        batch.drop_column("tenant")
    with op.batch_alter_table("file_uploads") as batch:
        batch.drop_column("tenant")
