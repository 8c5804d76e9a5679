"""The dashboard in a real headless Chromium, against a real server (auth on) and real runs
streamed by a real agent from a real torch training loop.

One server, one training run and one browser serve the whole module; each test makes the
state it looks at itself (it waits for the run's NaN, sends the command it expects to see),
so the tests pass in any order. Screenshots of every page are saved under
``artifacts/browser/``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser.chrome import chrome, screenshot, trace, traces, wait_for, wait_text
from tests.helpers import ROOT, ServerProcess, api_get, run_cli, subprocess_env

NAN_AT = 40
pytestmark = pytest.mark.timeout(600)


class Trainer:
    """The training subprocess, with its output collected line by line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with auth on, tokens for each role, and a live training run streaming into it."""
    tmp = tmp_path_factory.mktemp("browser")
    db = f"sqlite:///{tmp / 'trimtab.db'}"
    run_cli("db", "upgrade", "--db", db)

    def token(scopes: str) -> str:
        return run_cli("token", "create", "--scopes", scopes, "--name", scopes, "--db", db).stdout.strip()

    tokens = {"agent": token("ingest"), "operator": token("read,control"), "viewer": token("read")}
    server = ServerProcess(db, tmp / "server.log", extra_args=[])
    server.start()
    trainer = Trainer(
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "scripts" / "dashboard_trainer.py"),
                server.url,
                tokens["agent"],
                "--nan-at",
                str(NAN_AT),
                "--delay",
                "0.05",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
    )
    try:
        run_id = wait_for("the trainer's run", lambda: _run_id(server, tokens["viewer"], trainer), timeout=60)
        # The first page a Dash app serves builds its layout: done here, not in whichever test is first.
        wait_for("the dashboard", lambda: _answers(f"{server.url}/login"), timeout=120)
        yield {"server": server, "tokens": tokens, "run_id": run_id, "trainer": trainer}
    finally:
        if trainer.proc.poll() is None:
            trainer.proc.kill()
        trainer.proc.wait(30)
        server.stop()


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return bool(resp.status == 200)


def send_command(stack: dict[str, Any], kind: str, **args: Any) -> dict[str, Any]:
    """POST a command as the operator and wait until the trainer applied it; the command."""
    url, run_id, token = stack["server"].url, stack["run_id"], stack["tokens"]["operator"]
    request = urllib.request.Request(
        f"{url}/api/v1/runs/{run_id}/commands",
        data=json.dumps({"kind": kind, "args": args}).encode(),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        command_id = json.loads(resp.read())["id"]
    return wait_for(
        f"{kind} applied",
        lambda: (c := api_get(f"{url}/api/v1/runs/{run_id}/commands/{command_id}", token))["status"] == "applied" and c,
        timeout=60,
    )


def _run_id(server: ServerProcess, token: str, trainer: Trainer) -> int | None:
    assert trainer.proc.poll() is None, f"the trainer exited:\n{trainer.output()}"
    runs = api_get(f"{server.url}/api/v1/runs?project=browser", token)
    return int(runs[0]["id"]) if runs else None


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    driver = chrome()
    try:
        yield driver
    finally:
        driver.quit()


def login(driver: webdriver.Chrome, url: str, token: str, next_path: str = "/") -> None:
    driver.delete_all_cookies()
    driver.get(f"{url}{next_path}")
    wait_for(
        "the login form", lambda: "/login" in driver.current_url and driver.find_elements(By.ID, "token"), timeout=60
    )
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-submit").click()
    wait_for("the page after login", lambda: "/login" not in driver.current_url)


def text(driver: webdriver.Chrome, element_id: str) -> str:
    found = driver.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def test_login_then_the_runs_list_shows_the_live_run(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    url = stack["server"].url
    browser.delete_all_cookies()
    browser.get(url + "/")
    wait_for("the redirect to the login page", lambda: "/login" in browser.current_url)
    browser.find_element(By.ID, "token").send_keys("tt_not-a-real-token")
    browser.find_element(By.ID, "login-submit").click()
    error = wait_for("the login error", lambda: text(browser, "login-error"))
    assert "unknown or revoked" in error

    login(browser, url, stack["tokens"]["operator"])
    cookie = browser.get_cookie("trimtab_session")
    assert cookie is not None and cookie["httpOnly"] is True, cookie
    assert "trimtab_session" not in browser.execute_script("return document.cookie")  # scripts cannot read it
    row = wait_for("the run's row", lambda: browser.find_elements(By.ID, f"run-row-{stack['run_id']}"))[0]
    assert "live-run" in row.text and "browser" in row.text
    wait_for("the live dot", lambda: row.find_elements(By.CSS_SELECTOR, ".dot.live"))
    screenshot(browser, "runs")


def _last_step(driver: webdriver.Chrome) -> int | None:
    loss = trace(driver, "ov-graph", "loss", "lines")
    return int(max(loss["x"])) if loss and loss["x"] else None


def test_the_overview_updates_live_and_marks_the_nan(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    run_id = stack["run_id"]
    login(browser, stack["server"].url, stack["tokens"]["operator"], f"/runs/{run_id}")
    first = wait_for("the loss chart", lambda: _last_step(browser), timeout=60)
    # Mark the page: a reload would lose this, extendData and redraws keep it.
    browser.execute_script("window.__sameDocument = true;")
    api_step = api_get(f"{stack['server'].url}/api/v1/runs/{run_id}", stack["tokens"]["viewer"])["last_step"]
    started = time.monotonic()
    later = wait_for("a newer step in the chart", lambda: (s := _last_step(browser)) and s > api_step and s)
    print(f"chart caught up with the API's step {api_step} + 1 in {time.monotonic() - started:.2f}s")
    assert later > first
    assert browser.execute_script("return window.__sameDocument === true"), "the page reloaded"

    # The NaN loss at step NAN_AT: a gap in the line, an x on it, and a mark in the strip.
    loss = trace(browser, "ov-graph", "loss", "lines")
    assert loss is not None and NAN_AT not in [x for x, y in zip(loss["x"], loss["y"], strict=True) if y is not None]

    def nan_marks() -> dict[str, Any] | None:
        t = trace(browser, "ov-graph", "loss NaN/Inf")
        return t if t and NAN_AT in t["x"] else None

    marks = wait_for("the NaN marker", nan_marks)
    assert NAN_AT in marks["x"] and marks["customdata"][marks["x"].index(NAN_AT)] == "NaN"
    wait_for("the NaN event in the strip", lambda: (t := trace(browser, "ov-graph", "NaN/Inf")) and NAN_AT in t["x"])
    alerts = wait_for("the NaN's alert in the strip", lambda: (t := trace(browser, "ov-graph", "alerts")) and t["x"])
    assert NAN_AT in alerts
    names = {t["name"] for t in traces(browser, "ov-graph")}
    assert {"lr/group0", "grad_norm/total", "perf/samples_per_s"} <= names
    screenshot(browser, "overview")


def test_reduce_lr_from_the_panel_is_applied_by_the_trainer(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    run_id = stack["run_id"]
    login(browser, stack["server"].url, stack["tokens"]["operator"], f"/runs/{run_id}/control")
    factor = wait_for("the factor input", lambda: browser.find_elements(By.ID, "ctl-factor"))[0]
    factor.clear()
    factor.send_keys("0.5")
    commands = api_get(f"{stack['server'].url}/api/v1/runs/{run_id}/commands?limit=1000", stack["tokens"]["viewer"])
    browser.find_element(By.ID, "ctl-ask-reduce").click()
    box = browser.find_element(By.ID, "ctl-confirm-box")
    wait_for("the confirmation", lambda: box.is_displayed())
    assert "reduce_lr(factor=0.5)" in box.text
    time.sleep(0.5)  # a command sent without confirmation would be in the run's list by now
    now = api_get(f"{stack['server'].url}/api/v1/runs/{run_id}/commands?limit=1000", stack["tokens"]["viewer"])
    assert len(now) == len(commands), "sent before confirming"  # other tests may have sent some before
    browser.find_element(By.ID, "ctl-confirm").click()
    sent = wait_for("the sent message", lambda: re.search(r"command (\S+)\.$", text(browser, "ctl-sent")))
    applied = wait_for(  # this command's row: other tests may have sent commands before
        "'applied at step N' in the panel",
        lambda: re.search(r"applied at step (\d+)", text(browser, f"cmd-{sent.group(1)}")),
        timeout=60,
    )
    step = int(applied.group(1))
    screenshot(browser, "control")
    trainer: Trainer = stack["trainer"]
    report = wait_for(
        "the trainer's own report",
        lambda: re.search(rf"lr (\S+) -> (\S+) at step {step}\b", trainer.output()),
        timeout=20,
    )
    assert float(report.group(2)) == pytest.approx(float(report.group(1)) * 0.5)  # other tests may have cut it too


def test_zooming_refetches_the_range_at_full_resolution(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    """A 30,000-step run is drawn from a 2,000-point view; a 1,000-step window comes back whole."""
    server: ServerProcess = stack["server"]
    agent = subprocess.run(
        [
            *(sys.executable, str(ROOT / "tests" / "scripts" / "stream_steps.py"), "--server", server.url),
            *("--spool", str(Path(server.log_path).parent / "spool"), "--name", "long-run", "--steps", "30000"),
        ],
        env=subprocess_env(TRIMTAB_TOKEN=stack["tokens"]["agent"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert agent.returncode == 0, agent.stdout + agent.stderr
    run_id = int(re.search(r"RUN_ID (\d+)", agent.stdout).group(1))  # type: ignore[union-attr]
    login(browser, server.url, stack["tokens"]["operator"], f"/runs/{run_id}")
    wait_text(browser, "ov-notes", "of 30,000 points", timeout=60)
    whole = trace(browser, "ov-graph", "loss", "lines")
    assert whole is not None and 100 < len(whole["x"]) <= 2000
    browser.execute_script(
        "const gd = document.querySelector('#ov-graph .js-plotly-plot');"
        "Plotly.relayout(gd, {'xaxis.range[0]': 10000, 'xaxis.range[1]': 10999});"
    )
    wait_text(browser, "ov-notes", "Showing steps 10,000-10,999")
    zoomed = wait_for(
        "the window at full resolution",
        lambda: (t := trace(browser, "ov-graph", "loss", "lines")) and min(t["x"]) >= 10000 and t,
    )
    assert zoomed["x"] == list(range(10000, 11000))
    assert "of 30,000 points" not in text(browser, "ov-notes")
    screenshot(browser, "overview-zoomed")


def test_every_page_renders_the_run(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    url, run_id = stack["server"].url, stack["run_id"]
    send_command(stack, "reduce_lr", factor=0.9)  # the events page's commands table shows it
    login(browser, url, stack["tokens"]["operator"], f"/runs/{run_id}/layers")
    heat = wait_for("the gradient-norm heatmap", lambda: traces(browser, "layers-grad_norm"), timeout=60)
    assert heat[0]["type"] == "heatmap" and len(heat[0]["y"]) == 4  # four parameters
    screenshot(browser, "layers")

    browser.get(f"{url}/runs/{run_id}/distributions")
    wait_for("the histogram heatmap", lambda: traces(browser, "dist-heatmap"), timeout=60)
    bars = wait_for("one step's histogram", lambda: traces(browser, "dist-bars"))
    assert bars[0]["type"] == "bar"
    screenshot(browser, "distributions")

    browser.get(f"{url}/runs/{run_id}/events")
    table = wait_for("the NaN/Inf events table", lambda: text(browser, "events-nonfinite"), timeout=60)
    assert str(NAN_AT) in table and "batch" in table  # the source the agent found
    assert "nonfinite-loss" in wait_for("the alerts table", lambda: text(browser, "events-alerts"))
    assert "applied at step" in wait_for("the commands table", lambda: text(browser, "events-commands"))
    screenshot(browser, "events")

    browser.get(f"{url}/compare?runs={run_id}&key=loss")
    wait_for("the overlay", lambda: trace(browser, "cmp-graph", f"{run_id}: browser / live-run"), timeout=60)
    screenshot(browser, "compare")


def test_without_the_control_scope_the_panel_is_not_offered(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    url, run_id = stack["server"].url, stack["run_id"]
    login(browser, url, stack["tokens"]["viewer"], f"/runs/{run_id}")
    wait_for("the overview tabs", lambda: browser.find_elements(By.ID, "tab/layers"), timeout=60)
    assert not browser.find_elements(By.ID, "tab/control")
    browser.get(f"{url}/runs/{run_id}/control")
    assert "lacks the control scope" in wait_for("the refusal", lambda: text(browser, "ctl-denied"))
    assert not browser.find_elements(By.ID, "ctl-ask-reduce")
    screenshot(browser, "control-read-only")
    # The API refuses the viewer's token too: the panel's absence is not the only guard.
    request = urllib.request.Request(
        f"{url}/api/v1/runs/{run_id}/commands",
        data=json.dumps({"kind": "reduce_lr", "args": {"factor": 0.5}}).encode(),
        headers={"authorization": f"Bearer {stack['tokens']['viewer']}", "content-type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


LATE_KEYS = """
import sys, time, trimtab
run = trimtab.init(server=sys.argv[1], token=sys.argv[2], project="browser-late", name="late")
run.log({"agent/ready": 1.0}, step=0)
sys.stdin.readline()  # the test lets the loss come once the page shows there is none
for step in range(1, 60):
    run.log({"loss": 1.0 / step}, step=step)
run.finish(timeout=30)
"""


def test_a_chart_appears_when_its_first_points_arrive(stack: dict[str, Any], browser: webdriver.Chrome) -> None:
    """The overview opened before the run logged its loss shows the loss once it comes."""
    server: ServerProcess = stack["server"]
    agent = subprocess.Popen(
        [sys.executable, "-c", LATE_KEYS, server.url, stack["tokens"]["agent"]],
        stdin=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    try:
        runs = wait_for(
            "the late run", lambda: api_get(f"{server.url}/api/v1/runs?project=browser-late", stack["tokens"]["viewer"])
        )
        login(browser, server.url, stack["tokens"]["operator"], f"/runs/{runs[0]['id']}")
        wait_text(browser, "ov-notes", "no loss, LR or gradient-norm series yet")
        assert agent.stdin is not None
        agent.stdin.write("go\n")
        agent.stdin.flush()
        loss = wait_for("the loss chart", lambda: (t := trace(browser, "ov-graph", "loss", "lines")) and t, timeout=60)
        assert 1 in loss["x"]
    finally:
        assert agent.wait(60) == 0
