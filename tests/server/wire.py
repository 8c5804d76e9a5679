"""A hand-driven agent over a real websocket: the exact frames a test chooses, one at a time,
so a test can play several ranks of one run and see every server reply."""

from __future__ import annotations

import contextlib
from array import array
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.helpers import ServerProcess, recv_frame
from trimtab import protocol


class WireAgent:
    def __init__(
        self, server: ServerProcess, uid: str, rank: int = 0, world_size: int = 1, project: str = "wire"
    ) -> None:
        self.server = server
        self.uid = uid
        self.rank = rank
        self.world_size = world_size
        self.project = project
        self.ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self.run_id = 0
        self.reply: dict[str, Any] = {}  # the server's answer to the last hello

    def __enter__(self) -> WireAgent:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def connect(self, replay: bool = False) -> dict[str, Any]:
        """Open the websocket and say hello; returns the server's first reply (welcome or error)."""
        url = self.server.url.replace("http://", "ws://") + protocol.WS_PATH
        self.ws = self._stack.enter_context(connect(url, compression=None, max_size=None, open_timeout=10))
        hello = protocol.hello_frame(
            uid=self.uid,
            project=self.project,
            name=self.uid,
            resume_from_seq=1,
            agent_version="wire",
            host=f"host-{self.rank}",
            pid=1,
            rank=self.rank,
            world_size=self.world_size,
            replay=replay,
        )
        self.ws.send(protocol.encode(hello))
        self.reply = recv_frame(self.ws)
        if self.reply["t"] == "welcome":
            self.run_id = self.reply["run_id"]
        return self.reply

    def send(
        self,
        seq: int,
        scalars: list[dict[str, Any]] | None = None,
        histograms: list[dict[str, Any]] | None = None,
        events: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Send one batch and return the server's reply to it (an ack or an error)."""
        assert self.ws is not None
        self.ws.send(protocol.encode(protocol.batch_frame(seq, scalars or [], histograms, events)))
        return recv_frame(self.ws)

    def store(self, seq: int, **content: list[dict[str, Any]]) -> None:
        reply = self.send(seq, **content)
        assert reply == {"t": "ack", "seq": seq}, reply

    def heartbeat(self, drops: dict[str, int], then_seq: int) -> None:
        """A heartbeat has no reply: a batch after it is acked only once the heartbeat is stored."""
        assert self.ws is not None
        self.ws.send(protocol.encode(protocol.heartbeat_frame(drops)))
        self.store(then_seq)

    def bye(self, drops: dict[str, int] | None = None) -> int | None:
        """Say bye; returns the close code the server answered with."""
        assert self.ws is not None
        self.ws.send(protocol.encode(protocol.bye_frame(drops)))
        try:
            frame = self.ws.recv(timeout=10)
            raise AssertionError(f"expected a close after bye, got {frame!r}")
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        finally:
            self.ws = None


def scalars(key: str, steps: list[int], values: list[float], wall: float = 1.7e9) -> dict[str, Any]:
    return protocol.scalar_series(key, array("q", steps), array("d", [wall + s for s in steps]), array("d", values))


def histogram(
    key: str, step: int, edges: list[float], counts: list[int], nan: int = 0, pinf: int = 0, ninf: int = 0
) -> dict[str, Any]:
    return protocol.histogram_entry(
        key, step, 1.7e9 + step + 0.25, array("d", edges), array("q", counts), nan=nan, pinf=pinf, ninf=ninf
    )
