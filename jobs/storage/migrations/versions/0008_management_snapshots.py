"""RunPod management API: endpoint and account snapshots, billing records, GPU prices, pods, collector runs,
the scale audit, and jobs.cost_usd and spend_released

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cost_usd", sa.Float()))
    op.add_column("jobs", sa.Column("spend_released", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "endpoint_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("endpoint_name", sa.String(64), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("observed_at", TIME, nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("workers_min", sa.Integer()),
        sa.Column("workers_max", sa.Integer()),
        sa.Column("idle_timeout", sa.Integer()),
        sa.Column("scaling_type", sa.String(32)),
        sa.Column("scaling_value", sa.Float()),
        sa.Column("gpu_pools", sa.String(255)),
        sa.Column("gpu_count", sa.Integer()),
        sa.Column("timeout_ms", sa.BigInteger()),
        sa.Column("flashboot", sa.Boolean()),
        *(sa.Column(f"workers_{state}", sa.Integer())
          for state in ("running", "idle", "initializing", "throttled", "unhealthy", "total")),
    )
    op.create_index("ix_endpoint_snapshots_endpoint_observed", "endpoint_snapshots", ["endpoint_name", "observed_at"])
    op.create_table(
        "account_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("observed_at", TIME, nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("balance", sa.Float()),
        sa.Column("spend_per_hour", sa.Float()),
        sa.Column("spend_limit", sa.Float()),
    )
    op.create_index("ix_account_snapshots_observed", "account_snapshots", ["observed_at"])
    op.create_table(
        "billing_records",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("start", TIME, nullable=False),
        sa.Column("end", TIME, nullable=False),
        sa.Column("total_amount", sa.Float(), nullable=False),
        sa.Column("gpu_amount", sa.Float()),
        sa.Column("observed_at", TIME, nullable=False),
        sa.UniqueConstraint("endpoint_id", "start", name="uq_billing_records_endpoint_start"),
    )
    op.create_table(
        "gpu_prices",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("observed_at", TIME, nullable=False),
        sa.Column("gpu_id", sa.String(128), nullable=False),
        sa.Column("pool", sa.String(64)),
        sa.Column("serverless_per_hour", sa.Float()),
    )
    op.create_index("ix_gpu_prices_pool_observed", "gpu_prices", ["pool", "observed_at"])
    op.create_table(
        "pod_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("observed_at", TIME, nullable=False),
        sa.Column("pod_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(255)),
        sa.Column("status", sa.String(32)),
        sa.Column("cost_per_hour", sa.Float()),
    )
    op.create_index("ix_pod_snapshots_observed", "pod_snapshots", ["observed_at"])
    op.create_table(
        "collector_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("collector", sa.String(32), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("rows", sa.Integer(), nullable=False),
    )
    op.create_index("ix_collector_runs_collector_at", "collector_runs", ["collector", "at"])
    op.create_table(
        "scale_audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", TIME, nullable=False),
        sa.Column("endpoint_name", sa.String(64), nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text()),
        *(sa.Column(f"{when}_{what}", sa.Integer())
          for when in ("before", "asked", "after") for what in ("min", "max", "idle_timeout")),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_scale_audit_endpoint_at", "scale_audit", ["endpoint_name", "at"])


def downgrade() -> None:
    for index, table in (("ix_scale_audit_endpoint_at", "scale_audit"),
                         ("ix_collector_runs_collector_at", "collector_runs"),
                         ("ix_pod_snapshots_observed", "pod_snapshots"),
                         ("ix_gpu_prices_pool_observed", "gpu_prices"),
                         ("ix_account_snapshots_observed", "account_snapshots"),
                         ("ix_endpoint_snapshots_endpoint_observed", "endpoint_snapshots")):
        op.drop_index(index, table_name=table)
    for table in ("scale_audit", "collector_runs", "pod_snapshots", "gpu_prices", "billing_records",
                  "account_snapshots", "endpoint_snapshots"):
        op.drop_table(table)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("spend_released")
        batch.drop_column("cost_usd")
