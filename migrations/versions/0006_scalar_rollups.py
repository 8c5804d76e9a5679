"""scalar_rollups: per-bucket summaries of scalar points at widths of 64 to 65536 steps

Revision ID: 0006_scalar_rollups
Revises: 0005_autopilot_policies
Create Date: 2026-12-16

One new table, backfilled from the points already stored: level 6 from scalar_points, each
coarser level from the one below it, every level one INSERT ... SELECT ... GROUP BY. The
argmin/argmax, first/last and first-non-finite columns are correlated subqueries that walk
the (key_id, step) index within one bucket. Finite, NaN and the infinities are told apart
by comparisons with bound infinities, which read the same on both backends: SQLite stores
NaN as NULL, PostgreSQL as NaN, which it sorts above +Infinity.
"""

from __future__ import annotations

import itertools
import math

import sqlalchemy as sa
from alembic import op

revision = "0006_scalar_rollups"
down_revision = "0005_autopilot_policies"
branch_labels = None
depends_on = None

# The levels of server/rollups.py when this revision was written.
LEVELS = (6, 8, 10, 12, 14, 16)

_COLUMNS = (
    "key_id, level, bucket, n_points, min_value, min_step, min_wall, max_value, max_step, max_wall,"
    " first_step, first_value, last_step, last_value, nan_count, pinf_count, ninf_count,"
    " first_nan_step, first_nan_wall, first_pinf_step, first_pinf_wall, first_ninf_step, first_ninf_wall"
)
FINITE = "(p.value > :ninf AND p.value < :pinf)"
IS_NAN = "(p.value IS NULL OR p.value > :pinf)"
KINDS = (("nan", IS_NAN), ("pinf", "p.value = :pinf"), ("ninf", "p.value = :ninf"))


def _from_points(level: int) -> str:
    """Level ``level`` from scalar_points."""

    def point(column: str, where: str, order: str = "p.step, p.wall_time") -> str:
        return (
            f"(SELECT {column} FROM scalar_points p WHERE p.key_id = g.key_id"
            f" AND p.step BETWEEN g.first_step AND g.last_step AND {where} ORDER BY {order} LIMIT 1)"
        )

    as_stored = f"CASE WHEN {IS_NAN} THEN NULL ELSE p.value END"
    marks = []
    for kind, cond in KINDS:
        step = f"g.first_{kind}_step"
        wall = point("p.wall_time", f"p.step = {step} AND {cond}")
        marks += [step, f"CASE WHEN {step} IS NULL THEN NULL ELSE {wall} END"]
    return (
        f"INSERT INTO scalar_rollups ({_COLUMNS}) SELECT g.key_id, {level}, g.bucket, g.n_points,"
        f" g.min_value, {point('p.step', 'p.value = g.min_value')}, {point('p.wall_time', 'p.value = g.min_value')},"
        f" g.max_value, {point('p.step', 'p.value = g.max_value')}, {point('p.wall_time', 'p.value = g.max_value')},"
        f" g.first_step, {point(as_stored, 'p.step = g.first_step')},"
        f" g.last_step, {point(as_stored, 'p.step = g.last_step', 'p.wall_time DESC')},"
        f" g.nan_count, g.pinf_count, g.ninf_count, {', '.join(marks)}"
        f" FROM (SELECT p.key_id, p.step >> {level} AS bucket, count(*) AS n_points,"
        f" min(CASE WHEN {FINITE} THEN p.value END) AS min_value,"
        f" max(CASE WHEN {FINITE} THEN p.value END) AS max_value,"
        " min(p.step) AS first_step, max(p.step) AS last_step, "
        + ", ".join(f"sum(CASE WHEN {cond} THEN 1 ELSE 0 END) AS {kind}_count" for kind, cond in KINDS)
        + ", "
        + ", ".join(f"min(CASE WHEN {cond} THEN p.step END) AS first_{kind}_step" for kind, cond in KINDS)
        + f" FROM scalar_points p GROUP BY p.key_id, p.step >> {level}) g"
    )


