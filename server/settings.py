"""Server settings: one object, from arguments or ``TRIMTAB_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from trimtab.addresses import is_loopback
from trimtab.local_token import default_data_dir
from trimtab.protocol import MAX_FRAME_BYTES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIMTAB_", extra="ignore")

    db_url: str | None = None  # None: the embedded SQLite file in data_dir
    data_dir: Path = default_data_dir()
    host: str = "127.0.0.1"
    port: int = 8000
    auth: bool = True
    # Upgrade the schema on start (always on for the embedded default database).
    auto_upgrade: bool = False
    stale_after_s: float = 60.0
    # How long a statement waits for a lock held elsewhere before failing (SQLite busy
    # timeout, PostgreSQL lock_timeout); ingest then answers store_unavailable and agents resend.
    lock_timeout_s: float = Field(default=30.0, gt=0)
    # Never below the protocol's limit: agents size their batches to MAX_FRAME_BYTES.
    max_frame_bytes: int = Field(default=MAX_FRAME_BYTES, ge=MAX_FRAME_BYTES)
    # Batches a connection may have waiting for the writer before the server stops reading it.
    max_inflight_batches: int = Field(default=32, ge=1)
    hello_timeout_s: float = 10.0
    # How long a verified token is remembered before the database is asked again.
    token_cache_s: float = 10.0
    # The server's address as people reach it, for the run links in alerts (default
    # http://{host}:{port}; set it behind a proxy or on a non-loopback bind).
    public_url: str | None = None
    # Alert delivery to sinks (delivery.py): a request gives up after delivery_timeout_s; a
    # failed one is retried after a random wait in [0, min(cap, base * 2^(attempt-1))] until
    # it is delivery_max_age_s old or has had delivery_max_attempts tries, then it is dead.
    delivery_timeout_s: float = Field(default=10.0, gt=0)
    delivery_backoff_base_s: float = Field(default=1.0, gt=0)
    delivery_backoff_cap_s: float = Field(default=300.0, gt=0)
    delivery_max_age_s: float = Field(default=86_400.0, gt=0)
    delivery_max_attempts: int = Field(default=1000, ge=1)
    # Deliveries in flight at once, in all and per sink (a hanging sink holds only its own share).
    delivery_concurrency: int = Field(default=32, ge=1)
    delivery_per_sink: int = Field(default=4, ge=1)
    # The worker also looks for due rows this often (rows other replicas queued, lost wake-ups).
    delivery_poll_s: float = Field(default=2.0, gt=0)
    # Commands (command_hub.py): this often, overdue ones expire and the agents connected here
    # get the commands created through other replicas.
    command_sweep_s: float = Field(default=1.0, gt=0)
    # The Dash dashboard at / (off: the API only, / redirects to /docs).
    dashboard: bool = True
    # Signs the dashboard's session cookies. Unset: a random one per process, so sessions end
    # when the server restarts; behind a load balancer, give every replica the same one.
    session_secret: str | None = Field(default=None, min_length=16)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'trimtab.db'}"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def local_url(self) -> str:
        """How this process reaches its own API (the mounted dashboard calls it like any client)."""
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def embedded(self) -> bool:
        return self.db_url is None

    def check_bind(self) -> None:
        """Auth may be off only on a loopback bind: anyone who can reach the port could steer runs."""
        if not self.auth and not is_loopback(self.host):
            raise SystemExit(
                f"refusing to start: --no-auth is allowed only on a loopback address, not {self.host!r}. "
                "Create a token with `trimtab token create --scopes ingest,read,control` instead."
            )
