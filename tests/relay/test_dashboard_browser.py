"""The dashboard page in a real headless Chromium (Debian's, driven by Playwright), against
a real buffer: the histograms and the actor table show what was written, live."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.replay_buffer import ReplayBuffer
from relay.dashboard.config import DashboardConfig
from relay.dashboard.server import Dashboard
from relay.dashboard.snapshot import Watcher
from tests.buffer.factories import versioned_group
from tests.relay.dashboard_run import ACTOR_HEALTH, fill_known_run

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture
def browser_page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: `make setup` installs Debian's chromium package"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        yield page
        browser.close()


def chart_data(page, name: str) -> dict:
    return page.evaluate(
        f"""() => {{
            const chart = window.relayDashboard.charts.{name};
            return {{labels: chart.data.labels, counts: chart.data.datasets[0].data}};
        }}"""
    )


def test_page_shows_the_buffer_live(make_buffer, browser_page, tmp_path: Path) -> None:
    buffer: ReplayBuffer = make_buffer(max_staleness=3)
    fill_known_run(buffer)
    config = DashboardConfig(port=0, refresh_s=0.3, token="page-token")
    dashboard = Dashboard(Watcher(buffer), config).start()
    page = browser_page
    try:
        response = page.goto(dashboard.url)
        assert response.status == 401 and "token" in page.content()

        page.goto(dashboard.url + "?token=page-token")
        page.wait_for_function("document.querySelectorAll('#actors tbody tr').length === 2")
        assert chart_data(page, "staleness") == {"labels": ["0", "1"], "counts": [2, 1]}
        assert chart_data(page, "sampledStaleness") == {"labels": ["1", "2"], "counts": [1, 2]}
        assert page.inner_text("#staleness-stats") == "p50 0 · p99 1 · max 1 · 3 groups"
        assert page.inner_text("#learner-idle") == "20.0%"
        assert page.inner_text("#lost-dropped_stale") == "1"

        for actor_id, health in ACTOR_HEALTH.items():
            row = f"#actors tr[data-actor='{actor_id}']"
            cell = lambda field, row=row: page.inner_text(f"{row} td[data-field='{field}']")  # noqa: E731
            assert cell("version") == str(health["version"])
            assert cell("lag") == str(health["version_lag"])
            assert cell("restarts") == str(health["restarts"])
            assert cell("idle") == f"{100 * health['idle_fraction']:.1f}%"
            assert cell("error") == health["last_error"]
            assert cell("link_mb_per_s") == f"{health['weight_bytes_per_s'] / 1e6:.1f}"
            assert cell("last_fetch_s") == f"{health['last_weight_fetch_s']:.2f}"

        # Live: two more fresh groups arrive and the histogram follows without a reload.
        buffer.put([versioned_group("x", 5), versioned_group("y", 5)], "actor-1")
        page.wait_for_function(
            "window.relayDashboard.charts.staleness.data.datasets[0].data[0] === 4"
        )
        assert page.inner_text("#buffer-depth") == "5"
        screenshot = tmp_path / "dashboard.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 20_000
    finally:
        dashboard.stop()
