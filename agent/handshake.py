"""One connection attempt (connect, hello, welcome) on a thread of its own.

A server that accepts TCP but is slow to answer must not stop the sender from draining the
log buffer into the spool, so the sender starts a ``Handshake`` and polls it.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from trimtab import protocol
from trimtab.errors import ERROR_TABLE
from trimtab.local_token import local_token_path
from trimtab.options import Options

# websockets >= 17 warns unless a directly returned connection is asked for explicitly.
_CONNECT_KWARGS: dict[str, Any] = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
# Errors a reconnect cannot fix: keep spooling, retry slowly, say so once.
FATAL_CODES = frozenset({"unauthorized", "forbidden", "unsupported_version", "run_conflict", "bad_frame"})
# The close code a refusing server ends the handshake with, for when its error frame is lost.
_REFUSED_BY_CLOSE = {close: code.value for code, (_, close) in ERROR_TABLE.items() if code.value in FATAL_CODES}


class RemoteError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Handshake:
    def __init__(self, opts: Options, hello: bytes) -> None:
        self._opts = opts
        self._hello = hello
        self._lock = threading.Lock()
        self._abandoned = False
        self._done = threading.Event()
        self.ws: ClientConnection | None = None
        self.welcome: protocol.Welcome | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._run, name="trimtab-connect", daemon=True).start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def abandon(self) -> None:
        """The sender no longer wants this connection: close it now or when it arrives."""
        with self._lock:
            self._abandoned = True
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    self.ws.close()

    def failure(self) -> tuple[str, bool]:
        """(what to tell the user, whether retrying soon is pointless)."""
        exc = self.error
        server = self._opts.server
        if isinstance(exc, RemoteError):
            return f"{server} refused the connection: {exc}{_fix_for(exc.code)}", exc.code in FATAL_CODES
        if isinstance(exc, InvalidStatus):
            return f"{server} answered HTTP {exc.response.status_code} instead of a websocket", False
        if isinstance(exc, (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, protocol.ProtocolError)):
            return f"cannot reach {server}: {str(exc) or type(exc).__name__}", False
        return f"cannot connect to {server}: {type(exc).__name__}: {exc}", True

    def _run(self) -> None:
        opts = self._opts
        headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else None
        try:
            ws = connect(
                opts.ws_url,
                additional_headers=headers,
                compression=None,  # permessage-deflate costs 3-5x throughput on fast links
                open_timeout=opts.connect_timeout,
                close_timeout=2.0,
                max_size=protocol.MAX_FRAME_BYTES,
                **_CONNECT_KWARGS,
            )
            try:
                welcome = self._greet(ws)
            except BaseException:
                ws.close()
                raise
            with self._lock:
                if self._abandoned:
                    ws.close()
                    return
                self.ws, self.welcome = ws, welcome
        except Exception as exc:
            self.error = exc
        finally:
            self._done.set()

    def _greet(self, ws: ClientConnection) -> protocol.Welcome:
        # A server that refuses at once (a bad token) may close before our hello goes out: its
        # error frame is still buffered, so read it rather than report the closed socket.
        with contextlib.suppress(ConnectionClosed):
            ws.send(self._hello)
        try:
            raw = ws.recv(timeout=self._opts.connect_timeout)
        except ConnectionClosed as exc:
            close = exc.rcvd
            if close is not None and close.code in _REFUSED_BY_CLOSE:
                raise RemoteError(_REFUSED_BY_CLOSE[close.code], close.reason or "refused") from exc
            raise
        frame = protocol.decode_server_frame(raw.encode() if isinstance(raw, str) else raw)
        if isinstance(frame, protocol.ServerError):
            raise RemoteError(frame.code, frame.message)
        if not isinstance(frame, protocol.Welcome):
            raise RemoteError("bad_frame", f"expected welcome, got {type(frame).__name__.lower()}")
        return frame


def _fix_for(code: str) -> str:
    """What to do about a refusal, for the codes a user can fix."""
    if code == "unauthorized":
        return (
            f". Fix: pass token= to trimtab.init or set TRIMTAB_TOKEN to a token with the 'ingest' scope "
            f"(on the server's machine: trimtab token create --scopes ingest); a server on this machine with "
            f"its default database leaves one in {local_token_path()}, which trimtab.init reads"
        )
    if code == "forbidden":
        return ". Fix: use a token with the 'ingest' scope (trimtab token create --scopes ingest)"
    if code == "unsupported_version":
        return ". Fix: install the same trimtab version as the server's (pip install -U trimtab)"
    return ""
