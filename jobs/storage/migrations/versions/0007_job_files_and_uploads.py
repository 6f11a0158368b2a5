"""job_files, file_uploads, and the jobs columns that point at files

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN with server defaults: no table rebuild on SQLite, existing rows keep their data.
    op.add_column("jobs", sa.Column("has_files", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("files_missing", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("worker_s3", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("input_key", sa.Text()))
    op.add_column("jobs", sa.Column("output_key", sa.Text()))
    op.create_table(
        "job_files",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("key", sa.Text()),
        sa.Column("content_type", sa.String(255)),
        sa.Column("size", sa.BigInteger()),
        sa.Column("etag", sa.String(128)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owned", sa.Boolean(), nullable=False),
        sa.Column("max_bytes", sa.BigInteger()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("job_id", "attempt", "role", "name", name="uq_job_files_job_attempt_role_name"),
    )
    op.create_table(
        "file_uploads",
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("max_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_file_uploads_created_at", "file_uploads", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_file_uploads_created_at", table_name="file_uploads")
    op.drop_table("file_uploads")
    op.drop_table("job_files")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("output_key")
        batch.drop_column("input_key")
        batch.drop_column("worker_s3")
        batch.drop_column("files_missing")
        batch.drop_column("has_files")
