"""The collector's own counters, served on its `/metrics` in the Prometheus text format.

The pipeline's parts keep plain counters (cheap to bump on the hot path, no locks); this module
reads them when `/metrics` is scraped, so nothing is counted twice and nothing extra runs per span.
Names follow Prometheus conventions, prefixed `fleetlens_collector_`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .spool import Spool
    from .writer import Writer

PREFIX = "fleetlens_collector_"


@dataclass
class ReceiverStats:
    """Counted by the receivers, keyed by protocol ("grpc", "http")."""

    requests: Counter[str] = field(default_factory=Counter)
    received_spans: Counter[str] = field(default_factory=Counter)
    accepted_spans: Counter[str] = field(default_factory=Counter)
    rejected_spans: Counter[str] = field(default_factory=Counter)  # partial success: bad ids, huge values
    bad_requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (protocol, reason)
    refused_requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # retryable: (protocol, reason)


class PipelineMetrics(Collector):
    """Reads every part's counters at scrape time."""

    def __init__(self, receivers: ReceiverStats, spool: Spool, writer: Writer, scraper: Any = None) -> None:
        self.receivers = receivers
        self.spool = spool
        self.writer = writer
        self.scraper = scraper

    def collect(self) -> Iterator[Any]:
        r = self.receivers
        yield _by_protocol("requests", "OTLP export requests received", r.requests)
        yield _by_protocol("received_spans", "Spans in received requests", r.received_spans)
        yield _by_protocol("accepted_spans", "Spans acknowledged (fsynced in the spool)", r.accepted_spans)
        yield _by_protocol("rejected_spans", "Spans refused as invalid (partial success)", r.rejected_spans)
        bad = CounterMetricFamily(PREFIX + "bad_requests", "Requests refused as unusable (4xx)",
                                  labels=["protocol", "reason"])
        for (protocol, reason), value in sorted(r.bad_requests.items()):
            bad.add_metric([protocol, reason], value)
        yield bad
        refused = CounterMetricFamily(PREFIX + "refused_requests", "Requests answered 'retry later' (429/503)",
                                      labels=["protocol", "reason"])
        for (protocol, reason), value in sorted(r.refused_requests.items()):
            refused.add_metric([protocol, reason], value)
        yield refused

        s = self.spool.stats
        yield CounterMetricFamily(PREFIX + "spooled_spans", "Spans written and fsynced to the spool",
                                  value=s.appended_spans)
        yield CounterMetricFamily(PREFIX + "replayed_spans", "Spans found unwritten in the spool at start",
                                  value=s.recovered_spans)
        yield CounterMetricFamily(PREFIX + "dropped_spans", "Spans dropped because the spool was full (drop_oldest)",
                                  value=s.dropped_spans)
        yield CounterMetricFamily(PREFIX + "spool_corrupt_records", "Corrupt spool records skipped",
                                  value=s.corrupt_records)
        yield GaugeMetricFamily(PREFIX + "spool_bytes", "Spool bytes not yet in the warehouse",
                                value=self.spool.size_bytes)
        yield GaugeMetricFamily(PREFIX + "spool_max_bytes", "Bound on the spool", value=self.spool.max_bytes)
        yield GaugeMetricFamily(PREFIX + "queue_bytes", "Bytes waiting for the spool's fsync (queue depth)",
                                value=self.spool.pending_bytes)

        w = self.writer.stats
        yield CounterMetricFamily(PREFIX + "written_spans", "Spans inserted into the warehouse", value=w.spans_written)
        yield CounterMetricFamily(PREFIX + "written_batches", "Batches inserted into the warehouse",
                                  value=w.batches_written)
        yield CounterMetricFamily(PREFIX + "write_errors", "Failed warehouse inserts (retried)", value=w.write_errors)
        yield CounterMetricFamily(PREFIX + "dead_lettered_requests",
                                  "Requests the warehouse refused as invalid, kept in spool/deadletter",
                                  value=w.dead_lettered_records)
        yield GaugeMetricFamily(PREFIX + "warehouse_up", "1 if the last warehouse write succeeded",
                                value=1.0 if self.writer.healthy else 0.0)
        durations = list(w.batch_seconds)
        yield SummaryMetricFamily(PREFIX + "batch_latency_seconds",
                                  "Time from reading a batch off the spool to its rows being in the warehouse "
                                  "(last 1,024 batches)",
                                  count_value=len(durations), sum_value=sum(durations))
        if durations:
            ordered = sorted(durations)
            yield GaugeMetricFamily(PREFIX + "batch_latency_p99_seconds", "p99 of the last 1,024 batches",
                                    value=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))])
        if self.scraper is not None:
            yield from self.scraper.metric_families(PREFIX)


def _by_protocol(name: str, documentation: str, values: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=["protocol"])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family
