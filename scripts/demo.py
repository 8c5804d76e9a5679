"""``make demo``: start the server on the embedded SQLite default, stream a demo training run
into it, print where to look, and serve until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo like Ctrl-C: the server is shut down too


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    port = int(os.environ.get("TRIMTAB_PORT", "8000"))
    if not port_free(port):
        sys.exit(f"port {port} is in use; run with another, e.g. TRIMTAB_PORT=8100 make demo")
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "trimtab"), "server", "--port", str(port), "--no-auth"], cwd=ROOT)
    try:
        wait_ready(url, server)
        print(f"\ntrimtab is up: API docs {url}/docs   runs {url}/api/v1/runs\n", flush=True)
        env = {**os.environ, "TRIMTAB_SERVER": url}
        subprocess.run([sys.executable, str(ROOT / "examples" / "train_demo.py")], env=env, cwd=ROOT, check=True)
        with urllib.request.urlopen(url + "/api/v1/runs?project=demo&limit=1", timeout=10) as resp:
            run_id = json.loads(resp.read())[0]["id"]
        print(
            f"\nThe demo run is stored (a corrupted batch at step 500 makes the loss spike). Look at it:\n"
            f"  runs:          {url}/api/v1/runs\n"
            f"  the run:       {url}/api/v1/runs/{run_id}\n"
            f"  its keys:      {url}/api/v1/runs/{run_id}/keys\n"
            f"  loss series:   {url}/api/v1/runs/{run_id}/scalars?key=loss&max_points=500\n"
            f"  grad norm:     {url}/api/v1/runs/{run_id}/scalars?key=grad_norm/total&max_points=500\n"
            f"  a histogram:   {url}/api/v1/runs/{run_id}/histograms?key=weights/head.weight\n"
            f"  events:        {url}/api/v1/runs/{run_id}/events\n"
            f"  API docs:      {url}/docs\n"
            f"Serving until Ctrl-C.",
            flush=True,
        )
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
