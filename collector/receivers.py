"""OTLP receivers: OTLP/HTTP (`POST /v1/traces`, protobuf or JSON, optionally gzip) and OTLP/gRPC
(`TraceService/Export`). Both decode, screen and hand the accepted spans to the spool, and answer
as the OTLP specification says so that standard exporters do the right thing:

| outcome                                   | HTTP                  | gRPC                                  |
|-------------------------------------------|-----------------------|---------------------------------------|
| all spans fsynced in the spool            | 200                   | OK                                    |
| some spans invalid                        | 200 + partial_success | OK + partial_success                  |
| unusable request (bad protobuf/JSON/gzip) | 400                   | INVALID_ARGUMENT                      |
| over the size limit                       | 413                   | RESOURCE_EXHAUSTED (grpc's own limit) |
| wrong content type / encoding             | 415                   | —                                     |
| too busy (queue or concurrency bound)     | 429 + Retry-After     | RESOURCE_EXHAUSTED + RetryInfo        |
| spool full, memory limit, shutting down   | 503 + Retry-After     | UNAVAILABLE + RetryInfo               |

The retryable answers carry a delay; a sender that honours it loses nothing.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from dataclasses import dataclass

import grpc
import psutil
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import otlp
from .spool import Spool, SpoolError, SpoolFull, SpoolOverloaded
from .telemetry import ReceiverStats

log = logging.getLogger(__name__)

GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@dataclass(frozen=True)
class Refusal:
    """A retryable 'not now': HTTP status, gRPC code, delay, and the counter reason."""

    http_status: int
    grpc_code: grpc.StatusCode
    retry_after_s: float
    reason: str
    message: str


class Intake:
    """What both receivers do once they hold a decoded request: limits, screening, spooling."""

    def __init__(self, spool: Spool, stats: ReceiverStats, *, max_request_bytes: int,
                 max_attribute_value_bytes: int, max_concurrent_requests: int, memory_limit_bytes: int) -> None:
        self.spool = spool
        self.stats = stats
        self.max_request_bytes = max_request_bytes
        self.max_attribute_value_bytes = max_attribute_value_bytes
        self.max_concurrent_requests = max_concurrent_requests
        self.memory_limit_bytes = memory_limit_bytes
        self.in_flight = 0
        self.stopping = False
        self._process = psutil.Process()
        self._rss = 0
        self._rss_checked = 0.0
        self._trimmed = 0.0

    def refusal(self, incoming_bytes: int = 0) -> Refusal | None:
        """Why a new request must be turned away right now, if it must."""
        if self.stopping:
            return Refusal(503, grpc.StatusCode.UNAVAILABLE, 5.0, "shutting_down", "collector is shutting down")
        if self.in_flight >= self.max_concurrent_requests:
            return Refusal(429, grpc.StatusCode.RESOURCE_EXHAUSTED, 1.0, "concurrency",
                           f"{self.in_flight} requests are being handled already")
        if self.over_memory_limit():
            return Refusal(503, grpc.StatusCode.UNAVAILABLE, 2.0, "memory_limit",
                           "collector is over its memory limit")
        try:
            self.spool.admit(incoming_bytes)
        except SpoolError as error:
            return _spool_refusal(error)
        return None

    def over_memory_limit(self) -> bool:
        """The memory limiter (as the OpenTelemetry Collector's): refuse while RSS is over the limit
        and there is work in progress whose completion will shed memory. An idle collector over
        the limit first gives memory back (gc, malloc_trim) and then admits: refusing could not
        make it smaller, and would turn a freed-but-unreturned heap into an outage."""
        if self.rss() <= self.memory_limit_bytes:
            return False
        if self.in_flight or self.spool.pending_bytes:
            return True
        now = time.monotonic()
        if now - self._trimmed > 2.0:
            self._trimmed = now
            release_memory()
            self._rss_checked = 0.0
        return False

    def rss(self) -> int:
        """Resident set size of this process, measured at most every 50 ms."""
        now = time.monotonic()
        if now - self._rss_checked > 0.05:
            self._rss = self._process.memory_info().rss
            self._rss_checked = now
        return self._rss

    async def accept(self, protocol: str, request: otlp.ExportTraceServiceRequest,
                     raw: bytes | None) -> otlp.Screened:
        """Screen and spool; returns what was accepted. Raises BadRequest or SpoolError."""
        spans = otlp.span_count(request)
        self.stats.received_spans[protocol] += spans
        screened = otlp.screen(request, raw, max_attribute_value_bytes=self.max_attribute_value_bytes)
        if screened.accepted:
            await self.spool.append(screened.payload, screened.accepted)
        self.stats.accepted_spans[protocol] += screened.accepted
        self.stats.rejected_spans[protocol] += screened.rejected
        return screened


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _spool_refusal(error: SpoolError) -> Refusal:
    if isinstance(error, SpoolOverloaded):
        return Refusal(429, grpc.StatusCode.RESOURCE_EXHAUSTED, error.retry_after_s, "queue_full", str(error))
    reason = "spool_full" if isinstance(error, SpoolFull) else "shutting_down"
    return Refusal(503, grpc.StatusCode.UNAVAILABLE, error.retry_after_s, reason, str(error))


# ------------------------------------------------------------------------ HTTP
class HttpReceiver:
    """The OTLP/HTTP receiver as a Starlette app; also serves `/metrics` and `/health`."""

    def __init__(self, intake: Intake, registry: CollectorRegistry) -> None:
        self.intake = intake
        self.registry = registry
        self.app = Starlette(routes=[
            Route("/v1/traces", self.export, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    async def metrics(self, _request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "stopping" if self.intake.stopping else "ok"})

    async def export(self, request: Request) -> Response:
        intake, stats = self.intake, self.intake.stats
        stats.requests["http"] += 1
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        as_json = content_type == otlp.JSON
        if content_type not in (otlp.PROTOBUF, otlp.JSON):
            return self._bad(415, "content_type", f"content type must be {otlp.PROTOBUF} or {otlp.JSON}", as_json)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity", ""):
            return self._bad(415, "content_encoding", f"content encoding {encoding!r} is not supported", as_json)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > intake.max_request_bytes:
            return self._bad(413, "too_large", f"request is over {intake.max_request_bytes} bytes", as_json)
        refusal = intake.refusal(int(declared) if declared and declared.isdigit() else 0)
        if refusal:
            return self._refuse(refusal, as_json)
        intake.in_flight += 1
        try:
            try:
                body = await self._read_body(request)
                if encoding == "gzip":
                    body = otlp.gunzip(body, intake.max_request_bytes)
                decoded = otlp.decode_json(body) if as_json else otlp.decode_protobuf(body)
                screened = await intake.accept("http", decoded, None if as_json else body)
            except otlp.TooLarge as error:
                return self._bad(413, "too_large", str(error), as_json)
            except otlp.BadRequest as error:
                return self._bad(400, "invalid", str(error), as_json)
            except SpoolError as error:
                return self._refuse(_spool_refusal(error), as_json)
            except ClientDisconnect:
                return Response(status_code=400)
        finally:
            intake.in_flight -= 1
        return _message(otlp.response(screened.rejected, screened.message), 200, as_json)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.intake.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise otlp.TooLarge(f"request is over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _bad(self, status: int, reason: str, message: str, as_json: bool) -> Response:
        self.intake.stats.bad_requests[("http", reason)] += 1
        code = code_pb2.INVALID_ARGUMENT if status == 400 else code_pb2.FAILED_PRECONDITION
        return _message(status_pb2.Status(code=code, message=message), status, as_json)

    def _refuse(self, refusal: Refusal, as_json: bool) -> Response:
        self.intake.stats.refused_requests[("http", refusal.reason)] += 1
        code = code_pb2.UNAVAILABLE if refusal.http_status == 503 else code_pb2.RESOURCE_EXHAUSTED
        reply = _message(status_pb2.Status(code=code, message=refusal.message), refusal.http_status, as_json)
        reply.headers["Retry-After"] = str(max(1, round(refusal.retry_after_s)))
        return reply


def _message(message: object, status: int, as_json: bool) -> Response:
    if as_json:
        return Response(otlp.encode_json(message), status_code=status, media_type=otlp.JSON)
    return Response(message.SerializeToString(), status_code=status, media_type=otlp.PROTOBUF)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ gRPC
class GrpcReceiver:
    """The OTLP/gRPC receiver. Requests arrive as raw bytes (no deserializer) so the spool gets
    exactly what was sent, without a decode-encode round trip."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(GRPC_SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(self.export),
        })

    async def export(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        intake, stats = self.intake, self.intake.stats
        stats.requests["grpc"] += 1
        refusal = intake.refusal(len(raw))
        if refusal:
            stats.refused_requests[("grpc", refusal.reason)] += 1
            await _abort_retryable(context, refusal)
        intake.in_flight += 1
        try:
            try:
                screened = await intake.accept("grpc", otlp.decode_protobuf(raw), raw)
            except otlp.BadRequest as error:
                stats.bad_requests[("grpc", "invalid")] += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            except SpoolError as error:
                refusal = _spool_refusal(error)
                stats.refused_requests[("grpc", refusal.reason)] += 1
                await _abort_retryable(context, refusal)
        finally:
            intake.in_flight -= 1
        return otlp.response(screened.rejected, screened.message).SerializeToString()


async def _abort_retryable(context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
    """Abort with a retryable code and RetryInfo, both where the OTLP spec puts it
    (`grpc-status-details-bin`) and where the Python exporter looks (`google.rpc.retryinfo-bin`)."""
    seconds = int(refusal.retry_after_s)
    info = error_details_pb2.RetryInfo(
        retry_delay=Duration(seconds=seconds, nanos=int((refusal.retry_after_s - seconds) * 1e9))
    )
    detail = AnyProto()
    detail.Pack(info)
    status = status_pb2.Status(code=refusal.grpc_code.value[0], message=refusal.message, details=[detail])
    await context.abort(refusal.grpc_code, refusal.message, trailing_metadata=(
        ("grpc-status-details-bin", status.SerializeToString()),
        ("google.rpc.retryinfo-bin", info.SerializeToString()),
    ))


async def start_grpc(receiver: GrpcReceiver, host: str, port: int, max_request_bytes: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_concurrent_streams", 256),
    ])
    server.add_generic_rpc_handlers((receiver.handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {address}")
    await server.start()
    return server
