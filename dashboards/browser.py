"""The dashboards in a real, headless browser: Debian's Chromium driven by Playwright (no browser
download). `fleetlens demo` takes the overview's screenshot with it and reads the numbers it shows;
the browser tests open every page the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: Debian's package puts it here; elsewhere the first `chromium` / `chromium-browser` on PATH.
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Flags for a machine without a network or a display (Chromium otherwise keeps trying Google's hosts).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
#: Streamlit scrolls inside its main block, not the document: a tall window shows a whole page.
VIEWPORT = {"width": 1440, "height": 2600}
#: The overview's figures and its daily-cost chart, and little below (the README's picture).
OVERVIEW_VIEWPORT = {"width": 1440, "height": 1400}
#: The overview's figures `fleetlens demo` reports (metric labels as the page writes them).
OVERVIEW_METRICS = ("Requests", "Tokens (in + out)", "Fully loaded cost", "p95 TTFT", "Fleet utilization",
                    "Idle dollars")


def chromium_path() -> str | None:
    """A Chromium to drive, or None when this machine has none (`apt-get install chromium`)."""
    for path in CHROMIUM_PATHS:
        if Path(path).exists():
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright: object, executable: str) -> "Browser":
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)  # type: ignore[attr-defined]


def settle(page: "Page") -> None:
    """Once the page's content is there: wait until the script run is over (no 'Running…' widget)
    and every plotly chart has drawn."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=60_000)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " && document.querySelectorAll('[data-testid=\"stSpinner\"]').length === 0",
        timeout=120_000)
    for chart in page.locator(".js-plotly-plot").all():
        chart.locator(".main-svg").first.wait_for(state="attached", timeout=60_000)
    page.wait_for_timeout(500)  # the last animation frame of the charts


def metric_value(page: "Page", label: str) -> str:
    """The value an `st.metric` with this label shows, as text."""
    metric = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()


def screenshot_overview(url: str, out: Path, executable: str) -> dict[str, str]:
    """Open the overview at `url` in headless Chromium, save a full-page PNG to `out` and return the
    figures it shows ({label: text}). Raises RuntimeError when the page shows an error."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright, executable)
        try:
            page = browser.new_page(viewport=OVERVIEW_VIEWPORT)
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_text("Fleet utilization").first.wait_for(timeout=90_000)
            page.locator(".js-plotly-plot").first.wait_for(state="attached", timeout=60_000)
            settle(page)
            if page.locator('[data-testid="stException"]').count():
                raise RuntimeError(page.locator('[data-testid="stException"]').first.inner_text())
            page.screenshot(path=str(out))
            return {label: metric_value(page, label) for label in OVERVIEW_METRICS}
        finally:
            browser.close()