def _from_level(level: int, finer: int) -> str:
    """Level ``level`` from the rows of level ``finer``."""

    def child(column: str, where: str) -> str:
        return (
            f"(SELECT r.{column} FROM scalar_rollups r WHERE r.key_id = g.key_id AND r.level = {finer}"
            f" AND r.bucket BETWEEN g.lo AND g.hi AND {where} ORDER BY r.bucket LIMIT 1)"
        )

    arg = []
    for side in ("min", "max"):
        arg += [
            f"g.{side}_value",
            child(f"{side}_step", f"r.{side}_value = g.{side}_value"),
            child(f"{side}_wall", f"r.{side}_value = g.{side}_value"),
        ]
    marks = []
    for kind, _ in KINDS:
        step = f"first_{kind}_step"
        marks += [f"g.{step}", child(f"first_{kind}_wall", f"r.{step} = g.{step}")]
    return (
        f"INSERT INTO scalar_rollups ({_COLUMNS}) SELECT g.key_id, {level}, g.bucket, g.n_points, {', '.join(arg)},"
        f" g.first_step, {child('first_value', 'r.first_step = g.first_step')},"
        f" g.last_step, {child('last_value', 'r.last_step = g.last_step')},"
        f" g.nan_count, g.pinf_count, g.ninf_count, {', '.join(marks)}"
        f" FROM (SELECT key_id, bucket >> {level - finer} AS bucket, min(bucket) AS lo, max(bucket) AS hi,"
        " sum(n_points) AS n_points, min(min_value) AS min_value, max(max_value) AS max_value,"
        " min(first_step) AS first_step, max(last_step) AS last_step, sum(nan_count) AS nan_count,"
        " sum(pinf_count) AS pinf_count, sum(ninf_count) AS ninf_count, min(first_nan_step) AS first_nan_step,"
        " min(first_pinf_step) AS first_pinf_step, min(first_ninf_step) AS first_ninf_step"
        f" FROM scalar_rollups WHERE level = {finer} GROUP BY key_id, bucket >> {level - finer}) g"
    )


def upgrade() -> None:
    op.create_table(
        "scalar_rollups",
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("n_points", sa.BigInteger(), nullable=False),
        sa.Column("min_value", sa.Double(), nullable=True),
        sa.Column("min_step", sa.BigInteger(), nullable=True),
        sa.Column("min_wall", sa.Double(), nullable=True),
        sa.Column("max_value", sa.Double(), nullable=True),
        sa.Column("max_step", sa.BigInteger(), nullable=True),
        sa.Column("max_wall", sa.Double(), nullable=True),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("first_value", sa.Double(), nullable=True),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("last_value", sa.Double(), nullable=True),
        sa.Column("nan_count", sa.BigInteger(), nullable=False),
        sa.Column("pinf_count", sa.BigInteger(), nullable=False),
        sa.Column("ninf_count", sa.BigInteger(), nullable=False),
        sa.Column("first_nan_step", sa.BigInteger(), nullable=True),
        sa.Column("first_nan_wall", sa.Double(), nullable=True),
        sa.Column("first_pinf_step", sa.BigInteger(), nullable=True),
        sa.Column("first_pinf_wall", sa.Double(), nullable=True),
        sa.Column("first_ninf_step", sa.BigInteger(), nullable=True),
        sa.Column("first_ninf_wall", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", "level", "bucket", name="pk_scalar_rollups"),
    )
    conn = op.get_bind()
    conn.execute(sa.text(_from_points(LEVELS[0])), {"pinf": math.inf, "ninf": -math.inf})
    for finer, level in itertools.pairwise(LEVELS):
        conn.execute(sa.text(_from_level(level, finer)))


def downgrade() -> None:
    op.drop_table("scalar_rollups")
