"""How the dashboards are started: `streamlit run` on the app with FleetLens' bind address and port,
headless, no usage statistics, no file watcher (a server, not a dev loop)."""

from __future__ import annotations

import sys
from pathlib import Path

from fleetlens.net import client_host

APP = Path(__file__).with_name("app.py")


def streamlit_argv(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
    ]


def health_url(host: str, port: int) -> str:
    return f"http://{client_host(host)}:{port}/_stcore/health"


def app_url(host: str, port: int) -> str:
    return health_url(host, port).removesuffix("_stcore/health")
