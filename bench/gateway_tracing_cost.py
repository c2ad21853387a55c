"""What tracing one request costs the gateway's event loop: the OpenTelemetry SDK's tracer and OTLP
encoder against FleetLens' own (serving/fast_tracer.py, serving/otlp_wire.py), on the spans the
gateway makes for one streaming chat completion (root, auth, rate_limit, route, prompt_assembly,
the upstream call, postprocess, with their attributes).

    .venv/bin/python bench/gateway_tracing_cost.py [--requests 5000]

Prints µs per request to start and end the spans and to encode them (8 spans per encode call, as
the gateway's LoopSpanProcessor does), best of 5 runs. Single-threaded and CPU-bound: the numbers
are steady on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from fleetlens import semconv as sc  # noqa: E402
from fleetlens.serving.fast_tracer import FastTracerProvider  # noqa: E402
from fleetlens.serving.otlp_wire import OtlpSpanEncoder  # noqa: E402

SLICE = 8


def one_request(tracer: trace.Tracer) -> None:
    """The spans and attributes of one streaming request through the gateway (serving/gateway.py)."""
    root = tracer.start_span(sc.ROOT_SPAN, kind=SpanKind.SERVER,
                             attributes={sc.OPERATION_NAME: "chat", sc.PROVIDER_NAME: "vllm"})
    ctx = trace.set_span_in_context(root)
    for stage in ("auth", "rate_limit", "route", "prompt_assembly"):
        span = tracer.start_span(stage, context=ctx, kind=SpanKind.INTERNAL, attributes={sc.STAGE: stage})
        if stage == "route":
            span.set_attributes({sc.ROUTE: "faq", sc.REQUEST_MODEL: "demo-small", sc.ROUTE_VARIANT: "baseline"})
        span.end()
    root.set_attributes({sc.CUSTOMER: "acme", sc.API_KEY_ID: "k1", sc.FEATURE: "faq", sc.STREAM: True,
                         sc.ROUTE: "faq", sc.REQUEST_MODEL: "demo-small", sc.ROUTE_VARIANT: "baseline",
                         sc.REQUEST_MAX_TOKENS: 64})
    upstream = tracer.start_span("chat demo-small", context=ctx, kind=SpanKind.CLIENT, attributes={
        sc.OPERATION_NAME: "chat", sc.PROVIDER_NAME: "vllm", sc.REQUEST_MODEL: "demo-small",
        sc.REPLICA: "demo-small-0", sc.ATTEMPT: 1, sc.MODEL_VARIANT: "bf16", sc.SERVER_ADDRESS: "127.0.0.1",
        sc.SERVER_PORT: 8001})
    upstream.set_attribute(sc.HTTP_STATUS_CODE, 200)
    upstream.set_attribute(sc.TIME_TO_FIRST_CHUNK, 0.0123)
    upstream.set_attributes({sc.USAGE_INPUT_TOKENS: 41, sc.USAGE_OUTPUT_TOKENS: 64, sc.RESPONSE_MODEL: "demo-small"})
    upstream.set_attribute(sc.RESPONSE_FINISH_REASONS, ["length"])
    upstream.end()
    post = tracer.start_span("postprocess", context=ctx, kind=SpanKind.INTERNAL, attributes={sc.STAGE: "postprocess"})
    post.end()
    root.set_attributes({sc.HTTP_STATUS_CODE: 200, sc.RESPONSE_MODEL: "demo-small", sc.USAGE_INPUT_TOKENS: 41,
                         sc.USAGE_OUTPUT_TOKENS: 64})
    root.set_attribute(sc.RESPONSE_FINISH_REASONS, ["length"])
    root.end()


def measure(make: Callable[[], tuple[trace.Tracer, Callable[[], list[Any]], Callable[[list[Any]], bytes]]],
            requests: int) -> tuple[float, float, int]:
    """(µs per request to make the spans, µs per request to encode them, bytes per request), best of 5."""
    best_make = best_encode = float("inf")
    size = 0
    for _ in range(5):
        tracer, ended, encode = make()
        started = time.perf_counter()
        for _ in range(requests):
            one_request(tracer)
        best_make = min(best_make, (time.perf_counter() - started) / requests)
        spans = ended()
        started = time.perf_counter()
        size = sum(len(encode(spans[i:i + SLICE])) for i in range(0, len(spans), SLICE))
        best_encode = min(best_encode, (time.perf_counter() - started) / requests)
    return best_make * 1e6, best_encode * 1e6, size // requests


def sdk() -> tuple[trace.Tracer, Callable[[], list[Any]], Callable[[list[Any]], bytes]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "fleetlens-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return (provider.get_tracer("fleetlens.gateway"), lambda: list(memory.get_finished_spans()),
            lambda spans: encode_spans(spans).SerializeToString())


def fleetlens() -> tuple[trace.Tracer, Callable[[], list[Any]], Callable[[list[Any]], bytes]]:
    ended: list[Any] = []
    encoder = OtlpSpanEncoder(Resource.create({"service.name": "fleetlens-gateway"}).attributes)
    return FastTracerProvider(ended.append).get_tracer("fleetlens.gateway"), lambda: ended, encoder.encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    table = Table(title=f"tracing one gateway request (7 spans), best of 5 x {args.requests} requests")
    for column in ("tracer + encoder", "spans µs/req", "encode µs/req", "total µs/req", "OTLP bytes/req"):
        table.add_column(column, justify="left" if column == "tracer + encoder" else "right")
    for name, make in (("OpenTelemetry SDK + its OTLP encoder", sdk),
                       ("FastTracer + OtlpSpanEncoder (the gateway's)", fleetlens)):
        spans_us, encode_us, size = measure(make, args.requests)
        table.add_row(name, f"{spans_us:.0f}", f"{encode_us:.0f}", f"{spans_us + encode_us:.0f}", str(size))
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
