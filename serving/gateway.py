"""The OpenAI-compatible gateway: one request, one trace, a span per stage.

    POST /v1/chat/completions  (SERVER, root; joins the caller's traceparent if it sent one)
    ├── auth             API key → customer (hashed keys, constant-time check)
    ├── rate_limit       requests/min and tokens/min per key
    ├── route            registry model asked for by name, or the feature's routing rule
    ├── retrieval        features with `retrieval:` only: passages from a Retriever (ids on the span)
    ├── prompt_assembly  the upstream body (served model name, usage in streams, retrieved passages)
    ├── chat {model}     CLIENT, one per upstream attempt; traceparent goes upstream, so vLLM's
    │                    llm_request span lands under it. A failed attempt moves on to the next model
    │                    only if its trigger (error / timeout / overload) is in the route's fallback_on
    └── postprocess      usage accounting, limiter settlement, response_format validation

Every answer — including 401/403/404/429/5xx — is traced with its status. Prompt and completion
text are never put on spans unless `record_content` is on, and then only after the redaction hook.
Streaming responses are relayed chunk by chunk; the spans end when the stream does.

Also served: `/tokenize`, `/detokenize`, `/tokenizer_info` relayed to a replica of the named model
(what lm-eval's `tokenizer_backend=remote` uses), and `/metrics` (Prometheus text, no API key).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleetlens import semconv as sc

from . import errors
from .keys import ApiKey, AuthError, KeyStore, KeysWatcher
from .metrics import GatewayMetrics, GatewayStats, registry_for
from .ratelimit import Limiter
from .redaction import Redactor, default_redactor
from .registry import FeatureRoute, RequestFeatures, RetrievalSpec, RouteDecision, ServingConfig, attempt_order
from .retrieval import Document, Retrievers, insert_context, query_of
from .sse_relay import SSERelayResponse
from .tracing import ExportStats
from .upstream_http import AiohttpTransport

log = logging.getLogger(__name__)

FEATURE_HEADER = "x-fleetlens-feature"
OVERLOAD_STATUSES = frozenset({429, 503})  # the replica is busy: fallback_on "overload", answered 503
ALL_TRIGGERS = ("error", "timeout", "overload")
TOKENIZER_TIMEOUT_S = 30.0


class GatewayError(Exception):
    """An answer other than success, already in OpenAI's error shape."""

    def __init__(self, response: errors.ErrorResponse, error_type: str) -> None:
        super().__init__(response.body["error"]["message"])
        self.response = response
        self.error_type = error_type


@dataclass
class Upstream:
    """Where one attempt goes: a replica's base URL and a callback reporting how it went."""

    replica: str
    base_url: str
    done: Callable[[bool], None]


@dataclass
class Answer:
    """A replica's 2xx answer, committed to: its first bytes are in (`head`), the rest may follow."""

    upstream: Upstream
    response: httpx.Response
    span: Span  # the attempt's CLIENT span, ended when the answer is consumed
    model: str
    head: bytes  # a stream's first chunk, or a plain answer's whole body
    rest: AsyncIterator[bytes] | None = None  # the stream after `head`


_RELEASED = httpx.ByteStream(b"")


async def _release(response: httpx.Response) -> None:
    """Close an upstream response and drop its stream.

    httpx's client wraps the stream in one that points back at the response: a reference cycle
    that kept each request's response, its aiohttp objects and headers (~30 objects) alive until
    the cyclic GC ran, whose passes over them stalled the event loop 10-50 ms under load
    (bench/gateway_overhead.py). Without the cycle they are freed as soon as the relay ends."""
    await response.aclose()
    response.stream = _RELEASED


async def _first_bytes(response: httpx.Response, stream: bool) -> tuple[bytes, AsyncIterator[bytes] | None]:
    if not stream:
        return await response.aread(), None
    # the transport's own stream: httpx's aiter_raw adds a re-chunker and a context manager per chunk
    assert isinstance(response.stream, httpx.AsyncByteStream)
    chunks = aiter(response.stream)
    return await anext(chunks, b""), chunks


UpstreamPicker = Callable[[str], "Upstream | None"]  # model name → a replica of it, or None when none is up


@dataclass(frozen=True)
class OutputCheck:
    """What the request's response_format asks of the completion (checked in postprocess)."""

    kind: str  # "json_schema" / "json_object"
    validator: Any = None  # a jsonschema validator for json_schema


