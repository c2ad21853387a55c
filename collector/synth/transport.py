"""Sending OTLP export requests to a collector: OTLP/HTTP (protobuf body) and OTLP/gRPC.

Both retry what the OTLP spec calls retryable (HTTP 429/502/503/504, gRPC UNAVAILABLE /
RESOURCE_EXHAUSTED / ABORTED / DEADLINE_EXCEEDED, and connection errors), honouring an HTTP
`Retry-After`, otherwise backing off exponentially; anything else is an error at once. A partial
success answer is not retried: its rejected span count is returned for the caller to report.
"""

from __future__ import annotations

import gzip
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Protocol

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
DEFAULT_HTTP_ENDPOINT = "http://127.0.0.1:4318"
DEFAULT_GRPC_ENDPOINT = "127.0.0.1:4317"


class SendError(RuntimeError):
    """The collector refused the data (or kept failing after every retry)."""


class Sender(Protocol):
    def send(self, request: ExportTraceServiceRequest) -> int: ...

    def close(self) -> None: ...


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """An HTTP Retry-After header (delta-seconds or an HTTP date) in seconds; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class _Backoff:
    def __init__(self, max_retries: int, initial_s: float, max_s: float, sleep: Callable[[float], None]) -> None:
        self.max_retries, self.initial_s, self.max_s, self.sleep = max_retries, initial_s, max_s, sleep

    def wait(self, attempt: int, hint_s: float | None, what: str) -> None:
        if attempt >= self.max_retries:
            raise SendError(f"giving up after {attempt + 1} attempts: {what}")
        self.sleep(min(self.max_s, hint_s if hint_s is not None else self.initial_s * 2 ** attempt))


class OtlpHttpSender:
    """POST application/x-protobuf to `{endpoint}/v1/traces` (the endpoint may already end in it)."""

    def __init__(self, endpoint: str = DEFAULT_HTTP_ENDPOINT, *, timeout_s: float = 10.0, max_retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, compress: bool = False,
                 headers: dict[str, str] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        base = endpoint.rstrip("/")
        self.url = base if base.endswith("/v1/traces") else base + "/v1/traces"
        self.compress = compress
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        if compress:
            self.headers["Content-Encoding"] = "gzip"
        self.client = httpx.Client(timeout=timeout_s)
        self.backoff = _Backoff(max_retries, backoff_s, max_backoff_s, sleep)

    def send(self, request: ExportTraceServiceRequest) -> int:
        body = request.SerializeToString()
        if self.compress:
            body = gzip.compress(body, mtime=0)
        attempt = 0
        while True:
            try:
                response = self.client.post(self.url, content=body, headers=self.headers)
            except httpx.TransportError as error:
                self.backoff.wait(attempt, None, f"{self.url}: {error}")
                attempt += 1
                continue
            if response.status_code == 200:
                if not response.content:
                    return 0
                answer = ExportTraceServiceResponse.FromString(response.content)
                return answer.partial_success.rejected_spans
            if response.status_code in RETRYABLE_HTTP:
                self.backoff.wait(attempt, retry_after_seconds(response.headers.get("Retry-After")),
                                  f"{self.url} answered {response.status_code}")
                attempt += 1
                continue
            raise SendError(f"{self.url} answered {response.status_code}: {response.text[:300]}")

    def close(self) -> None:
        self.client.close()


class OtlpGrpcSender:
    """TraceService/Export over an insecure gRPC channel (`host:port`, an `http://` prefix is dropped)."""

    def __init__(self, endpoint: str = DEFAULT_GRPC_ENDPOINT, *, timeout_s: float = 10.0, max_retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, compress: bool = False,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

        self.grpc = grpc
        target = endpoint.split("://", 1)[-1].rstrip("/")
        self.channel = grpc.insecure_channel(
            target, compression=grpc.Compression.Gzip if compress else grpc.Compression.NoCompression)
        self.stub = TraceServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.backoff = _Backoff(max_retries, backoff_s, max_backoff_s, sleep)
        self.retryable = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                          grpc.StatusCode.DEADLINE_EXCEEDED}

    def send(self, request: ExportTraceServiceRequest) -> int:
        attempt = 0
        while True:
            try:
                answer = self.stub.Export(request, timeout=self.timeout_s)
                return answer.partial_success.rejected_spans
            except self.grpc.RpcError as error:
                code = error.code()
                if code not in self.retryable:
                    raise SendError(f"gRPC Export failed: {code.name}: {error.details()}") from None
                self.backoff.wait(attempt, None, f"gRPC {code.name}: {error.details()}")
                attempt += 1

    def close(self) -> None:
        self.channel.close()
