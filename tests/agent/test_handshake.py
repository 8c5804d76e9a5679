"""A server that refuses an agent at once, before reading its hello, closes while the hello is
on its way: the agent must still say "refused" and why, not "cannot reach" (a CI run caught
that race). Real websockets servers on a free port close first, deterministically."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from websockets.sync.server import ServerConnection, serve

from trimtab import protocol
from trimtab.errors import ErrorCode
from trimtab.handshake import Handshake
from trimtab.options import resolve


@contextmanager
def refusing_server(handler: Callable[[ServerConnection], None]) -> Iterator[str]:
    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()
            thread.join(5)


def _hello() -> bytes:
    frame = protocol.hello_frame(uid="u", project="p", name=None, resume_from_seq=0, agent_version="0", host="h", pid=1)
    return protocol.encode(frame)


def _attempt(url: str) -> Handshake:
    handshake = Handshake(resolve({"server": url, "token": "tt_wrong", "connect_timeout": 5.0}, {}), _hello())
    handshake._done.wait(10)
    assert handshake.done
    return handshake


def test_an_error_frame_sent_before_the_hello_is_read_is_reported() -> None:
    def handler(ws: ServerConnection) -> None:
        ws.send(protocol.encode(protocol.error_frame(ErrorCode.UNAUTHORIZED, "unknown token")))
        ws.close(4401, "unknown token")

    with refusing_server(handler) as url:
        message, fatal = _attempt(url).failure()
    assert "refused the connection: unauthorized: unknown token" in message and "Fix:" in message
    assert fatal


REFUSALS = [(4401, "unauthorized"), (4403, "forbidden"), (4426, "unsupported_version")]


@pytest.mark.parametrize(("close", "code"), REFUSALS)
def test_a_bare_refusing_close_code_is_reported_as_a_refusal(close: int, code: str) -> None:
    def handler(ws: ServerConnection) -> None:
        ws.close(close, "go away")

    with refusing_server(handler) as url:
        message, fatal = _attempt(url).failure()
    assert f"refused the connection: {code}: go away" in message
    assert fatal


def test_a_plain_close_is_still_a_connectivity_problem() -> None:
    def handler(ws: ServerConnection) -> None:
        ws.close(1001, "going away")

    with refusing_server(handler) as url:
        message, fatal = _attempt(url).failure()
    assert message.startswith("cannot reach") and not fatal