@dataclass(frozen=True)
class CheckResult:
    kind: str
    valid: bool
    error_type: str | None = None  # "invalid_json", "not_an_object", "schema_violation", "no_content"
    message: str = ""


class Gateway:
    """The ASGI app (`.app`) and its per-request pipeline."""

    def __init__(self, config: Callable[[], ServingConfig], keys: Callable[[], KeyStore], limiter: Limiter,
                 pick: UpstreamPicker, tracer: trace.Tracer, *, record_content: bool = False,
                 connect_timeout_s: float = 2.0, rng: random.Random | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, retrievers: Retrievers | None = None,
                 redact: Redactor | None = None, pools_snapshot: Callable[[], list[dict[str, Any]]] | None = None,
                 export_stats: ExportStats | None = None) -> None:
        self.config = config
        self.keys = keys
        self.limiter = limiter
        self.pick = pick
        self.tracer = tracer
        self.record_content = record_content
        self.rng = rng or random.Random()
        # chat/completions go to the transport itself (httpx's client adds redirect, auth and
        # cookie handling per request that a relay to a replica never uses); the client around the
        # same transport serves the tokenizer passthrough
        self.transport = transport or AiohttpTransport()
        self.connect_timeout_s = connect_timeout_s
        self.http = httpx.AsyncClient(transport=self.transport, timeout=httpx.Timeout(60.0, connect=connect_timeout_s))
        self.redact = redact or default_redactor
        self.keys_watcher: KeysWatcher | None = None  # set by service.build: keys.yaml reloads in place
        self.retrievers = retrievers or Retrievers()
        self.retrievers.sync(config().routes.retrievers)  # indexes built at start, not on a first request
        self.stats = GatewayStats()
        self.metrics = GatewayMetrics(self.stats, pools_snapshot, export_stats)
        self.metrics_registry = registry_for(self.metrics)
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ])

    def observe(self, pools_snapshot: Callable[[], list[dict[str, Any]]] | None = None,
                export_stats: ExportStats | None = None) -> None:
        """Show the replica pools and the span exporter's counts on /metrics."""
        if pools_snapshot is not None:
            self.metrics.pools = pools_snapshot
        if export_stats is not None:
            self.metrics.export = export_stats

    async def metrics_endpoint(self, _request: Request) -> Response:
        return Response(generate_latest(self.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        try:
            self.keys().check_authorization(request.headers.get("authorization"))
        except AuthError as error:
            return _error_response(error.to_response())
        registry = self.config().registry
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "fleetlens"}
                for name in sorted(registry.models)]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", sc.ROOT_SPAN)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/completions", "POST /v1/completions")

    # ------------------------------------------------------------------ pipeline
    async def _handle(self, request: Request, path: str, span_name: str) -> Response:
        root = self.tracer.start_span(span_name, context=propagate.extract(request.headers), kind=SpanKind.SERVER,
                                      attributes={sc.OPERATION_NAME: "chat" if "chat" in path else "text_completion",
                                                  sc.PROVIDER_NAME: "vllm"})
        ctx = trace.set_span_in_context(root)
        self.stats.in_flight += 1
        try:
            with self._stage("auth", ctx):
                key = self.keys().check_authorization(request.headers.get("authorization"))
            root.set_attributes({sc.CUSTOMER: key.customer, sc.API_KEY_ID: key.id})
            body = await _json_body(request)
            output_check = _output_check(body)
            feature = key.resolve_feature(request.headers.get(FEATURE_HEADER))
            root.set_attribute(sc.FEATURE, feature or "")
            stream = bool(body.get("stream"))
            root.set_attribute(sc.STREAM, stream)
            features = RequestFeatures.from_request(body)
            estimate = features.estimated_prompt_tokens + int(body.get("max_tokens") or 0)
            with self._stage("rate_limit", ctx):
                decision = await self.limiter.check(key.id, tokens_estimate=estimate)
                if not decision.allowed:  # 429, or 503 when the limiter's store is down and fails closed
                    refusal = decision.error_response()
                    raise GatewayError(refusal, str(refusal.status))
            with self._stage("route", ctx) as route_span:
                route, attempts = self._route(body, feature, features)
                if not key.allows_model(route.model):
                    raise GatewayError(errors.permission_denied(f"this key may not use model {route.model!r}"), "403")
                route_span.set_attributes({sc.ROUTE: route.route, sc.REQUEST_MODEL: route.model,
                                           sc.ROUTE_VARIANT: "canary" if route.is_canary else "baseline"})
            root.set_attributes({sc.ROUTE: route.route, sc.REQUEST_MODEL: route.model,
                                 sc.ROUTE_VARIANT: "canary" if route.is_canary else "baseline"})
            if body.get("max_tokens") is not None:
                root.set_attribute(sc.REQUEST_MAX_TOKENS, int(body["max_tokens"]))
            # retrieval, output checks and timeout follow the route taken (a route named as `model`)
            routing = feature if route.route == "explicit" else self._routing_feature(body, feature)
            feature_route = self._feature_route(routing)
            documents: list[Document] = []
            if feature_route.retrieval is not None:
                documents = await self._retrieve(body, feature_route.retrieval, ctx)
            with self._stage("prompt_assembly", ctx):
                if stream:
                    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
                body = insert_context(body, documents)
            answer = await self._call_upstream(path, body, attempts, ctx, self._timeout(routing),
                                               feature_route.fallback_on, stream=stream)
            upstream, response, attempt_span, model = answer.upstream, answer.response, answer.span, answer.model
        except GatewayError as error:
            return self._finish_error(root, error)
        except AuthError as error:
            return self._finish_error(root, GatewayError(error.to_response(), str(error.status)))
        if stream:
            notes = _StreamNotes(self.record_content)
            return SSERelayResponse(notes.relay(answer.head, answer.rest), functools.partial(
                self._finish_stream, answer, notes, root, ctx, key.id, estimate), status=response.status_code)
        try:
            payload = json.loads(answer.head)
        finally:
            await _release(response)
        usage = payload.get("usage") or {}
        finish = [c.get("finish_reason") for c in payload.get("choices", []) if c.get("finish_reason")]
        if self.record_content:
            self._record(attempt_span, sc.OUTPUT_MESSAGES, lambda: _output_messages(payload, self.redact))
        self._close_attempt(attempt_span, upstream, True, model, usage, finish)
        check = _check_output(output_check, payload) if output_check is not None else None
        refuse = check is not None and not check.valid and feature_route.on_invalid == "error"
        await self._postprocess(root, ctx, key.id, estimate, model, usage, finish, 502 if refuse else 200,
                                check=check)
        if refuse:
            assert check is not None
            return _error_response(errors.error_response(
                502, f"the model's answer does not match the requested response_format: {check.message}",
                "server_error", code="invalid_response_format"))
        return JSONResponse(payload)

    def _route(self, body: dict[str, Any], feature: str | None,
               features: RequestFeatures) -> tuple[RouteDecision, list[str]]:
        config = self.config()
        requested = body.get("model")
        registry = config.registry.models
        by_served = {config.registry.served_name(name): name for name in registry}
        if requested in registry or requested in by_served:
            name = requested if requested in registry else by_served[requested]
            return RouteDecision(name, "explicit", False), [name]
        routing = self._routing_feature(body, feature)
        decision = config.routes.choose(routing, features, self.rng)
        return decision, attempt_order(config.routes, routing, decision)

    def _routing_feature(self, body: dict[str, Any], feature: str | None) -> str | None:
        """Whose route a request takes: a route named as `model` (a feature of routes.yaml) — so an
        eval run tagged feature `eval` can judge a route exactly as its traffic takes it — else the
        request's own feature. Any other name is an unknown model (404)."""
        requested = body.get("model")
        if requested in (None, "", "auto"):
            return feature
        if requested != feature and requested not in self.config().routes.features:
            raise GatewayError(errors.model_not_found(str(requested)), "404")
        return str(requested)

    def _feature_route(self, feature: str | None) -> FeatureRoute:
        return self.config().routes.route_for(feature)[1]

    async def _retrieve(self, body: dict[str, Any], spec: RetrievalSpec, ctx: Any) -> list[Document]:
        """The retrieval stage; a retriever that fails or is missing costs the passages, never the request."""
        with self._stage("retrieval", ctx) as span:
            span.set_attribute(sc.RETRIEVER, spec.retriever)
            specs = self.config().routes.retrievers
            if self.retrievers.needs_sync(specs):  # routes.yaml reloaded with a new or changed retriever
                await asyncio.to_thread(self.retrievers.sync, specs)
            retriever = self.retrievers.get(spec.retriever)
            documents: list[Document] = []
            error_type = None
            if retriever is None:
                error_type = "retriever_unavailable"
            else:
                try:
                    documents = list(await retriever.retrieve(query_of(body), spec.top_k))[: spec.top_k]
                except Exception as error:  # noqa: BLE001 - retrieval is an enhancement, not a dependency
                    log.warning("retriever %s failed: %s", spec.retriever, error)
                    error_type = type(error).__name__
            self.stats.retrievals[(spec.retriever, "error" if error_type else "ok")] += 1
            if error_type:
                span.set_attribute(sc.ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR, f"retrieval failed: {error_type}"))
            span.set_attributes({sc.RETRIEVAL_DOCUMENTS: len(documents),
                                 sc.RETRIEVAL_DOCUMENT_IDS: [doc.id for doc in documents]})
            if self.record_content and documents:
                self._record(span, sc.RETRIEVAL_CONTENT, lambda: json.dumps(
                    [{"id": d.id, "source": d.source, "score": d.score, "content": self.redact(d.text)}
                     for d in documents]))
            return documents

    def _record(self, span: Span, key: str, value: Callable[[], str]) -> None:
        """Put (redacted) content on a span; a redactor that fails means nothing is recorded."""
        try:
            span.set_attribute(key, value())
        except Exception as error:  # noqa: BLE001 - a custom hook's bug must not fail the request
            log.warning("redaction hook failed, %s not recorded: %s", key, type(error).__name__)

    def _timeout(self, feature: str | None) -> float:
        routes = self.config().routes
        name = feature if feature in routes.features else routes.default
        return routes.features[name].timeout_s

    async def _call_upstream(self, path: str, body: dict[str, Any], attempts: list[str], ctx: Any,
                             timeout_s: float, fallback_on: Collection[str] = ALL_TRIGGERS, *,
                             stream: bool = False) -> Answer:
        """Try each model in order (fallbacks); the first 2xx answer wins. 4xx answers are the
        client's problem and are passed back as they are. An answer counts as given once its first
        bytes are in (a stream's first chunk, a plain answer's whole body): a replica that dies or
        stalls before that is one more failed attempt, invisible to the client. A failure moves on to the next attempt
        only when its trigger is in `fallback_on` — "error": 5xx or a connection error (502),
        "timeout" (504), "overload": a 429/503 answer or no replica with room (503); otherwise the
        request ends with that failure's error."""
        last_error: GatewayError | None = None
        config = self.config()

        def failed(model: str, number: int, trigger: str, error: GatewayError) -> GatewayError:
            if trigger not in fallback_on:
                raise error
            if number < len(attempts):
                self.stats.fallbacks[(model, trigger)] += 1
            return error

        for number, model in enumerate(attempts, start=1):
            upstream = self.pick(model)
            if upstream is None:
                self.stats.upstream_attempts[(model, "no_replica")] += 1
                last_error = failed(model, number, "overload", GatewayError(errors.upstream_error(
                    503, f"no healthy replica of {model} with room for the request", retry_after_s=1), "503"))
                continue
            span = self.tracer.start_span(f"{sc.UPSTREAM_SPAN_PREFIX}{model}", context=ctx, kind=SpanKind.CLIENT,
                                          attributes={sc.OPERATION_NAME: "chat", sc.PROVIDER_NAME: "vllm",
                                                      sc.REQUEST_MODEL: model, sc.REPLICA: upstream.replica,
                                                      sc.ATTEMPT: number,
                                                      sc.MODEL_VARIANT: config.registry.models[model].variant,
                                                      **_server_attributes(upstream.base_url)})
            headers = {"content-type": "application/json"}
            propagate.inject(headers, context=trace.set_span_in_context(span))
            upstream_body = dict(body, model=config.registry.served_name(model))
            if self.record_content:
                self._record(span, sc.INPUT_MESSAGES, lambda: _input_messages(upstream_body, self.redact))
            started = time.perf_counter()
            request = httpx.Request("POST", upstream.base_url.rstrip("/") + path, headers=headers,
                                    content=json.dumps(upstream_body).encode(), extensions={"timeout": {
                                        "connect": self.connect_timeout_s, "read": timeout_s,
                                        "write": timeout_s, "pool": timeout_s}})
            try:
                response = await self.transport.handle_async_request(request)
                response.request = request
            except httpx.TransportError as error:  # timeouts included
                last_error = failed(model, number, *self._transport_failure(span, upstream, model, error))
                continue
            status = response.status_code
            span.set_attribute(sc.HTTP_STATUS_CODE, status)
            if status in OVERLOAD_STATUSES:
                await _release(response)
                self.stats.upstream_attempts[(model, "overload")] += 1
                span.set_attribute(sc.FALLBACK_TRIGGER, "overload")
                # a 429 is a busy replica, not a broken one: it stays in rotation
                self._close_attempt(span, upstream, status == 429, model, error_type=str(status))
                if status == 429:
                    span.set_status(Status(StatusCode.ERROR, "upstream 429"))
                retry_after = _retry_after(response.headers.get("retry-after"))
                last_error = failed(model, number, "overload", GatewayError(errors.upstream_error(
                    503, f"{model} is overloaded (answered {status})", retry_after_s=retry_after), "503"))
                continue
            if status >= 500:
                await _release(response)
                self.stats.upstream_attempts[(model, "error")] += 1
                span.set_attribute(sc.FALLBACK_TRIGGER, "error")
                self._close_attempt(span, upstream, False, model, error_type=str(status))
                last_error = failed(model, number, "error", GatewayError(
                    errors.upstream_error(502, f"{model} answered {status}"), "502"))
                continue
            if status >= 400:
                content = await response.aread()
                await _release(response)
                self.stats.upstream_attempts[(model, "client_error")] += 1
                self._close_attempt(span, upstream, True, model, error_type=str(status))
                raise GatewayError(errors.ErrorResponse(status, _error_body(content), {}), str(status))
            try:
                head, rest = await _first_bytes(response, stream)
            except httpx.TransportError as error:
                await _release(response)
                last_error = failed(model, number, *self._transport_failure(span, upstream, model, error))
                continue
            if stream:
                span.set_attribute(sc.TIME_TO_FIRST_CHUNK, time.perf_counter() - started)
            self.stats.upstream_attempts[(model, "ok")] += 1
            return Answer(upstream, response, span, model, head, rest)
        assert last_error is not None
        raise last_error

    def _transport_failure(self, span: Span, upstream: Upstream, model: str,
                           error: httpx.TransportError) -> tuple[str, GatewayError]:
        """Close a failed attempt; (fallback trigger, the error the client gets if nothing else answers)."""
        timed_out = isinstance(error, httpx.TimeoutException)
        trigger = "timeout" if timed_out else "error"
        self.stats.upstream_attempts[(model, trigger)] += 1
        span.set_attribute(sc.FALLBACK_TRIGGER, trigger)
        self._close_attempt(span, upstream, False, model, error_type="timeout" if timed_out else type(error).__name__)
        if timed_out:
            return trigger, GatewayError(errors.upstream_error(504, f"{model} timed out"), "504")
        return trigger, GatewayError(errors.upstream_error(502, f"{model} unreachable"), "502")

    async def _finish_stream(self, answer: Answer, notes: _StreamNotes, root: Span, ctx: Any, key_id: str,
                             estimate: int, outcome: int) -> None:
        """The relayed stream has ended (`outcome`: 200 all sent, 499 the client left, 500 relaying
        failed): release the upstream, close the spans. Runs after the client has the last byte."""
        response, upstream, span, model = answer.response, answer.upstream, answer.span, answer.model
        await _release(response)
        status = 502 if notes.upstream_error is not None and outcome == 200 else outcome
        if notes.texts is not None:
            texts, finish = notes.texts, notes.finish
            self._record(span, sc.OUTPUT_MESSAGES, lambda: _messages_json(
                [("assistant", "".join(texts[index]), finish[index] if index < len(finish) else None)
                 for index in sorted(texts)], self.redact))
        if notes.upstream_error is not None:
            self.stats.upstream_attempts[(model, "broken_stream")] += 1
            self._close_attempt(span, upstream, False, model, notes.usage, notes.finish,
                                error_type=type(notes.upstream_error).__name__)
        else:  # a client that left is no fault of the replica's: it stays healthy for the pool
            self._close_attempt(span, upstream, True, model, notes.usage, notes.finish)
        await self._postprocess(root, ctx, key_id, estimate, model, notes.usage, notes.finish, status)

    # ------------------------------------------------------------------ spans
    @contextlib.contextmanager
    def _stage(self, name: str, ctx: Any) -> Iterator[Span]:
        """A stage's span, a child of the request's root in `ctx`. Not made the current span: nothing
        inside a stage reads the current context, and attaching it costs every request; an
        exception that leaves the stage is recorded on it and sets it ERROR, as `use_span` does."""
        span = self.tracer.start_span(name, context=ctx, kind=SpanKind.INTERNAL, attributes={sc.STAGE: name})
        try:
            yield span
        except Exception as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            raise
        finally:
            span.end()

    def _close_attempt(self, span: Span, upstream: Upstream, ok: bool, model: str,
                       usage: dict[str, Any] | None = None, finish: list[str] | None = None,
                       error_type: str | None = None) -> None:
        upstream.done(ok)
        if usage:
            span.set_attributes({sc.USAGE_INPUT_TOKENS: int(usage.get("prompt_tokens") or 0),
                                 sc.USAGE_OUTPUT_TOKENS: int(usage.get("completion_tokens") or 0),
                                 sc.RESPONSE_MODEL: model})
        if finish:
            span.set_attribute(sc.RESPONSE_FINISH_REASONS, finish)
        if error_type:
            span.set_attribute(sc.ERROR_TYPE, error_type)
            if not ok:
                span.set_status(Status(StatusCode.ERROR, f"upstream {error_type}"))
        span.end()

    async def _postprocess(self, root: Span, ctx: Any, key_id: str, estimate: int, model: str,
                           usage: dict[str, Any], finish: list[str], status: int,
                           check: CheckResult | None = None) -> None:
        with self._stage("postprocess", ctx) as span:
            if check is not None:
                self.stats.output_checks[(check.kind, str(check.valid).lower())] += 1
                span.set_attributes({sc.POSTPROCESS_CHECK: check.kind, sc.POSTPROCESS_VALID: check.valid})
                if check.error_type:
                    span.set_attribute(sc.ERROR_TYPE, check.error_type)
            actual = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            await self.limiter.settle(key_id, estimate, actual if usage else estimate)
        root.set_attributes({sc.HTTP_STATUS_CODE: status, sc.RESPONSE_MODEL: model})
        if usage:
            root.set_attributes({sc.USAGE_INPUT_TOKENS: int(usage.get("prompt_tokens") or 0),
                                 sc.USAGE_OUTPUT_TOKENS: int(usage.get("completion_tokens") or 0)})
        if finish:
            root.set_attribute(sc.RESPONSE_FINISH_REASONS, finish)
        if status >= 500:
            root.set_attribute(sc.ERROR_TYPE, check.error_type if check and check.error_type else str(status))
            root.set_status(Status(StatusCode.ERROR, f"answered {status}"))
        self._count(root, status)
        root.end()

    def _count(self, root: Span, status: int) -> None:
        """The request is answered: count it on /metrics by the labels its root span carries."""
        attributes = getattr(root, "attributes", None) or {}
        name = getattr(root, "name", "") or ""
        model = attributes.get(sc.RESPONSE_MODEL) or attributes.get(sc.REQUEST_MODEL) or ""
        self.stats.requests[(name.split(" ", 1)[-1], str(status), str(attributes.get(sc.ROUTE, "")), str(model),
                             str(attributes.get(sc.FEATURE, "")))] += 1
        self.stats.in_flight -= 1

    def _finish_error(self, root: Span, error: GatewayError) -> Response:
        status = error.response.status
        root.set_attributes({sc.HTTP_STATUS_CODE: status, sc.ERROR_TYPE: error.error_type})
        if status >= 500:
            root.set_status(Status(StatusCode.ERROR, str(error)))
        self._count(root, status)
        root.end()
        return _error_response(error.response)

    # ------------------------------------------------------------------ tokenizer passthrough
    async def tokenize(self, request: Request) -> Response:
        return await self._tokenizer(request, "/tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self._tokenizer(request, "/detokenize")

    async def tokenizer_info(self, request: Request) -> Response:
        return await self._tokenizer(request, "/tokenizer_info")

    async def _tokenizer(self, request: Request, path: str) -> Response:
        """Relay a tokenizer call to a healthy replica of the model named by `model` (body, or
        `?model=` for GET); without one, the key's only allowed model or its feature's fixed model.
        The upstream's answer — a 404 from a vLLM without `--enable-tokenizer-info-endpoint`
        included — is passed back as it is."""
        span = self.tracer.start_span(f"{request.method} {path}", context=propagate.extract(request.headers),
                                      kind=SpanKind.SERVER)
        status = 500
        try:
            key = self.keys().check_authorization(request.headers.get("authorization"))
            span.set_attributes({sc.CUSTOMER: key.customer, sc.API_KEY_ID: key.id})
            body = await _json_body(request) if request.method == "POST" else None
            model = self._tokenizer_model((body or {}).get("model") or request.query_params.get("model"), key,
                                          request.headers.get(FEATURE_HEADER))
            if not key.allows_model(model):
                raise GatewayError(errors.permission_denied(f"this key may not use model {model!r}"), "403")
            span.set_attribute(sc.REQUEST_MODEL, model)
            upstream = self.pick(model)
            if upstream is None:
                raise GatewayError(errors.upstream_error(503, f"no healthy replica of {model}", retry_after_s=1), "503")
            span.set_attribute(sc.REPLICA, upstream.replica)
            headers = {"content-type": "application/json"}
            propagate.inject(headers, context=trace.set_span_in_context(span))
            url = upstream.base_url.rstrip("/") + path
            served = self.config().registry.served_name(model)
            try:
                if body is None:
                    response = await self.http.get(url, headers=headers, timeout=TOKENIZER_TIMEOUT_S)
                else:
                    response = await self.http.post(url, headers=headers, timeout=TOKENIZER_TIMEOUT_S,
                                                    content=json.dumps(dict(body, model=served)).encode())
            except httpx.TimeoutException:
                upstream.done(False)
                raise GatewayError(errors.upstream_error(504, f"{model} timed out"), "504") from None
            except httpx.TransportError:
                upstream.done(False)
                raise GatewayError(errors.upstream_error(502, f"{model} unreachable"), "502") from None
            upstream.done(response.status_code < 500)
            status = response.status_code
            return Response(response.content, status_code=status,
                            media_type=response.headers.get("content-type", "application/json"))
        except GatewayError as error:
            status = error.response.status
            span.set_attribute(sc.ERROR_TYPE, error.error_type)
            return _error_response(error.response)
        except AuthError as error:
            status = error.status
            return _error_response(error.to_response())
        finally:
            span.set_attribute(sc.HTTP_STATUS_CODE, status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"answered {status}"))
            self.stats.passthrough[(path, str(status))] += 1
            span.end()

    def _tokenizer_model(self, requested: Any, key: ApiKey, feature_header: str | None) -> str:
        config = self.config()
        registry = config.registry.models
        if requested:
            if requested in registry:
                return str(requested)
            by_served = {config.registry.served_name(name): name for name in registry}
            if requested in by_served:
                return by_served[requested]
            raise GatewayError(errors.model_not_found(str(requested)), "404")
        if key.allowed_models is not None and len(key.allowed_models) == 1:
            (only,) = key.allowed_models
            if only in registry:
                return only
        route = self._feature_route(key.resolve_feature(feature_header))
        if route.model is not None:
            return route.model
        raise GatewayError(errors.invalid_request(
            "name the model whose tokenizer to use: `model` in the body, or ?model= for GET", param="model"), "400")

    async def aclose(self) -> None:
        await self.http.aclose()


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise GatewayError(errors.invalid_request("request body is not valid JSON"), "400") from None
    if not isinstance(body, dict):
        raise GatewayError(errors.invalid_request("request body must be a JSON object"), "400")
    if body.get("max_tokens") is not None and (not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1):
        raise GatewayError(errors.invalid_request("max_tokens must be a positive integer", param="max_tokens"), "400")
    return body


