"""The gateway's own counters, served on its `/metrics` in the Prometheus text format.

Like the collector's (collector/telemetry.py): the request path bumps plain counters, and this
module reads them, the replica pools and the span exporter's counts when `/metrics` is scraped.
Names are prefixed `fleetlens_gateway_`. /metrics needs no API key; it is served on the gateway's
own address (loopback unless told otherwise).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .tracing import ExportStats

PREFIX = "fleetlens_gateway_"


@dataclass
class GatewayStats:
    """Counted on the request path."""

    in_flight: int = 0
    # (endpoint, status, route, model, feature)
    requests: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)
    # (model, outcome): "ok", or the failure's trigger ("error", "timeout", "overload"), or "client_error"
    upstream_attempts: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (from model, trigger): a failed attempt followed by another model's attempt
    fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (retriever, outcome): "ok" / "error"
    retrievals: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (check, valid): response_format checks in postprocess
    output_checks: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (endpoint, status): /tokenize, /detokenize, /tokenizer_info
    passthrough: Counter[tuple[str, str]] = field(default_factory=Counter)


def _family(kind: type, name: str, doc: str, labels: list[str], counts: Counter[Any]) -> Any:
    family = kind(PREFIX + name, doc, labels=labels)
    for key, value in sorted(counts.items()):
        family.add_metric(list(key), value)
    return family


class GatewayMetrics(Collector):
    """Reads the gateway's counters, the pools and the span export counts at scrape time."""

    def __init__(self, stats: GatewayStats, pools: Callable[[], list[dict[str, Any]]] | None = None,
                 export: ExportStats | None = None) -> None:
        self.stats = stats
        self.pools = pools
        self.export = export

    def collect(self) -> Iterator[Any]:
        s = self.stats
        yield _family(CounterMetricFamily, "requests", "Requests answered, by endpoint, status, route, model, feature",
                      ["endpoint", "status", "route", "model", "feature"], s.requests)
        yield GaugeMetricFamily(PREFIX + "in_flight", "Requests being answered now", value=s.in_flight)
        yield _family(CounterMetricFamily, "upstream_attempts", "Upstream attempts, by model and outcome",
                      ["model", "outcome"], s.upstream_attempts)
        yield _family(CounterMetricFamily, "fallbacks", "Failed attempts followed by another model, by trigger",
                      ["model", "trigger"], s.fallbacks)
        yield _family(CounterMetricFamily, "retrievals", "Retrieval stage runs, by retriever and outcome",
                      ["retriever", "outcome"], s.retrievals)
        yield _family(CounterMetricFamily, "output_checks", "response_format checks of completions",
                      ["check", "valid"], s.output_checks)
        yield _family(CounterMetricFamily, "tokenizer_requests", "/tokenize, /detokenize, /tokenizer_info relayed",
                      ["endpoint", "status"], s.passthrough)
        if self.pools is not None:
            rows = self.pools()
            healthy = GaugeMetricFamily(PREFIX + "replica_healthy", "1 if the replica is in its pool's rotation",
                                        labels=["model", "replica"])
            outstanding = GaugeMetricFamily(PREFIX + "replica_outstanding", "Requests in flight on the replica",
                                            labels=["model", "replica"])
            requests = CounterMetricFamily(PREFIX + "replica_requests", "Requests sent to the replica",
                                           labels=["model", "replica"])
            failures = CounterMetricFamily(PREFIX + "replica_failures", "Failed requests on the replica",
                                           labels=["model", "replica"])
            for row in rows:
                labels = [str(row["model"]), str(row["name"])]
                healthy.add_metric(labels, 1 if row["healthy"] else 0)
                outstanding.add_metric(labels, row["outstanding"])
                requests.add_metric(labels, row["requests_total"])
                failures.add_metric(labels, row["failures_total"])
            yield from (healthy, outstanding, requests, failures)
        if self.export is not None:
            e = self.export
            yield CounterMetricFamily(PREFIX + "spans_exported", "Spans the collector acknowledged",
                                      value=e.exported_spans)
            yield CounterMetricFamily(PREFIX + "spans_dropped",
                                      "Spans lost: refused by the collector, still unsent at shutdown, or the export "
                                      "queue was full (collector down for long)",
                                      value=e.failed_spans + e.dropped_spans)
            yield CounterMetricFamily(PREFIX + "spans_retried",
                                      "Spans sent again: the collector asked to retry (429/502/503/504) or was unreachable",
                                      value=e.retried_spans)


def registry_for(metrics: GatewayMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry
