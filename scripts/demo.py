"""``make demo``: start the server on the embedded SQLite default, start a demo training run
that goes wrong on purpose (``examples/train_demo.py``), and play the operator: watch the
alerts, and when the loss diverges send ``reduce_lr``, as the dashboard's control panel
would, then show where it took effect. Serves until Ctrl-C.

``--manual`` (or ``TRIMTAB_DEMO_MANUAL=1 make demo``) leaves the command to you: press
"Reduce LR" in the run's control panel. Only the standard library here: the operator talks
to the REST API like any client (``tests/integration/test_demo.py`` uses these functions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "examples" / "train_demo.py"
PROJECT = "demo"
# The sustained sign that the LR is wrong: what the operator acts on. The spike and
# gross-magnitude alerts come first (a spike alone is for skipping a batch, not a new LR).
TRIGGER_RULES = ("loss-divergence",)
FACTOR = 0.1
FINAL = ("applied", "rejected", "expired")
POLL_S = 0.2


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}; see its output above")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"the server did not become ready within {timeout:.0f}s")


# ---------------------------------------------------------------- the operator, over REST


def api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) ``url + /api/v1 + path``; the parsed answer.
    An error answer raises ``urllib.error.HTTPError`` (an OSError)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{url}/api/v1{path}", data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def start_trainer(
    url: str, run_uid: str, args: Sequence[str] = (), env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """``examples/train_demo.py ARGS`` in the background, streaming to ``url`` as run ``run_uid``."""
    env = {**os.environ, **(env or {}), "TRIMTAB_SERVER": url, "TRIMTAB_RUN_UID": run_uid}
    return subprocess.Popen([sys.executable, str(TRAINER), *args], env=env, cwd=ROOT, text=True, **popen)


def find_run(url: str, run_uid: str, alive: Callable[[], bool], timeout: float = 60.0) -> dict[str, Any] | None:
    """The demo project's run with this uid, once the server has it (None if the trainer ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in api(url, f"/runs?project={PROJECT}&limit=20"):
            if run["uid"] == run_uid:
                return dict(run)
        if not alive():
            return None
        time.sleep(POLL_S)
    raise TimeoutError(f"no run {run_uid} in project {PROJECT!r} after {timeout:.0f}s")


def watch_alerts(
    url: str,
    run_id: int,
    alive: Callable[[], bool],
    on_alert: Callable[[dict[str, Any]], None] = lambda alert: None,
    trigger: Sequence[str] = TRIGGER_RULES,
    after_id: int = 0,
) -> dict[str, Any] | None:
    """Poll the project's alerts newer than ``after_id``, oldest first, handing each of this
    run's to ``on_alert``, until one of a ``trigger`` rule fires: that alert. None if the
    trainer ends before."""
    after = after_id
    while True:
        ended = not alive()  # checked before the read, so the last alerts are still seen
        alerts = api(url, f"/alerts?project={PROJECT}&order=oldest&after_id={after}&limit=1000")
        for alert in alerts:
            after = max(after, alert["id"])
            if alert["run_id"] != run_id:
                continue
            on_alert(alert)
            if alert["rule"] in trigger:
                return dict(alert)
        if ended:
            return None
        time.sleep(POLL_S)


def send_reduce_lr(url: str, run_id: int, factor: float = FACTOR) -> dict[str, Any]:
    """POST the command the control panel's "Reduce LR" sends."""
    return dict(api(url, f"/runs/{run_id}/commands", {"kind": "reduce_lr", "args": {"factor": factor}}))


