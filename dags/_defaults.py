"""Settings every FleetLens DAG shares (imported by the DAG files; listed in .airflowignore)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum

from fleetlens.alerts import on_failure_alert
from fleetlens.config import Settings

# A fixed date in the past: with catchup off it only bounds how far back a backfill may go.
START_DATE = pendulum.datetime(2025, 1, 1, tz="UTC")


def default_args(settings: Settings) -> dict[str, Any]:
    """Task defaults: retries from the settings, and the failure alert after the last try."""
    return {
        "owner": "fleetlens",
        "retries": settings.airflow.retries,
        "retry_delay": timedelta(seconds=settings.airflow.retry_delay_s),
        "on_failure_callback": on_failure_alert,  # log line + optional webhook POST
    }
