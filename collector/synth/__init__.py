"""Synthetic fleet traffic (`fleetlens synth`): gateway traces with vLLM `llm_request` spans, one
`replica.cold_start` span per replica at the start of the run, and matching `fleet_metrics` samples,
seeded and deterministic.

Modules: `fleet` (what the fleet looks like), `generate` (vectorized requests), `spans` (the trace
shape), `otlp` / `direct` (OTLP protobuf / warehouse rows from the same spans), `metrics`
(fleet_metrics), `transport` (OTLP/HTTP and gRPC senders), `run` (whole runs), `cli`.
Names below are imported lazily so `import fleetlens.collector.synth` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Fleet": "fleet", "Feature": "fleet", "Customer": "fleet", "Model": "fleet", "Route": "fleet",
    "default_fleet": "fleet",
    "Synthesizer": "generate", "RequestFrame": "generate", "Outage": "generate",
    "span_groups": "spans", "cold_start_group": "spans", "export_requests": "otlp",
    "cold_start_requests": "otlp", "traces_table": "direct", "cold_starts_table": "direct",
    "MetricsBuilder": "metrics", "metrics_table": "metrics",
    "OtlpHttpSender": "transport", "OtlpGrpcSender": "transport",
    "write_to_warehouse": "run", "send_to_collector": "run",
}
__all__ = [
    "Customer", "Feature", "Fleet", "MetricsBuilder", "Model", "OtlpGrpcSender", "OtlpHttpSender", "Outage",
    "RequestFrame", "Route", "Synthesizer", "cold_start_group", "cold_start_requests", "cold_starts_table",
    "default_fleet", "export_requests", "metrics_table",
    "send_to_collector", "span_groups", "traces_table", "write_to_warehouse",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