def _output_check(body: dict[str, Any]) -> OutputCheck | None:
    """The check a request's response_format asks for; 400 when its JSON schema is itself invalid."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return OutputCheck("json_object")
    if kind != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise GatewayError(errors.invalid_request(
            "response_format.json_schema.schema must be a JSON schema object", param="response_format"), "400")
    import jsonschema

    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise GatewayError(errors.invalid_request(
            f"response_format.json_schema.schema is not a valid JSON schema: {error.message}",
            param="response_format"), "400") from None
    return OutputCheck("json_schema", validator_class(schema))


def _check_output(check: OutputCheck, payload: dict[str, Any]) -> CheckResult:
    """Validate every choice's content (chat: message.content, completions: text)."""
    import jsonschema

    for choice in payload.get("choices") or []:
        content = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        if not isinstance(content, str):
            return CheckResult(check.kind, False, "no_content", "the answer has no text content")
        try:
            value = json.loads(content)
        except ValueError as error:
            return CheckResult(check.kind, False, "invalid_json", f"not valid JSON ({error.msg})")
        if check.kind == "json_object" and not isinstance(value, dict):
            return CheckResult(check.kind, False, "not_an_object", "not a JSON object")
        if check.validator is not None:
            problem = jsonschema.exceptions.best_match(check.validator.iter_errors(value))
            if problem is not None:
                return CheckResult(check.kind, False, "schema_violation",
                                   f"at {problem.json_path}: {problem.message[:300]}")
    return CheckResult(check.kind, True)


