"""Debian's headless Chromium, driven through its own chromedriver (the versions always match),
and a place for screenshots: ``artifacts/browser/`` (``TRIMTAB_TEST_ARTIFACTS`` to move it)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.helpers import ROOT

CHROMIUM = os.environ.get("TRIMTAB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TRIMTAB_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("TRIMTAB_TEST_ARTIFACTS", ROOT / "artifacts")) / "browser"

T = TypeVar("T")


def chrome() -> webdriver.Chrome:
    """A fresh headless browser; fails (never skips) when Chromium is missing: `make test` installs it."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: `make test` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 40, 3000)))  # the whole page
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2) -> T:
    """``probe()``'s first truthy result; an AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as exc:  # the page may be mid-render: try again
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last probe: {last!r})")


PLOT = "document.querySelector('#{id} .js-plotly-plot')"


def traces(driver: webdriver.Chrome, graph_id: str) -> list[dict[str, Any]]:
    """The traces Plotly holds in the page for a dcc.Graph: name, x, y, customdata."""
    script = (
        f"const gd = {PLOT.format(id=graph_id)};"
        "if (!gd || !gd.data) return null;"
        "return gd.data.map(t => ({name: t.name || '', mode: t.mode || '', type: t.type || '',"
        " x: Array.from(t.x || []), y: Array.from(t.y || []),"
        " customdata: t.customdata ? Array.from(t.customdata) : []}));"
    )
    result: list[dict[str, Any]] | None = driver.execute_script(script)
    return result or []


def trace(driver: webdriver.Chrome, graph_id: str, name: str, mode: str | None = None) -> dict[str, Any] | None:
    for t in traces(driver, graph_id):
        if t["name"] == name and (mode is None or t["mode"] == mode):
            return t
    return None


def wait_text(driver: webdriver.Chrome, element_id: str, needle: str, timeout: float = 30.0) -> str:
    """The element's text once it holds ``needle``; on timeout, the text it had and a screenshot."""
    from selenium.webdriver.common.by import By

    def probe() -> str | None:
        found = driver.find_elements(By.ID, element_id)
        current = found[0].text if found else ""
        return current if needle in current else None

    try:
        return wait_for(f"{needle!r} in #{element_id}", probe, timeout)
    except AssertionError as exc:
        found = driver.find_elements(By.ID, element_id)
        shot = screenshot(driver, f"FAILED-{element_id}")
        raise AssertionError(f"{exc}; #{element_id} reads {found[0].text if found else None!r}; see {shot}") from None