def wait_final(url: str, run_id: int, command_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The command once it is applied, rejected or expired."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        command: dict[str, Any] = api(url, f"/runs/{run_id}/commands/{urllib.parse.quote(command_id)}")
        if command["status"] in FINAL:
            return command
        time.sleep(POLL_S)
    raise TimeoutError(f"command {command_id} still not final after {timeout:.0f}s")


def wait_human_lr_command(url: str, run_id: int, alive: Callable[[], bool]) -> dict[str, Any] | None:
    """The first LR command a person sent to the run, once final (None if the trainer ends first)."""
    while True:
        ended = not alive()
        for command in api(url, f"/runs/{run_id}/commands?source=human&limit=1000"):
            if command["kind"] in ("reduce_lr", "set_lr") and command["status"] in FINAL:
                return dict(command)
        if ended:
            return None
        time.sleep(POLL_S)


def loss_series(url: str, run_id: int) -> tuple[list[int], list[float]]:
    """Every stored loss point (NaN as nan)."""
    data = api(url, f"/runs/{run_id}/scalars?key=loss&max_points=1000000")
    return list(data["steps"]), [float(v) for v in data["values"]]  # float("NaN") parses the API's "NaN"


def mean_loss(steps: list[int], values: list[float], start: int, end: int) -> float:
    """The mean finite loss over steps [start, end)."""
    window = [v for s, v in zip(steps, values, strict=True) if start <= s < end and math.isfinite(v)]
    return sum(window) / len(window) if window else float("nan")


# ---------------------------------------------------------------- the demo


def _say(text: str) -> None:
    print(f"demo | {text}", flush=True)


def _relay(stream: Any) -> None:
    for line in stream:
        print(f"train | {line.rstrip()}", flush=True)


def _show_alert(alert: dict[str, Any], before_command: bool = True) -> None:
    note = ""
    if alert["rule"].startswith("nonfinite"):
        note = " (the padding-only batch; the trainer skipped that update)"
    elif before_command and alert["rule"] not in TRIGGER_RULES:
        note = " (watching whether it lasts)"
    _say(f"alert {alert['rule']} ({alert['severity']}) at step {alert['first_step']}: {alert['message']}{note}")


def _urls(url: str, run_id: int | None) -> str:
    lines = [f"  dashboard:      {url}/", f"  API docs:       {url}/docs"]
    if run_id is not None:
        lines[1:1] = [f"  the run:        {url}/runs/{run_id}", f"  control panel:  {url}/runs/{run_id}/control"]
        lines.append(f"  loss (JSON):    {url}/api/v1/runs/{run_id}/scalars?key=loss&max_points=500")
    return "\n".join(lines)


def operate(url: str, manual: bool, trainer_args: Sequence[str]) -> int | None:
    """Start the trainer and steer it; the run's id (None if it never showed up)."""
    run_uid = uuid.uuid4().hex
    trainer = start_trainer(url, run_uid, trainer_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    relay = threading.Thread(target=_relay, args=(trainer.stdout,), daemon=True)
    relay.start()

    def alive() -> bool:
        return trainer.poll() is None

    try:
        run = find_run(url, run_uid, alive)
        if run is None:
            _say(f"the trainer exited with code {trainer.wait()} before its run showed up")
            return None
        run_id = int(run["id"])
        _say(f"run {run_id} is training. Open it now:\n{_urls(url, run_id)}")
        try:
            steer(url, run_id, manual, alive)
        except OSError as exc:  # the API refused (a run that just finished: 409) or did not answer
            _say(f"could not steer the run: {exc}")
        code = trainer.wait()
        relay.join(5)
        _say(f"the trainer exited with code {code}" if code else "the trainer finished")
        return run_id
    finally:
        if trainer.poll() is None:
            trainer.terminate()
            trainer.wait(30)


def steer(url: str, run_id: int, manual: bool, alive: Callable[[], bool]) -> None:
    """Wait for the divergence alert, send reduce_lr (or wait for a person to), report the
    result and the alerts that still come, and compare the loss before and after."""
    alert = watch_alerts(url, run_id, alive, _show_alert)
    if alert is None:
        _say("training ended with no divergence alert")
        return
    command: dict[str, Any] | None
    if manual:
        _say(
            f"{alert['rule']} fired at step {alert['first_step']}. Your turn: press 'Reduce LR' in the control "
            f"panel, {url}/runs/{run_id}/control"
        )
        command = wait_human_lr_command(url, run_id, alive)
        if command is None:
            _say("the run ended with no LR command: the loss stayed up")
            return
    else:
        sent = send_reduce_lr(url, run_id)
        _say(
            f"{alert['rule']} fired at step {alert['first_step']}; sent reduce_lr x{FACTOR:g} (command "
            f"{sent['id']}) — what the dashboard's control panel's 'Reduce LR' does"
        )
        command = wait_final(url, run_id, sent["id"])
    detail = command.get("detail") or {}
    if command["status"] != "applied":
        _say(f"{command['kind']} {command['status']}: {detail.get('reason', '')}")
        return
    lrs = " ".join(f"{b:.3g} -> {a:.3g}" for b, a in zip(detail["before"], detail["after"], strict=True))
    _say(f"{command['kind']} applied at step {command['step']} (LR {lrs}); the loss should come back down now")
    watch_alerts(url, run_id, alive, lambda later: _show_alert(later, before_command=False), (), alert["id"])
    steps, values = loss_series(url, run_id)
    before = mean_loss(steps, values, command["step"] - 50, command["step"])
    after = mean_loss(steps, values, steps[-1] - 49, steps[-1] + 1)
    _say(f"mean loss: {before:.3f} over the 50 steps before the command, {after:.3f} over the run's last 50")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo like Ctrl-C: the server is shut down too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--manual",
        action="store_true",
        default=os.environ.get("TRIMTAB_DEMO_MANUAL", "") not in ("", "0"),
        help="send no command: press 'Reduce LR' in the control panel yourself (env TRIMTAB_DEMO_MANUAL=1)",
    )
    parser.add_argument("trainer_args", nargs="*", help="passed to examples/train_demo.py (after --)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    port = int(os.environ.get("TRIMTAB_PORT", "8000"))
    if not port_free(port):
        sys.exit(f"port {port} is in use; run with another, e.g. TRIMTAB_PORT=8100 make demo")
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "trimtab"), "server", "--port", str(port), "--no-auth"], cwd=ROOT)
    try:
        wait_ready(url, server)
        _say(f"trimtab is up: dashboard {url}/   API docs {url}/docs")
        run_id = operate(url, args.manual, args.trainer_args)
        _say(f"training is over. Look at the run:\n{_urls(url, run_id)}\nServing until Ctrl-C.")
        server.wait()
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