@functools.lru_cache(maxsize=1024)
def _server_attributes(base_url: str) -> dict[str, Any]:
    """server.address / server.port of an upstream, parsed once per replica URL."""
    url = httpx.URL(base_url)
    return {sc.SERVER_ADDRESS: url.host, sc.SERVER_PORT: url.port or (443 if url.scheme == "https" else 80)}


def _retry_after(value: str | None) -> float:
    try:
        return max(1.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _messages_json(messages: list[tuple[str, str, str | None]], redact: Redactor) -> str:
    """GenAI semantic-convention messages: role, text parts (redacted), finish_reason for outputs."""
    out = []
    for role, text, finish_reason in messages:
        message: dict[str, Any] = {"role": role, "parts": [{"type": "text", "content": redact(text)}]}
        if finish_reason is not None:
            message["finish_reason"] = finish_reason
        out.append(message)
    return json.dumps(out, ensure_ascii=False)


def _input_messages(body: dict[str, Any], redact: Redactor) -> str:
    if isinstance(body.get("messages"), list):
        return _messages_json([(str(m.get("role", "user")), _text_of(m.get("content")), None)
                               for m in body["messages"] if isinstance(m, dict)], redact)
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    return _messages_json([("user", p, None) for p in prompts if isinstance(p, str)], redact)


def _output_messages(payload: dict[str, Any], redact: Redactor) -> str:
    messages = []
    for choice in payload.get("choices") or []:
        if "message" in choice:
            message = choice.get("message") or {}
            messages.append((str(message.get("role") or "assistant"), _text_of(message.get("content")),
                             choice.get("finish_reason")))
        else:
            messages.append(("assistant", str(choice.get("text") or ""), choice.get("finish_reason")))
    return _messages_json(messages, redact)


# A usage object or a finish reason that is not null: the only chunks the accounting needs.
_EVENT_OF_INTEREST = re.compile(rb'"usage"\s*:\s*\{|"finish_reason"\s*:\s*"')


class _StreamNotes:
    """What a relayed SSE stream says about itself as it passes: the usage chunk, finish reasons,
    the completion text (only with record_content), and whether the upstream broke off."""

    def __init__(self, record_content: bool) -> None:
        self.usage: dict[str, Any] = {}
        self.finish: list[str] = []
        self.texts: dict[int, list[str]] | None = {} if record_content else None
        self.upstream_error: httpx.TransportError | None = None

    async def relay(self, head: bytes, rest: AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
        """Pass the stream's first chunk and the rest through, noting events. An upstream that
        fails mid-stream ends the relay with an error event in OpenAI's shape (what SDKs raise on)
        instead of a cut connection."""
        buffer = b""
        try:
            if head:
                buffer = self._note(head)
                yield head
            if rest is not None:
                async for chunk in rest:
                    buffer = self._note(buffer + chunk)
                    yield chunk
        except httpx.TransportError as error:
            self.upstream_error = error
            log.warning("upstream stream broke off: %s", type(error).__name__)
            body = errors.upstream_error(502, "the model's stream broke off before its end").body
            yield (b"\n\n" if buffer else b"") + b"data: " + orjson.dumps(body) + b"\n\ndata: [DONE]\n\n"

    def _note(self, pending: bytes) -> bytes:
        """Note each complete line of `pending`; return the incomplete rest."""
        *lines, rest = pending.split(b"\n")
        for line in lines:
            _note_event(line, self.usage, self.finish, self.texts)
        return rest


def _note_event(line: bytes, usage: dict[str, Any], finish: list[str],
                texts: dict[int, list[str]] | None = None) -> None:
    if not line.startswith(b"data:"):
        return
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return
    if texts is None and not _EVENT_OF_INTEREST.search(data):
        return  # most chunks carry one token and nothing to account: skip parsing them
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict):
        if event.get("usage"):
            usage.update(event["usage"])
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
            if texts is not None and isinstance(choice, dict):
                delta = choice.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(piece, str):
                    texts.setdefault(int(choice.get("index") or 0), []).append(piece)


def _error_body(content: bytes) -> dict[str, Any]:
    try:
        body = json.loads(content)
        if isinstance(body, dict) and "error" in body:
            return body
    except ValueError:
        pass
    return errors.error_response(502, "upstream error", "server_error").body


def _error_response(error: errors.ErrorResponse) -> Response:
    return JSONResponse(error.body, status_code=error.status, headers=error.headers)
