"""End to end in a real browser: `fleetlens dashboards` serves the app on a seeded warehouse and
headless Chromium (Debian's package, driven by Playwright) opens every page, waits for its charts,
checks the key text and numbers against the marts, and saves a full-page PNG of each under the
test's output directory (tmp_path/screenshots)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import SeededWarehouse, child_env, free_port, stop_group, wait_http
from fleetlens.dashboards import ui
from fleetlens.dashboards.browser import VIEWPORT, chromium_path, launch, metric_value, settle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dashboards_url(seeded_warehouse: SeededWarehouse, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("dashboards") / "dashboards.log"
    env = child_env({"FLEETLENS_WAREHOUSE_URL": seeded_warehouse.url,
                     "FLEETLENS_DATA_DIR": str(seeded_warehouse.data_dir)})
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "fleetlens", "dashboards", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60, alive=lambda: process.poll() is None), \
            log_path.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(process, signal.SIGTERM, 20)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        executable = chromium_path()
        assert executable, "no Chromium: scripts/setup-test-deps installs Debian's package"
        browser = launch(playwright, executable)
        yield browser
        browser.close()


def scalar(seeded: SeededWarehouse, sql: str) -> object:
    """`{days}`: the pages' default range, the days with requests."""
    days = (f"day BETWEEN (SELECT min(day) FROM {seeded.marts}.fct_requests) "
            f"AND (SELECT max(day) FROM {seeded.marts}.fct_requests)")
    return seeded.client().query(sql.format(marts=seeded.marts, raw=seeded.database, days=days)).result_rows[0][0]


PAGES = [  # (url path, title, a text the page must show, plotly charts at least)
    ("", "Overview", "Fleet utilization", 1),  # the default page lives at /
    ("cost", "Cost", "of the cost", 3),
    ("margin", "Margin", "Contribution margin", 2),
    ("build-vs-buy", "Build vs buy", "Self-hosted $ / 1M tokens", 1),
    ("latency", "Latency", "SLO adherence", 3),
    ("utilization", "Utilization", "Busy fraction per replica-hour", 2),
    ("traces", "Trace explorer", "Span waterfall", 1),
    ("evals", "Evals & rollouts", "Gate decisions", 0),
]


def test_every_page_in_chromium(dashboards_url: str, browser, seeded_warehouse: SeededWarehouse,
                                tmp_path: Path) -> None:
    seeded = seeded_warehouse
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport=VIEWPORT)
    console_errors: list[str] = []
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    for path, title, text, charts in PAGES:
        page.goto(f"{dashboards_url}/{path}", wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_text(text).first).to_be_visible(timeout=60_000)
        if charts:  # the page's content, not the absence of a spinner, says the script run got there
            page.locator(".js-plotly-plot").nth(charts - 1).wait_for(state="attached", timeout=60_000)
        settle(page)
        assert page.locator('[data-testid="stException"]').count() == 0, page.locator('[data-testid="stException"]').first.inner_text()
        assert page.locator(".js-plotly-plot").count() >= charts, path
        assert page.get_by_text("Page not found").count() == 0, path
        page.screenshot(path=str(shots / f"{path or 'overview'}.png"), full_page=True)
        if path == "":
            assert metric_value(page, "Fully loaded cost") == ui.usd(
                scalar(seeded, "SELECT sum(fully_loaded_usd) FROM {marts}.cost_by_feature_daily"))
            assert metric_value(page, "Idle dollars") == ui.usd(
                scalar(seeded, "SELECT sum(idle_usd) FROM {marts}.utilization_by_replica_hourly WHERE {days}"))
        elif path == "cost":
            top, share = seeded.client().query(f"""
                SELECT feature, sum(fully_loaded_usd) / (SELECT sum(fully_loaded_usd) FROM {seeded.marts}.cost_by_feature_daily)
                FROM {seeded.marts}.cost_by_feature_daily GROUP BY feature ORDER BY sum(fully_loaded_usd) DESC LIMIT 1
            """).result_rows[0]
            expect(page.get_by_text(f"Feature {top} is {share * 100:.1f}% of the cost")).to_be_visible()
        elif path == "margin":
            assert metric_value(page, "Revenue") == ui.usd(
                scalar(seeded, "SELECT sum(revenue_usd) FROM {marts}.cost_by_customer_daily"))
        elif path == "utilization":
            assert metric_value(page, "GPU bill") == ui.usd(
                scalar(seeded, "SELECT sum(bill_usd) FROM {marts}.utilization_by_replica_hourly WHERE {days}"))
        elif path == "evals":
            expect(page.get_by_text("int3 fails")).to_be_visible()
    assert not console_errors, console_errors
    pngs = sorted(shots.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(path or "overview" for path, *_ in PAGES)
    assert all(p.stat().st_size > 20_000 for p in pngs), [(p.name, p.stat().st_size) for p in pngs]
    print(f"screenshots: {shots}")
