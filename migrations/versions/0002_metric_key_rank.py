"""metric keys per rank: every rank of a multi-process run keeps its own series of a key

Revision ID: 0002_metric_key_rank
Revises: 0001_initial_schema
Create Date: 2026-12-04

Existing keys become rank 0's. Downgrading fails if two ranks of one run share a key name.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_metric_key_rank"
down_revision = "0001_initial_schema"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a table constraint in place, so it rebuilds the table.
    with op.batch_alter_table("metric_keys") as batch:
        batch.add_column(sa.Column("rank", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("uq_metric_keys_run_id_kind_name", type_="unique")
        batch.create_unique_constraint("uq_metric_keys_run_id_kind_name_rank", ["run_id", "kind", "name", "rank"])


def downgrade() -> None:
    with op.batch_alter_table("metric_keys") as batch:
        batch.drop_constraint("uq_metric_keys_run_id_kind_name_rank", type_="unique")
        batch.create_unique_constraint("uq_metric_keys_run_id_kind_name", ["run_id", "kind", "name"])
        batch.drop_column("rank")
