"""``create_app(settings)``: the FastAPI application with its store, writer and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.protocol import WS_PATH
from trimtab.server.alerts.delivery import DeliveryWorker
from trimtab.server.alerts.engine import AlertEngine
from trimtab.server.api.agent_socket import agent_socket
from trimtab.server.api.alerts import router as alerts_router
from trimtab.server.api.autopilot import router as autopilot_router
from trimtab.server.api.commands import router as commands_router
from trimtab.server.api.errors import error_response, install_error_handlers
from trimtab.server.api.identity import router as identity_router
from trimtab.server.api.runs import router
from trimtab.server.api.sinks import router as sinks_router
from trimtab.server.auth import Authenticator
from trimtab.server.commands.hub import CommandHub
from trimtab.server.context import ServerContext
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.ingest import IngestWriter
from trimtab.server.settings import Settings
from trimtab.version import __version__

logger = logging.getLogger("trimtab.server")


def create_app(settings: Settings) -> FastAPI:
    """Build the app. The database must already be at the head migration (see ``serve``)."""
    engine = make_engine(settings.database_url, lock_timeout_s=settings.lock_timeout_s)
    store = Store(engine, stale_after_s=settings.stale_after_s)
    alerts = AlertEngine(store, settings.base_url)
    ctx = ServerContext(
        settings=settings,
        store=store,
        writer=IngestWriter(store, on_commit=alerts.submit),
        alerts=alerts,
        auth=Authenticator(store, enabled=settings.auth, cache_s=settings.token_cache_s),
        delivery=DeliveryWorker(store, settings),
        commands=CommandHub(store, sweep_s=settings.command_sweep_s),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate.check_schema(engine, settings.database_url)
        if ctx.delivery is not None:
            alerts.on_notify = ctx.delivery.wake
        alerts.start()
        ctx.writer.start()
        if ctx.delivery is not None:
            ctx.delivery.start()
        if ctx.commands is not None:
            ctx.commands.start()
        try:
            yield
        finally:
            if ctx.commands is not None:
                await ctx.commands.stop()
            ctx.writer.stop()
            alerts.stop()  # after the writer: it evaluates the last batches and saves detector state
            if ctx.delivery is not None:
                ctx.delivery.stop()
            engine.dispose()

    app = FastAPI(
        title="trimtab",
        version=__version__,
        description="Training-run health: ingest, query and steer. Errors are "
        '`{"error": {"code", "message"}}`; non-finite floats are the strings "NaN", "Infinity", "-Infinity".',
        lifespan=lifespan,
    )
    app.state.trimtab = ctx
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(alerts_router)
    app.include_router(sinks_router)
    app.include_router(commands_router)
    app.include_router(autopilot_router)
    app.include_router(identity_router)
    app.add_api_websocket_route(WS_PATH, agent_socket)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """The database answers and its schema is at the revision this server needs."""
        try:
            await run_in_threadpool(migrate.check_schema, engine, settings.database_url)
        except TrimtabError as exc:
            return error_response(exc.code, exc.message)
        except Exception as exc:
            return error_response(ErrorCode.STORE_UNAVAILABLE, f"database unreachable: {type(exc).__name__}")
        return JSONResponse({"status": "ready", "schema": migrate.head_revision()})

    if settings.dashboard:
        mount_dashboard(app, settings)
    else:

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/docs")

    return app


def mount_dashboard(app: FastAPI, settings: Settings) -> None:
    """The Dash UI at / (after every API route, so those match first); it calls this server's API."""
    from a2wsgi import WSGIMiddleware

    from trimtab.dashboard.app import create_dash
    from trimtab.dashboard.session import new_secret

    dash_app = create_dash(
        settings.local_url,
        auth=settings.auth,
        secret=settings.session_secret or new_secret(),
        secure_cookie=settings.base_url.startswith("https://"),
    )
    wsgi = WSGIMiddleware(dash_app.server)  # type: ignore[arg-type]

    async def dashboard(scope: Scope, receive: Receive, send: Send) -> None:
        # Dash answers every path no API route matched, except under /api/: a mistyped API
        # path (or a wrong method) stays a JSON error, never the dashboard's HTML.
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http" and scope["path"].startswith("/api/"):
            message = f"no API route {scope['method']} {scope['path']} (see /docs)"
            await error_response(ErrorCode.NOT_FOUND, message)(scope, receive, send)
        else:
            await wsgi(scope, receive, send)  # type: ignore[arg-type]

    app.mount("/", dashboard)
