"""Test helpers: a real server subprocess, a free port, API reads, and the value pattern the
streaming tests log and check (with NaN, +Inf and -Inf mixed in)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def value_for(key: str, step: int) -> float:
    """Deterministic values with non-finite ones mixed in, and floats that JSON text would round."""
    if step % 97 == 5:
        return math.nan
    if step % 89 == 3:
        return math.inf
    if step % 83 == 1:
        return -math.inf
    base = step / 3.0 + 1e-7 * step * step
    return base if key == "loss" else base * math.pi + 5e-324


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


AGENT_SCRIPT = [sys.executable, str(ROOT / "tests" / "scripts" / "stream_steps.py")]


def start_agent(server_url: str, spool: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    """``tests/scripts/stream_steps.py`` in a subprocess: a training loop streaming to ``server_url``."""
    return subprocess.Popen(
        [*AGENT_SCRIPT, "--server", server_url, "--spool", str(spool), "--name", name, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )


def finish_agent(agent: subprocess.Popen[str], timeout: float = 120) -> str:
    """Wait for an agent subprocess; it must have finished cleanly with nothing dropped."""
    out, _ = agent.communicate(timeout=timeout)
    assert agent.returncode == 0, f"agent exited {agent.returncode}:\n{out}"
    assert "FINISH True" in out and "DROPS {}" in out, out
    return out


def wait_logged(agent: subprocess.Popen[str]) -> None:
    """Wait for a --hang-after-logging agent to say everything it logged is in its spool."""
    assert agent.stdout is not None
    for line in agent.stdout:
        if line.strip() == "LOGGED":
            return
    raise AssertionError(f"agent exited early with {agent.wait()}")


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``trimtab ARGS`` in a subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "trimtab.cli", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=120,
        check=check,
    )


class ServerProcess:
    """``trimtab server`` in a subprocess; can be SIGKILLed and restarted on the same port and database."""

    def __init__(
        self, db_url: str, log_path: Path, port: int | None = None, extra_args: list[str] | None = None
    ) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_args = extra_args if extra_args is not None else ["--no-auth"]
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the subprocess
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trimtab.cli",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(["--db", self.db_url] if self.db_url else []),  # none: the embedded database in the data dir
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(**self.env),
            cwd=ROOT,
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, token: str | None = None) -> Any:
        return api_get(self.url + path, token)


def post_command(server: ServerProcess, run_id: int, kind: str, **args: Any) -> str:
    """POST a command to a run (auth off); its id."""
    req = urllib.request.Request(
        f"{server.url}/api/v1/runs/{run_id}/commands",
        data=json.dumps({"kind": kind, "args": args}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        ident: str = json.loads(resp.read())["id"]
    return ident


def api_get(url: str, token: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def api_status(url: str, token: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def run_by_name(server: ServerProcess, name: str) -> dict[str, Any]:
    runs = [r for r in server.get("/api/v1/runs") if r["name"] == name]
    assert len(runs) == 1, f"expected one run named {name!r}, got {runs}"
    run: dict[str, Any] = runs[0]
    return run


def assert_exact_series(server: ServerProcess, run_id: int, key: str, steps: range) -> None:
    """Every step present exactly once, with the exact value (NaN/Inf included)."""
    from trimtab.jsonsafe import float_from_json

    data = server.get(f"/api/v1/runs/{run_id}/scalars?key={key}&max_points=2000000")
    assert data["downsampled"] is False
    assert data["total_points"] == len(steps), f"{key}: {data['total_points']} points stored, expected {len(steps)}"
    assert data["steps"] == list(steps)
    mismatches = [
        (s, v)
        for s, v in zip(data["steps"], data["values"], strict=True)
        if not same_float(float_from_json(v), value_for(key, s))
    ]
    assert not mismatches, f"{key}: {len(mismatches)} values differ, first {mismatches[:3]}"


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def recv_frame(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    """One server frame from a websockets sync connection, decoded."""
    import msgpack

    data = ws.recv(timeout=timeout)
    assert isinstance(data, bytes), f"expected a binary frame, got {data!r}"
    frame: dict[str, Any] = msgpack.unpackb(data)
    return frame


def quiet_trainer(tmp_path: Path, callbacks: list[Any], **options: Any) -> Any:
    """A CPU Lightning Trainer without logger, checkpoints or progress output."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **options,
    )
