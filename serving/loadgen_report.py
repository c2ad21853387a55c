"""What `fleetlens load` records per request, and the summary it prints (and writes with --json-out)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    """One request as sent and answered. Times in seconds; `status` 0 = no HTTP answer (timeout,
    connection error). `trace_id` is the W3C trace id the gateway joined (sent by us, or echoed)."""

    index: int
    customer: str
    feature: str
    stream: bool
    hard: bool
    planned_s: float
    trace_id: str
    max_tokens: int
    sent_s: float = 0.0
    status: int = 0
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    request_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def lag_s(self) -> float:
        """How late it was sent (waiting for a concurrency slot, or a busy event loop)."""
        return max(0.0, self.sent_s - self.planned_s)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank-with-interpolation percentile (numpy's default 'linear'), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _group(records: list[Record], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    completion = sum(r.completion_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    out: dict[str, Any] = {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "streamed": sum(1 for r in records if r.stream),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "completion_tokens_per_s": round(completion / wall_s, 2) if wall_s > 0 else None,
        "tokens_per_s": round((completion + prompt) / wall_s, 2) if wall_s > 0 else None,
    }
    for name, values in (("latency", latencies), ("ttft", ttfts)):
        for q in (50, 95, 99):
            value = percentile(values, q)
            out[f"{name}_p{q}_ms"] = round(value * 1000, 2) if value is not None else None
    return out


def summarize(records: list[Record], wall_s: float) -> dict[str, Any]:
    """Totals, errors by status, percentiles overall / per feature / per customer."""
    by_feature: dict[str, list[Record]] = defaultdict(list)
    by_customer: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_feature[record.feature].append(record)
        by_customer[record.customer].append(record)
    lags = [r.lag_s for r in records]
    summary = {
        "wall_s": round(wall_s, 3),
        "achieved_rps": round(len(records) / wall_s, 2) if wall_s > 0 else None,
        "overall": _group(records, wall_s),
        "errors_by_status": {str(k): v for k, v in sorted(Counter(r.status for r in records if not r.ok).items())},
        "error_examples": sorted({r.error for r in records if r.error})[:5],
        "send_lag_p99_ms": round((percentile(lags, 99) or 0) * 1000, 2),
        "with_trace_id": sum(1 for r in records if r.trace_id),
        "models": dict(Counter(r.model for r in records if r.model)),
        "by_feature": {name: _group(rs, wall_s) for name, rs in sorted(by_feature.items())},
        "by_customer": {name: _group(rs, wall_s) for name, rs in sorted(by_customer.items())},
    }
    return summary


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def render_summary(summary: dict[str, Any], console: Any) -> None:
    """The rich summary table: one row overall, one per feature, one per customer (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    overall = summary["overall"]
    table = Table(title=f"fleetlens load: {overall['requests']} requests in {summary['wall_s']:.1f} s "
                        f"({summary['achieved_rps']} req/s)", box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    table.add_column("", no_wrap=True)
    for column in ("req", "err", "strm", "lat50", "lat95", "lat99", "ttft50", "ttft95", "ttft99", "tok/s"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))

    def row(label: str, group: dict[str, Any], style: str | None = None) -> None:
        table.add_row(label, str(group["requests"]), str(group["errors"]), str(group["streamed"]),
                      *(_ms(group[f"latency_p{q}_ms"]) for q in (50, 95, 99)),
                      *(_ms(group[f"ttft_p{q}_ms"]) for q in (50, 95, 99)),
                      f"{group['completion_tokens_per_s'] or 0:.0f}", style=style)

    row("all", overall, "bold")
    table.add_section()
    table.add_row("[dim]feature[/dim]")
    for name, group in summary["by_feature"].items():
        row(f" {name}", group)
    table.add_section()
    table.add_row("[dim]customer[/dim]")
    for name, group in summary["by_customer"].items():
        row(f" {name}", group)
    table.caption = ("latency and TTFT (first content chunk, streamed) percentiles in ms of successful requests; "
                     "tok/s = output tokens/s")
    console.print(table)
    errors = summary["errors_by_status"]
    if errors:
        shown = ", ".join(f"{'no answer' if k == '0' else k}: {v}" for k, v in errors.items())
        console.print(f"[red]errors by status: {shown}[/red]")
        for example in summary["error_examples"]:
            console.print(f"  [red]{example}[/red]")
    overall_tokens = f"{overall['tokens_per_s'] or 0:,.1f} tokens/s ({overall['completion_tokens_per_s'] or 0:,.1f} out)"
    console.print(f"{overall_tokens}; {summary['with_trace_id']} requests with a trace id; "
                  f"send lag p99 {summary['send_lag_p99_ms']} ms")
