"""Screenshots of the dashboard's main pages for the README, from a running server (e.g. the
one ``make demo`` starts), in Debian's headless Chromium.

    .venv/bin/python scripts/screenshots.py http://127.0.0.1:8000 RUN_ID docs/images [--token T]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser.chrome import chrome  # noqa: E402  (the project's browser setup)

PAGES = (
    ("runs", "/"),
    ("overview", "/runs/{run}"),
    ("layers", "/runs/{run}/layers"),
    ("distributions", "/runs/{run}/distributions"),
    ("events", "/runs/{run}/events"),
    ("control", "/runs/{run}/control"),
    ("compare", "/compare?runs={runs}&key=loss"),
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("run", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--token", default=None, help="log in with this token first (auth on)")
    parser.add_argument("--compare", default=None, help="runs for the compare page (default: the run)")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds to let a page draw")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    driver = chrome()
    try:
        if args.token:
            driver.get(args.url + "/login")
            driver.find_element(By.ID, "token").send_keys(args.token)
            driver.find_element(By.ID, "login-submit").click()
        for name, path in PAGES:
            driver.get(args.url + path.format(run=args.run, runs=args.compare or args.run))
            time.sleep(args.settle)
            height = int(driver.execute_script("return document.documentElement.scrollHeight"))
            driver.set_window_size(1400, min(max(900, height + 20), 2200))
            driver.save_screenshot(str(args.out / f"{name}.png"))
            driver.set_window_size(1400, 1000)
            print(f"{name}: {args.out / f'{name}.png'}", flush=True)
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
