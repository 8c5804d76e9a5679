"""What the request handlers share: settings, the store, the ingest writer, the authenticator,
the alert engine, the delivery worker and the command hub."""

from __future__ import annotations

from dataclasses import dataclass

from trimtab.server.alerts.delivery import DeliveryWorker
from trimtab.server.alerts.engine import AlertEngine
from trimtab.server.auth import Authenticator
from trimtab.server.commands.hub import CommandHub
from trimtab.server.db.store import Store
from trimtab.server.ingest import IngestWriter
from trimtab.server.settings import Settings


@dataclass
class ServerContext:
    settings: Settings
    store: Store
    writer: IngestWriter
    auth: Authenticator
    alerts: AlertEngine | None = None  # runs the alert rules on committed batches
    delivery: DeliveryWorker | None = None  # sends the alert outbox; wake() it after queueing
    commands: CommandHub | None = None  # the agent connections of this process, by run; delivers commands
