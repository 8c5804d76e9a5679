"""The delivery worker: sends queued alert deliveries to Slack and webhook sinks.

One thread per server process runs an asyncio loop with one ``httpx.AsyncClient``. It wakes
when the alert engine calls :meth:`DeliveryWorker.wake` after committing (the happy path
has no polling delay), when an earlier retry falls due, and every ``delivery_poll_s`` (rows
another replica queued). Each delivery is its own task with a hard deadline, so a receiver
that hangs holds one task of its own sink and never delays other sinks or ingest.

A 2xx marks the row delivered, and a delivered row is never sent again. Anything else (a
status outside 2xx, a timeout, a refused connection, an answer that is not HTTP) schedules
a retry with exponential backoff and full jitter, until the row is ``delivery_max_age_s``
old or has had ``delivery_max_attempts`` tries; then it is ``dead`` with its last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from trimtab.server.alerts import messages as notify
from trimtab.server.alerts import outbox
from trimtab.server.alerts.outbox import Claimed
from trimtab.server.db.store import Store
from trimtab.server.settings import Settings

logger = logging.getLogger("trimtab.server.alerts.delivery")

ERROR_BODY_BYTES = 300  # of a failed answer's body kept in last_error
STOP_GRACE_S = 3.0  # in-flight sends may finish this long at shutdown, then are released


@dataclass(frozen=True)
class Outcome:
    status: int | None  # the receiver's HTTP status; None when there was no answer
    error: str | None  # None exactly when delivered (2xx)
    retry_after_s: float | None = None  # the receiver's Retry-After, when it sent one

    @property
    def delivered(self) -> bool:
        return self.error is None


def build_request(
    kind: str, secret: str | None, event: str, delivery: str, payload: dict[str, object]
) -> notify.Request:
    delivery_id = int(delivery) if delivery.isdigit() else None
    if kind == "slack":
        return notify.slack_request(event, payload)
    body = notify.webhook_body(event, delivery_id, payload)
    return notify.webhook_request(secret or "", body, delivery, int(time.time()))


async def send(client: httpx.AsyncClient, url: str, request: notify.Request, timeout_s: float) -> Outcome:
    """POST ``request`` to ``url`` with a hard overall deadline; never raises for receiver faults."""

    async def post() -> Outcome:
        async with client.stream("POST", url, content=request.body, headers=request.headers) as resp:
            if 200 <= resp.status_code < 300:
                return Outcome(resp.status_code, None)
            head = b""
            async for chunk in resp.aiter_bytes():
                head += chunk
                if len(head) >= ERROR_BODY_BYTES:
                    break
            text = head[:ERROR_BODY_BYTES].decode("utf-8", "replace").strip()
            error = f"HTTP {resp.status_code}" + (f": {text}" if text else "")
            return Outcome(resp.status_code, error, _retry_after(resp.headers.get("retry-after")))

    try:
        return await asyncio.wait_for(post(), timeout_s)
    except asyncio.TimeoutError:
        return Outcome(None, f"no answer within {timeout_s:g} s")
    except httpx.ConnectError as exc:
        return Outcome(None, f"cannot connect: {exc or type(exc).__name__}")
    except httpx.HTTPError as exc:  # a reset, or an answer that is not HTTP
        return Outcome(None, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # an OSError, or a URL the client refuses: a failed attempt, not a dead worker
        return Outcome(None, f"{type(exc).__name__}: {exc}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def make_client(settings: Settings) -> httpx.AsyncClient:
    # No redirects: a signed request must reach the URL the admin configured, and a 3xx is a failure.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.delivery_timeout_s),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=settings.delivery_concurrency, max_keepalive_connections=8),
    )


class DeliveryWorker:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._busy: dict[int, int] = {}  # sink id -> deliveries in flight
        self._tasks: dict[asyncio.Task[None], Claimed] = {}
        self.claims = 0  # claim transactions run, for stats: an idle worker runs few
        self._thread = threading.Thread(target=self._run, name="trimtab-delivery", daemon=True)

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def wake(self) -> None:
        """Look for due deliveries now. Thread-safe; cheap; a no-op once stopped."""
        loop, event = self._loop, self._event
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(event.set)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop (worker thread)
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            logger.exception("the delivery worker stopped")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._event.set()  # look once at start: rows left pending by a previous process
        self._ready.set()
        async with make_client(self.settings) as client:
            while not self._stopping:
                self._event.clear()
                delay = self.settings.delivery_poll_s
                looked = time.time()
                try:
                    while not self._stopping:
                        looked = time.time()
                        if not await self._claim_and_send(client):
                            break
                    due = await asyncio.to_thread(self._next_due, dict(self._busy))
                    # A row due before the claim that found nothing is one it could not take
                    # (another replica holds it): look again at the next poll, not at once.
                    if due is not None and due > looked:
                        delay = min(delay, max(0.0, due - time.time()))
                except Exception as exc:
                    logger.warning("delivery worker: cannot read the outbox (%s); retrying", exc)
                if not self._event.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._event.wait(), delay)
            await self._shutdown()

    async def _claim_and_send(self, client: httpx.AsyncClient) -> bool:
        room = self.settings.delivery_concurrency - len(self._tasks)
        if room <= 0:
            return False
        claimed = await asyncio.to_thread(self._claim, room, dict(self._busy))
        for item in claimed:
            self._busy[item.sink_id] = self._busy.get(item.sink_id, 0) + 1
            task = asyncio.create_task(self._deliver(client, item))
            self._tasks[task] = item
            task.add_done_callback(self._done)
        return bool(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        item = self._tasks.pop(task)
        left = self._busy.get(item.sink_id, 1) - 1
        if left > 0:
            self._busy[item.sink_id] = left
        else:
            self._busy.pop(item.sink_id, None)
        if self._event is not None:
            self._event.set()  # room for more, and the next row of this (alert, sink) may be due

    async def _deliver(self, client: httpx.AsyncClient, item: Claimed) -> None:
        try:
            request = build_request(item.kind, item.secret, item.event, str(item.id), item.payload)
        except Exception as exc:  # a payload that cannot be encoded: retried, then dead, never stuck
            outcome = Outcome(None, f"cannot build the request: {type(exc).__name__}: {exc}")
        else:
            outcome = await send(client, item.url, request, self.settings.delivery_timeout_s)
        try:
            await asyncio.to_thread(self._record, item, outcome)
        except Exception as exc:
            # The lease runs out and the row is sent again: at least once, never lost.
            logger.error("delivery %d: cannot record the outcome (%s); it will be retried", item.id, exc)

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            unsent = [self._tasks[t] for t in running if t in self._tasks]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            if unsent:
                try:
                    await asyncio.to_thread(self._release, unsent)
                except Exception as exc:
                    logger.warning("delivery worker: could not release %d claimed rows (%s)", len(unsent), exc)

    # ------------------------------------------------------------------ database (thread pool)
    def _claim(self, limit: int, busy: dict[int, int]) -> list[Claimed]:
        # Long enough that a live worker always records its outcome before anyone may reclaim.
        lease_s = self.settings.delivery_timeout_s * 2 + 30
        self.claims += 1
        with self.store.transaction() as conn:
            return outbox.claim(
                conn,
                time.time(),
                lease_s,
                limit,
                self.settings.delivery_per_sink,
                busy,
                skip_locked=not self.store.sqlite,
            )

    def _next_due(self, busy: dict[int, int]) -> float | None:
        with self.store.transaction() as conn:
            return outbox.next_due(conn, outbox.full_sinks(busy, self.settings.delivery_per_sink))

    def _record(self, item: Claimed, outcome: Outcome) -> None:
        now = time.time()
        with self.store.transaction() as conn:
            if outcome.delivered:
                ours = outbox.mark_delivered(conn, item, now)
            else:
                retry_at = self._retry_at(item, outcome, now)
                ours = outbox.mark_failed(conn, item, outcome.error or "failed", now, retry_at)
                if retry_at is None:
                    logger.warning(
                        "delivery %d to sink %d is dead after %d attempts: %s",
                        item.id,
                        item.sink_id,
                        item.attempts,
                        outcome.error,
                    )
        if not ours:
            logger.warning("delivery %d: the row changed while it was being sent (lease ran out)", item.id)

    def _retry_at(self, item: Claimed, outcome: Outcome, now: float) -> float | None:
        s = self.settings
        if item.attempts >= s.delivery_max_attempts:
            return None
        wait = outbox.backoff_s(item.attempts, s.delivery_backoff_base_s, s.delivery_backoff_cap_s)
        if outcome.retry_after_s is not None:
            wait = max(wait, min(outcome.retry_after_s, s.delivery_backoff_cap_s))
        if now + wait - item.created_at > s.delivery_max_age_s:
            return None
        return now + wait

    def _release(self, items: list[Claimed]) -> None:
        with self.store.transaction() as conn:
            outbox.release(conn, items, time.time())
