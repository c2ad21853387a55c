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


_COUNTERS = ("requests", "upstream_attempts", "fallbacks", "retrievals", "output_checks", "passthrough")
_EXPORT = ("exported_spans", "failed_spans", "dropped_spans", "retried_spans")
_POOL_SUMS = ("outstanding", "requests_total", "failures_total")

Snapshot = dict[str, Any]  # one process's counters in JSON's types (workers.py moves them between processes)


def _family(kind: type, name: str, doc: str, labels: list[str], counts: dict[tuple[str, ...], float]) -> Any:
    family = kind(PREFIX + name, doc, labels=labels)
    for key, value in sorted(counts.items()):
        family.add_metric(list(key), value)
    return family


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Several workers' snapshots as one: counters and in-flight summed; a replica counts as healthy
    when any worker has it in rotation; its outstanding/requests/failures summed."""
    merged: Snapshot = {name: Counter() for name in _COUNTERS}
    merged.update(in_flight=0, pools={}, export=None)
    for snapshot in snapshots:
        for name in _COUNTERS:
            for *labels, value in snapshot[name]:
                merged[name][tuple(labels)] += value
        merged["in_flight"] += snapshot["in_flight"]
        for row in snapshot["pools"] or []:
            seen = merged["pools"].setdefault((row["model"], row["name"]), dict(row, healthy=False, **{
                k: 0 for k in _POOL_SUMS}))
            seen["healthy"] = seen["healthy"] or bool(row["healthy"])
            for k in _POOL_SUMS:
                seen[k] += row[k]
        if snapshot["export"] is not None:
            export = merged["export"] = merged["export"] or dict.fromkeys(_EXPORT, 0)
            for k in _EXPORT:
                export[k] += snapshot["export"][k]
    merged["pools"] = list(merged["pools"].values())
    return merged


class GatewayMetrics(Collector):
    """Reads the gateway's counters, the pools and the span export counts at scrape time — this
    process's, plus (`peers`) the other workers' of the same gateway."""

    def __init__(self, stats: GatewayStats, pools: Callable[[], list[dict[str, Any]]] | None = None,
                 export: ExportStats | None = None) -> None:
        self.stats = stats
        self.pools = pools
        self.export = export
        self.peers: Callable[[], list[Snapshot]] | None = None

    def snapshot(self) -> Snapshot:
        s, e = self.stats, self.export
        out: Snapshot = {name: [[*key, value] for key, value in getattr(s, name).items()] for name in _COUNTERS}
        out.update(in_flight=s.in_flight, pools=self.pools() if self.pools is not None else None,
                   export={k: getattr(e, k) for k in _EXPORT} if e is not None else None)
        return out

    def collect(self) -> Iterator[Any]:
        own = self.snapshot()
        m = merge([own, *(self.peers() if self.peers is not None else [])])
        yield _family(CounterMetricFamily, "requests", "Requests answered, by endpoint, status, route, model, feature",
                      ["endpoint", "status", "route", "model", "feature"], m["requests"])
        yield GaugeMetricFamily(PREFIX + "in_flight", "Requests being answered now", value=m["in_flight"])
        yield _family(CounterMetricFamily, "upstream_attempts", "Upstream attempts, by model and outcome",
                      ["model", "outcome"], m["upstream_attempts"])
        yield _family(CounterMetricFamily, "fallbacks", "Failed attempts followed by another model, by trigger",
                      ["model", "trigger"], m["fallbacks"])
        yield _family(CounterMetricFamily, "retrievals", "Retrieval stage runs, by retriever and outcome",
                      ["retriever", "outcome"], m["retrievals"])
        yield _family(CounterMetricFamily, "output_checks", "response_format checks of completions",
                      ["check", "valid"], m["output_checks"])
        yield _family(CounterMetricFamily, "tokenizer_requests", "/tokenize, /detokenize, /tokenizer_info relayed",
                      ["endpoint", "status"], m["passthrough"])
        if own["pools"] is not None:
            healthy = GaugeMetricFamily(PREFIX + "replica_healthy", "1 if the replica is in its pool's rotation",
                                        labels=["model", "replica"])
            outstanding = GaugeMetricFamily(PREFIX + "replica_outstanding", "Requests in flight on the replica",
                                            labels=["model", "replica"])
            requests = CounterMetricFamily(PREFIX + "replica_requests", "Requests sent to the replica",
                                           labels=["model", "replica"])
            failures = CounterMetricFamily(PREFIX + "replica_failures", "Failed requests on the replica",
                                           labels=["model", "replica"])
            for row in m["pools"]:
                labels = [str(row["model"]), str(row["name"])]
                healthy.add_metric(labels, 1 if row["healthy"] else 0)
                outstanding.add_metric(labels, row["outstanding"])
                requests.add_metric(labels, row["requests_total"])
                failures.add_metric(labels, row["failures_total"])
            yield from (healthy, outstanding, requests, failures)
        if m["export"] is not None:
            e = m["export"]
            yield CounterMetricFamily(PREFIX + "spans_exported", "Spans the collector acknowledged",
                                      value=e["exported_spans"])
            yield CounterMetricFamily(PREFIX + "spans_dropped",
                                      "Spans lost: refused by the collector, still unsent at shutdown, or the export "
                                      "queue was full (collector down for long)",
                                      value=e["failed_spans"] + e["dropped_spans"])
            yield CounterMetricFamily(PREFIX + "spans_retried",
                                      "Spans sent again: the collector asked to retry (429/502/503/504) or was unreachable",
                                      value=e["retried_spans"])


def registry_for(metrics: GatewayMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry
