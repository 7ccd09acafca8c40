"""Screenshot a running dashboard with Debian's Chromium (how dashboard-demo.png was made).

.venv/bin/python docs/images/capture.py http://127.0.0.1:8420/ docs/images/dashboard-demo.png
"""

from __future__ import annotations

import shutil
import sys

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def capture(url: str, out: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#actors tbody tr').length > 0")
        page.wait_for_timeout(1000)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    capture(sys.argv[1], sys.argv[2])
