"""The schema, as SQLAlchemy Core tables. Alembic migrations create it; a test checks they agree.

Conventions: times are unix seconds (double precision); ``scalar_points.value`` is NULL
exactly when the value is NaN, because SQLite turns a bound NaN into NULL (PostgreSQL
stores NaN natively, and NULL is read back as NaN on both). +Inf and -Inf are stored as
themselves on both. The two point tables carry no foreign keys: ingest is their only
writer, and a per-row FK check would halve COPY speed. ``alerts.value`` follows the same
NaN-as-NULL rule (a finding always has a value).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    false,
    text,
    true,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", Double, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", String(64), nullable=False, unique=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(256), nullable=True),
    Column("status", String(16), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("last_seen_at", Double, nullable=False),
    Column("finished_at", Double, nullable=True),
    Column("host", String(256), nullable=False, server_default=""),
    Column("agent_version", String(64), nullable=False, server_default=""),
    Column("world_size", Integer, nullable=False, server_default="1"),
    Column("config", JSON, nullable=False),
    Column("drops", JSON, nullable=False),
    Column("n_points", BigInteger, nullable=False, server_default="0"),
    Column("n_histograms", BigInteger, nullable=False, server_default="0"),
    Column("n_events", BigInteger, nullable=False, server_default="0"),
    Column("last_step", BigInteger, nullable=True),
)

metric_keys = Table(
    "metric_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(256), nullable=False),
    Column("rank", Integer, nullable=False, server_default="0"),  # each rank of a run has its own series
    UniqueConstraint("run_id", "kind", "name", "rank"),
)

scalar_points = Table(
    "scalar_points",
    metadata,
    Column("key_id", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("wall_time", Double, nullable=False),
    Column("value", Double, nullable=True),
    Index("ix_scalar_points_key_id_step", "key_id", "step"),
)

# Per-bucket summaries of scalar_points (server/rollups.py), kept by ingest in the same
# transaction as the points, so a long series is viewed without reading every point.
# Values follow scalar_points' rule: NULL first_value/last_value is NaN; min/max are finite
# or NULL (the bucket holds no finite value). No foreign key, as for scalar_points.
scalar_rollups = Table(
    "scalar_rollups",
    metadata,
    Column("key_id", Integer, nullable=False),
    Column("level", Integer, nullable=False),  # buckets are 2**level steps wide
    Column("bucket", BigInteger, nullable=False),  # step >> level
    Column("n_points", BigInteger, nullable=False),
    Column("min_value", Double, nullable=True),
    Column("min_step", BigInteger, nullable=True),  # the first step holding min_value
    Column("min_wall", Double, nullable=True),
    Column("max_value", Double, nullable=True),
    Column("max_step", BigInteger, nullable=True),
    Column("max_wall", Double, nullable=True),
    Column("first_step", BigInteger, nullable=False),
    Column("first_value", Double, nullable=True),
    Column("last_step", BigInteger, nullable=False),
    Column("last_value", Double, nullable=True),
    Column("nan_count", BigInteger, nullable=False),
    Column("pinf_count", BigInteger, nullable=False),
    Column("ninf_count", BigInteger, nullable=False),
    Column("first_nan_step", BigInteger, nullable=True),
    Column("first_nan_wall", Double, nullable=True),
    Column("first_pinf_step", BigInteger, nullable=True),
    Column("first_pinf_wall", Double, nullable=True),
    Column("first_ninf_step", BigInteger, nullable=True),
    Column("first_ninf_wall", Double, nullable=True),
    PrimaryKeyConstraint("key_id", "level", "bucket"),
)

histograms = Table(
    "histograms",
    metadata,
    Column("key_id", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("wall_time", Double, nullable=False),
    Column("edges", LargeBinary, nullable=False),  # float64 little-endian, len(counts) + 1
    Column("counts", LargeBinary, nullable=False),  # int64 little-endian
    Column("nan_count", BigInteger, nullable=False),
    Column("pinf_count", BigInteger, nullable=False),
    Column("ninf_count", BigInteger, nullable=False),
    Index("ix_histograms_key_id_step", "key_id", "step"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("step", BigInteger, nullable=True),
    Column("wall_time", Double, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("level", String(16), nullable=False),
    Column("data", JSON, nullable=False),
    Index("ix_events_run_id_step", "run_id", "step"),
)

ingested_seqs = Table(
    "ingested_seqs",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("ingested_at", Double, nullable=False),
    PrimaryKeyConstraint("run_id", "rank", "seq"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("scopes", String(128), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("last_used_at", Double, nullable=True),
    Column("revoked_at", Double, nullable=True),
)

# ---------------------------------------------------------------- alerts

alert_rules = Table(
    "alert_rules",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    # NULL: the project's rule; a run id: that run's override of it
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=True),
    Column("name", String(128), nullable=False),
    Column("body", JSON, nullable=False),  # RuleSpec.to_dict()
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    # One rule of a name per project and one per run. Two partial indexes, because a unique
    # constraint over a NULL run_id would let any number of project rules share a name.
    Index(
        "uq_alert_rules_project_id_name",
        "project_id",
        "name",
        unique=True,
        sqlite_where=text("run_id IS NULL"),
        postgresql_where=text("run_id IS NULL"),
    ),
    Index(
        "uq_alert_rules_run_id_name",
        "run_id",
        "name",
        unique=True,
        sqlite_where=text("run_id IS NOT NULL"),
        postgresql_where=text("run_id IS NOT NULL"),
    ),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("rule_name", String(128), nullable=False),
    Column("key", String(256), nullable=False),
    Column("detector", String(32), nullable=False),
    Column("severity", String(16), nullable=False),  # info | warning | critical
    Column("status", String(16), nullable=False),  # firing | resolved
    Column("message", String(1024), nullable=False),
    Column("remedy", String(1024), nullable=False),
    Column("value", Double, nullable=True),  # the latest finding's value; NULL is NaN
    Column("baseline", Double, nullable=True),
    Column("first_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("fired_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("resolved_at", Double, nullable=True),
    Column("resolve_reason", String(32), nullable=True),  # quiet | run_finished | run_stale | rule_removed
    Column("count", Integer, nullable=False, server_default="1"),  # findings folded in
    # False while the alert opened inside its rule's cooldown and has not escalated
    Column("notified", Boolean, nullable=False, server_default=false()),
    Column("data", JSON, nullable=False),
    Index("ix_alerts_run_id_rank_rule_name_key_status", "run_id", "rank", "rule_name", "key", "status"),
    Index("ix_alerts_project_id_id", "project_id", "id"),
    Index("ix_alerts_status_id", "status", "id"),
)

sinks = Table(
    "sinks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # slack | webhook
    Column("name", String(128), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("secret", String(256), nullable=True),
    # NULL: alerts of every project
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=True),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_at", Double, nullable=False),
)

alert_deliveries = Table(
    "alert_deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("alert_id", Integer, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("sink_id", Integer, ForeignKey("sinks.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("event", String(16), nullable=False),  # firing | escalated | resolved
    Column("payload", JSON, nullable=False),  # the alert as it was when enqueued
    Column("status", String(16), nullable=False),  # pending | delivered | dead
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Double, nullable=False),
    Column("last_error", String(1024), nullable=True),
    Column("created_at", Double, nullable=False),
    Column("delivered_at", Double, nullable=True),
    Index("ix_alert_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
)

detector_states = Table(
    "detector_states",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("rule_name", String(128), nullable=False),
    Column("key", String(256), nullable=False),
    Column("state", JSON, nullable=False),  # RuleEvaluator.state()
    Column("step", BigInteger, nullable=False),  # the last step the state has seen
    Column("updated_at", Double, nullable=False),
    PrimaryKeyConstraint("run_id", "rank", "rule_name", "key"),
)

# ---------------------------------------------------------------- control

commands = Table(
    "commands",
    metadata,
    # the client's idempotency id, a server uuid4 hex, or the agent's id for an autopilot action
    Column("id", String(64), primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("args", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | applied | rejected | expired
    Column("source", String(16), nullable=False),  # human | autopilot
    Column("created_by", String(128), nullable=False),  # the token's name, or "autopilot"
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("delivered_at", Double, nullable=True),
    Column("finished_at", Double, nullable=True),  # applied, rejected or expired
    Column("step", BigInteger, nullable=True),  # rank 0's step where it took effect
    Column("detail", JSON, nullable=True),  # rank 0's before/after summary, or the rejection reason
    Column("ranks", JSON, nullable=False),  # {"<rank>": {"status", "step", "detail"}}
    Index("ix_commands_run_id_created_at", "run_id", "created_at"),
    Index("ix_commands_status_expires_at", "status", "expires_at"),
)

autopilot_policies = Table(
    "autopilot_policies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    # NULL: the project's policy; a run id: that run's own, in force instead of the project's
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=True),
    Column("policy", JSON, nullable=False),  # set_autopilot's args: {"enabled": bool, <option>: value}
    Column("updated_at", Double, nullable=False),
    Column("updated_by", String(128), nullable=False),  # the token's name
    # One policy per project and one per run: partial indexes, as for alert_rules (a unique
    # constraint over a NULL run_id would let a project have any number).
    Index(
        "uq_autopilot_policies_project_id",
        "project_id",
        unique=True,
        sqlite_where=text("run_id IS NULL"),
        postgresql_where=text("run_id IS NULL"),
    ),
    Index(
        "uq_autopilot_policies_run_id",
        "run_id",
        unique=True,
        sqlite_where=text("run_id IS NOT NULL"),
        postgresql_where=text("run_id IS NOT NULL"),
    ),
)
