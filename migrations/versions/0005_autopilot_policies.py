"""autopilot_policies: autopilot policies set from the server, per project and per run

Revision ID: 0005_autopilot_policies
Revises: 0004_commands
Create Date: 2026-12-14

One new table; nothing existing changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_autopilot_policies"
down_revision = "0004_commands"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "autopilot_policies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name="fk_autopilot_policies_project_id_projects", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_autopilot_policies_run_id_runs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_autopilot_policies"),
    )
    for name, column, where in (
        ("uq_autopilot_policies_project_id", "project_id", "run_id IS NULL"),
        ("uq_autopilot_policies_run_id", "run_id", "run_id IS NOT NULL"),
    ):
        op.create_index(
            name,
            "autopilot_policies",
            [column],
            unique=True,
            sqlite_where=sa.text(where),
            postgresql_where=sa.text(where),
        )


def downgrade() -> None:
    op.drop_table("autopilot_policies")
