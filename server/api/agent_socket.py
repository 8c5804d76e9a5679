"""``/ws/v1/agent``: one connection per run. Handshake, then pipelined batches acked after commit.

The event loop only reads frames, decodes them (msgpack of packed arrays: cheap) and hands
batches to the ingest writer thread; acks go out in seq order as commits finish. At most
``max_inflight_batches`` batches per connection wait for the writer; past that the loop
stops reading, and TCP pushes back on the agent.

Commands: after ``welcome`` the connection joins the command hub (not a replay's: it applies
nothing), which sends it ``cmd`` frames; the agent's ``cmd_result`` frames are recorded in the
store in arrival order (see ``commands.record_result``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from trimtab import protocol
from trimtab.errors import ErrorCode, TrimtabError
from trimtab.protocol import Batch, Bye, CmdResult, Heartbeat, Hello, ProtocolError
from trimtab.server.commands import policies as autopilot_policies
from trimtab.server.commands import store as commands
from trimtab.server.commands.store import Command
from trimtab.server.context import ServerContext

logger = logging.getLogger("trimtab.server")

_CLOSE = object()
# Frames up to this size are decoded on the event loop (well under a millisecond).
DECODE_INLINE_BYTES = 64 * 1024


class AgentConnection:
    def __init__(self, ws: WebSocket, ctx: ServerContext) -> None:
        self.ws = ws
        self.ctx = ctx
        self.peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown"
        self.run_id = 0
        self.rank = 0
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._inflight = asyncio.Semaphore(ctx.settings.max_inflight_batches)
        self._pending: set[asyncio.Future[str]] = set()
        self._closing = False
        self._sent_commands: set[str] = set()  # ids sent on this connection (each goes out once)
        self._hub = False

    async def serve(self) -> None:
        await self.ws.accept()
        sender = asyncio.create_task(self._send_loop())
        try:
            await run_in_threadpool(self.ctx.auth.authenticate, self.ws.headers.get("authorization"), "ingest")
            hello = await self._hello()
            self.rank = hello.rank
            # a new run of a project with an autopilot policy gets it as a command (sent below)
            on_created = functools.partial(autopilot_policies.run_created, self.ctx.store)
            self.run_id, acked = await run_in_threadpool(self.ctx.store.open_run, hello, on_created)
            logger.info(
                "agent %s: run %s (%s) rank %d connected, acked seq %d",
                self.peer,
                self.run_id,
                hello.run.uid,
                hello.rank,
                acked,
            )
            self._out.put_nowait(protocol.welcome_frame(self.run_id, acked))
            if self.ctx.commands is not None and not hello.replay:
                self._hub = True
                await self.ctx.commands.connected(self)  # the run's open commands go out after welcome
            await self._read_loop()
        except TrimtabError as exc:
            logger.warning("agent %s (run %s): %s", self.peer, self.run_id or "-", exc)
            self._fail(exc)
        except WebSocketDisconnect:
            pass
        except Exception:
            logger.exception(
                "agent %s (run %s): unexpected error; closing the connection", self.peer, self.run_id or "-"
            )
            self._fail(TrimtabError(ErrorCode.INTERNAL, "internal server error (logged on the server)"))
        finally:
            if self._hub and self.ctx.commands is not None:
                self.ctx.commands.disconnected(self)
            if self._pending:
                await asyncio.wait(self._pending)  # let commits finish; acks may still go out
            self._out.put_nowait(_CLOSE)
            await sender

    async def _hello(self) -> Hello:
        try:
            data = await asyncio.wait_for(self._receive(), timeout=self.ctx.settings.hello_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(ErrorCode.HELLO_EXPECTED, "no hello within the handshake timeout") from None
        if data is None:
            raise WebSocketDisconnect()
        frame = protocol.decode_agent_frame(data, self.ctx.settings.max_frame_bytes)
        if not isinstance(frame, Hello):
            raise ProtocolError(ErrorCode.HELLO_EXPECTED, "the first frame must be a hello")
        return frame

    async def _receive(self) -> bytes | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        if data is None:
            raise ProtocolError(
                ErrorCode.BAD_FRAME, "text frames are not part of the protocol: send msgpack binary frames"
            )
        return bytes(data)

    async def _read_loop(self) -> None:
        while not self._closing:
            data = await self._receive()
            if data is None:
                return
            try:
                frame = await self._decode(data)
            except ProtocolError as exc:
                if exc.seq is None:
                    raise
                logger.warning("agent %s (run %s): rejected batch %d: %s", self.peer, self.run_id, exc.seq, exc.message)
                self._out.put_nowait(protocol.error_frame(exc.code, exc.message, seq=exc.seq))
                continue
            if isinstance(frame, Batch):
                await self._submit(frame)
            elif isinstance(frame, Heartbeat):
                await run_in_threadpool(self.ctx.store.touch_run, self.run_id, self.rank, frame.drops)
            elif isinstance(frame, Bye):
                if self._pending:
                    await asyncio.wait(self._pending)
                await run_in_threadpool(
                    self.ctx.store.finish_run, self.run_id, self.rank, frame.drops, frame.finished_at
                )
                if self.rank == 0:
                    logger.info("agent %s: run %s finished", self.peer, self.run_id)
                    if self.ctx.alerts is not None:
                        self.ctx.alerts.run_finished(self.run_id)  # its firing alerts resolve
                else:  # the run goes on until rank 0 says bye
                    logger.info("agent %s: run %s rank %d said bye", self.peer, self.run_id, self.rank)
                return
            elif isinstance(frame, CmdResult):
                outcome = await run_in_threadpool(commands.record_result, self.ctx.store, self.run_id, self.rank, frame)
                logger.info(
                    "agent %s (run %s rank %d): command %s %s (%s)",
                    self.peer,
                    self.run_id,
                    self.rank,
                    frame.id,
                    frame.status,
                    outcome.value,
                )
            elif isinstance(frame, Hello):
                raise ProtocolError(ErrorCode.BAD_FRAME, "hello was already received on this connection")

    async def _decode(self, data: bytes) -> protocol.AgentFrame:
        limit = self.ctx.settings.max_frame_bytes
        if len(data) <= DECODE_INLINE_BYTES:
            return protocol.decode_agent_frame(data, limit)
        # a large frame can take a few hundred ms to decode: keep the event loop free
        return await run_in_threadpool(protocol.decode_agent_frame, data, limit)

    async def _submit(self, batch: Batch) -> None:
        await self._inflight.acquire()
        future = asyncio.wrap_future(self.ctx.writer.submit(self.run_id, self.rank, batch))
        self._pending.add(future)
        future.add_done_callback(functools.partial(self._stored, batch.seq))

    def _stored(self, seq: int, future: asyncio.Future[str]) -> None:
        self._pending.discard(future)
        self._inflight.release()
        exc = future.exception()
        if exc is None:
            self._out.put_nowait(protocol.ack_frame(seq))
            return
        if isinstance(exc, ProtocolError) and exc.seq is not None:
            logger.warning("agent %s (run %s): batch %d rejected (%s)", self.peer, self.run_id, seq, exc.code.value)
            self._out.put_nowait(protocol.error_frame(exc.code, exc.message, seq=exc.seq))
            return
        error = exc if isinstance(exc, TrimtabError) else TrimtabError(ErrorCode.INTERNAL, "could not store the batch")
        logger.warning(
            "agent %s (run %s): batch %d not stored (%s): %s",
            self.peer,
            self.run_id,
            seq,
            error.code.value,
            error.message,
        )
        self._fail(error)  # the agent reconnects later and resends everything unacked

    def send_command(self, command: Command) -> None:
        """Queue a ``cmd`` frame, once per id on this connection (the hub may offer it again)."""
        if self._closing or command.id in self._sent_commands:
            return
        self._sent_commands.add(command.id)
        self._out.put_nowait(protocol.cmd_frame(command.id, command.kind, command.args))

    def _fail(self, exc: TrimtabError) -> None:
        if self._closing:
            return
        self._closing = True
        self._out.put_nowait(protocol.error_frame(exc.code, exc.message))
        self._out.put_nowait((_CLOSE, exc.close_code, exc.message))

    async def _send_loop(self) -> None:
        try:
            while True:
                item = await self._out.get()
                if item is _CLOSE:
                    await self.ws.close(1000)
                    return
                if isinstance(item, tuple) and item[0] is _CLOSE:
                    await self.ws.close(item[1], reason=item[2][:120])
                    return
                await self.ws.send_bytes(protocol.encode(item))
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the peer went away; nothing left to tell it


async def agent_socket(ws: WebSocket) -> None:
    ctx: ServerContext = ws.app.state.trimtab
    await AgentConnection(ws, ctx).serve()
