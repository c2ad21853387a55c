"""Failure alerts of FleetLens' Airflow tasks: a log line always, a webhook POST when one is configured.

Used as the tasks' `on_failure_callback`, so it runs after the final failed try, in the task's own
process, with Airflow's context. It must never raise (that would hide the task's real error) and
never leak a secret: the warehouse password and the webhook URL (which often carries a token) are
scrubbed from the error excerpt, and the URL itself is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from .config import ConfigError, load_settings

log = logging.getLogger("fleetlens.alerts")

EXCERPT_CHARS = 2000


def failure_payload(context: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The alert's JSON body from an Airflow task context: where it failed and an excerpt of why."""
    ti = context.get("ti") or context.get("task_instance")
    logical_date = context.get("logical_date")
    error = context.get("exception")
    excerpt = f"{type(error).__name__}: {error}" if error is not None else "unknown error (no exception in context)"
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": context.get("run_id") or getattr(ti, "run_id", None),
        "logical_date": logical_date.isoformat() if logical_date is not None else None,
        "try_number": getattr(ti, "try_number", None),
        "error": scrub(excerpt, secrets)[-EXCERPT_CHARS:],
    }


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every non-empty secret replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def send_alert(payload: Mapping[str, Any], webhook_url: str | None, timeout_s: float) -> bool:
    """Log the failure; POST `payload` to `webhook_url` when there is one. True when the webhook
    took it (2xx). Failures to deliver are logged, never raised."""
    log.error("FleetLens task failed: dag=%s task=%s run=%s try=%s: %s", payload.get("dag_id"), payload.get("task_id"),
              payload.get("run_id"), payload.get("try_number"), payload.get("error"))
    if not webhook_url:
        return False
    try:
        response = httpx.post(webhook_url, json=dict(payload), timeout=timeout_s)
    except httpx.HTTPError as error:
        log.warning("failure alert not delivered to the webhook: %s", type(error).__name__)
        return False
    if response.is_success:
        log.info("failure alert delivered to the webhook (HTTP %s)", response.status_code)
        return True
    log.warning("failure alert refused by the webhook (HTTP %s)", response.status_code)
    return False


def on_failure_alert(context: Mapping[str, Any]) -> None:
    """Airflow `on_failure_callback`: log the failure and POST it to `airflow.alert_webhook_url`."""
    webhook: str | None = None
    timeout_s = 5.0
    secrets: list[str] = []
    try:
        settings = load_settings()
    except ConfigError as error:  # still say that the task failed, without the webhook
        log.warning("settings unreadable, alerting by log only: %s", error)
    else:
        if settings.airflow.alert_webhook_url is not None:
            webhook = settings.airflow.alert_webhook_url.get_secret_value()
        timeout_s = settings.airflow.alert_timeout_s
        secrets = [webhook or "", settings.warehouse.password.get_secret_value()]
    try:
        send_alert(failure_payload(context, secrets), webhook, timeout_s)
    except Exception:  # noqa: BLE001 - a broken alert must not mask the task's own failure
        log.exception("failure alert could not be sent")
