"""The OpenAI-compatible gateway: one request, one trace, a span per stage.

    POST /v1/chat/completions  (SERVER, root; joins the caller's traceparent if it sent one)
    ├── auth             API key → customer (hashed keys, constant-time check)
    ├── rate_limit       requests/min and tokens/min per key
    ├── route            registry model asked for by name, or the feature's routing rule
    ├── prompt_assembly  the upstream body (served model name, usage in streams)
    ├── chat {model}     CLIENT, one per upstream attempt; traceparent goes upstream, so vLLM's
    │                    llm_request span lands under it
    └── postprocess      usage accounting, limiter settlement

Every answer — including 401/403/404/429/5xx — is traced with its status. Prompt and completion
text are never put on spans unless `record_content` is on. Streaming responses are relayed chunk by
chunk; the spans end when the stream does.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fleetlens import semconv as sc

from . import errors
from .keys import AuthError, KeyStore
from .ratelimit import Limiter
from .registry import RequestFeatures, RouteDecision, ServingConfig, attempt_order

FEATURE_HEADER = "x-fleetlens-feature"
RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})


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


UpstreamPicker = Callable[[str], "Upstream | None"]  # model name → a replica of it, or None when none is up


class Gateway:
    """The ASGI app (`.app`) and its per-request pipeline."""

    def __init__(self, config: Callable[[], ServingConfig], keys: Callable[[], KeyStore], limiter: Limiter,
                 pick: UpstreamPicker, tracer: trace.Tracer, *, record_content: bool = False,
                 connect_timeout_s: float = 2.0, rng: random.Random | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.keys = keys
        self.limiter = limiter
        self.pick = pick
        self.tracer = tracer
        self.record_content = record_content
        self.rng = rng or random.Random()
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

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
        try:
            with self._stage("auth", ctx):
                key = self.keys().check_authorization(request.headers.get("authorization"))
            root.set_attributes({sc.CUSTOMER: key.customer, sc.API_KEY_ID: key.id})
            body = await _json_body(request)
            feature = key.resolve_feature(request.headers.get(FEATURE_HEADER))
            root.set_attribute(sc.FEATURE, feature or "")
            stream = bool(body.get("stream"))
            root.set_attribute(sc.STREAM, stream)
            features = RequestFeatures.from_request(body)
            estimate = features.estimated_prompt_tokens + int(body.get("max_tokens") or 0)
            with self._stage("rate_limit", ctx):
                decision = self.limiter.check(key.id, tokens_estimate=estimate)
                if not decision.allowed:
                    raise GatewayError(decision.error_response(), "429")
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
            with self._stage("prompt_assembly", ctx):
                if stream:
                    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            upstream, response, attempt_span, model, started = await self._call_upstream(
                path, body, attempts, ctx, self._timeout(feature))
        except GatewayError as error:
            return self._finish_error(root, error)
        except AuthError as error:
            return self._finish_error(root, GatewayError(error.to_response(), str(error.status)))
        if stream:
            return StreamingResponse(
                self._relay(response, upstream, attempt_span, root, ctx, key.id, estimate, model, started),
                status_code=response.status_code, media_type="text/event-stream",
                headers={"cache-control": "no-cache"})
        try:
            payload = json.loads(await response.aread())
        finally:
            await response.aclose()
        usage = payload.get("usage") or {}
        finish = [c.get("finish_reason") for c in payload.get("choices", []) if c.get("finish_reason")]
        self._close_attempt(attempt_span, upstream, True, model, usage, finish)
        self._postprocess(root, ctx, key.id, estimate, model, usage, finish, 200)
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
        if requested not in (None, "", "auto") and requested != feature:
            raise GatewayError(errors.model_not_found(str(requested)), "404")
        decision = config.routes.choose(feature, features, self.rng)
        return decision, attempt_order(config.routes, feature, decision)

    def _timeout(self, feature: str | None) -> float:
        routes = self.config().routes
        name = feature if feature in routes.features else routes.default
        return routes.features[name].timeout_s

    async def _call_upstream(self, path: str, body: dict[str, Any], attempts: list[str], ctx: Any,
                             timeout_s: float) -> tuple[Upstream, httpx.Response, Span, str, float]:
        """Try each model in order (fallbacks); the first 2xx answer wins. 4xx answers are the
        client's problem and are passed back as they are; 5xx, timeouts and connection errors move
        on to the next attempt."""
        last_error: GatewayError | None = None
        config = self.config()
        for number, model in enumerate(attempts, start=1):
            upstream = self.pick(model)
            if upstream is None:
                last_error = GatewayError(errors.upstream_error(503, f"no healthy replica of {model}"), "503")
                continue
            span = self.tracer.start_span(f"{sc.UPSTREAM_SPAN_PREFIX}{model}", context=ctx, kind=SpanKind.CLIENT,
                                          attributes={sc.OPERATION_NAME: "chat", sc.PROVIDER_NAME: "vllm",
                                                      sc.REQUEST_MODEL: model, sc.REPLICA: upstream.replica,
                                                      sc.ATTEMPT: number,
                                                      sc.MODEL_VARIANT: config.registry.models[model].variant,
                                                      sc.SERVER_ADDRESS: httpx.URL(upstream.base_url).host,
                                                      sc.SERVER_PORT: httpx.URL(upstream.base_url).port or 80})
            headers = {"content-type": "application/json"}
            propagate.inject(headers, context=trace.set_span_in_context(span))
            upstream_body = dict(body, model=config.registry.served_name(model))
            started = time.perf_counter()
            try:
                request = self.http.build_request("POST", upstream.base_url.rstrip("/") + path, headers=headers,
                                                  content=json.dumps(upstream_body).encode(),
                                                  timeout=httpx.Timeout(timeout_s, connect=2.0))
                response = await self.http.send(request, stream=True)
            except httpx.TimeoutException:
                last_error = GatewayError(errors.upstream_error(504, f"{model} timed out"), "504")
                self._close_attempt(span, upstream, False, model, error_type="timeout")
                continue
            except httpx.TransportError as error:
                last_error = GatewayError(errors.upstream_error(502, f"{model} unreachable"), "502")
                self._close_attempt(span, upstream, False, model, error_type=type(error).__name__)
                continue
            span.set_attribute(sc.HTTP_STATUS_CODE, response.status_code)
            if response.status_code in RETRYABLE_STATUSES:
                await response.aclose()
                last_error = GatewayError(errors.upstream_error(502, f"{model} answered {response.status_code}"),
                                          "502")
                self._close_attempt(span, upstream, False, model, error_type=str(response.status_code))
                continue
            if response.status_code >= 400:
                content = await response.aread()
                await response.aclose()
                self._close_attempt(span, upstream, True, model, error_type=str(response.status_code))
                raise GatewayError(errors.ErrorResponse(response.status_code, _error_body(content), {}),
                                   str(response.status_code))
            return upstream, response, span, model, started
        assert last_error is not None
        raise last_error

    async def _relay(self, response: httpx.Response, upstream: Upstream, span: Span, root: Span, ctx: Any,
                     key_id: str, estimate: int, model: str, started: float) -> AsyncIterator[bytes]:
        """Pass SSE chunks through as they come, noting the first chunk's time, the usage chunk
        and finish reasons; close the spans when the stream ends (or the client goes away)."""
        usage: dict[str, Any] = {}
        finish: list[str] = []
        first = True
        ok = False
        buffer = b""
        try:
            async for chunk in response.aiter_raw():
                if first:
                    span.set_attribute(sc.TIME_TO_FIRST_CHUNK, time.perf_counter() - started)
                    first = False
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    _note_event(line, usage, finish)
                yield chunk
            ok = True
        finally:
            await response.aclose()
            self._close_attempt(span, upstream, ok, model, usage, finish)
            self._postprocess(root, ctx, key_id, estimate, model, usage, finish, 200 if ok else 499)

    # ------------------------------------------------------------------ spans
    def _stage(self, name: str, ctx: Any) -> Any:
        return self.tracer.start_as_current_span(name, context=ctx, kind=SpanKind.INTERNAL,
                                                 attributes={sc.STAGE: name})

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

    def _postprocess(self, root: Span, ctx: Any, key_id: str, estimate: int, model: str, usage: dict[str, Any],
                     finish: list[str], status: int) -> None:
        with self._stage("postprocess", ctx):
            actual = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            self.limiter.settle(key_id, estimate, actual if usage else estimate)
        root.set_attributes({sc.HTTP_STATUS_CODE: status, sc.RESPONSE_MODEL: model})
        if usage:
            root.set_attributes({sc.USAGE_INPUT_TOKENS: int(usage.get("prompt_tokens") or 0),
                                 sc.USAGE_OUTPUT_TOKENS: int(usage.get("completion_tokens") or 0)})
        if finish:
            root.set_attribute(sc.RESPONSE_FINISH_REASONS, finish)
        root.end()

    def _finish_error(self, root: Span, error: GatewayError) -> Response:
        status = error.response.status
        root.set_attributes({sc.HTTP_STATUS_CODE: status, sc.ERROR_TYPE: error.error_type})
        if status >= 500:
            root.set_status(Status(StatusCode.ERROR, str(error)))
        root.end()
        return _error_response(error.response)

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


def _note_event(line: bytes, usage: dict[str, Any], finish: list[str]) -> None:
    if not line.startswith(b"data:"):
        return
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return
    try:
        event = json.loads(data)
    except ValueError:
        return
    if isinstance(event, dict):
        if event.get("usage"):
            usage.update(event["usage"])
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finish.append(choice["finish_reason"])


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
