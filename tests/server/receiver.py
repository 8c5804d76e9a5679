"""A real local HTTP receiver for webhook and Slack deliveries, with scriptable misbehaviour."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OK = 200
HANG = -1  # read the request, never answer (until the receiver stops)
GARBAGE = -2  # answer bytes that are not HTTP, then close


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answer: int  # the status sent back, or HANG / GARBAGE
    at: float  # time.time() when the request arrived

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """``answers(n)`` says what to do with the n-th request (0-based); 200 by default."""

    def __init__(self, answers: Callable[[int], int] = lambda n: OK) -> None:
        self.answers = answers
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()  # lets hanging handlers return
        self.server.shutdown()
        self.server.server_close()

    def answered(self, status: int = OK) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.answer == status]

    def all(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def wait_for(self, n: int, status: int = OK, timeout: float = 60.0) -> list[Received]:
        """Wait until ``n`` requests got ``status``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.answered(status)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise AssertionError(f"{len(self.answered(status))} requests answered {status}, expected {n}: {self.all()}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    n = len(receiver.requests)
                    answer = receiver.answers(n)
                    receiver.requests.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, answer, time.time())
                    )
                if answer == HANG:
                    receiver._released.wait()
                    return
                if answer == GARBAGE:
                    self.wfile.write(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
                    self.close_connection = True
                    return
                reply = b"ok" if 200 <= answer < 300 else b"receiver says no"
                self.send_response(answer)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def receiver(answers: Callable[[int], int] = lambda n: OK) -> Iterator[Receiver]:
    r = Receiver(answers).start()
    try:
        yield r
    finally:
        r.stop()
