"""STUB OpenAI-compatible upstream: a test and bench stand-in for a vLLM replica. NOT a model server.

Why it exists: a real vLLM replica takes minutes and a GPU to start and cannot be told to fail on
demand, so gateway, pool and health-check tests (and the gateway's overhead benches) talk to this
instead. It speaks the parts of vLLM's OpenAI server the gateway touches, in the same shapes:

* `GET /health` (200, or `health_status` from the behaviour), `GET /v1/models`;
* `POST /v1/chat/completions` and `POST /v1/completions`, plain or streamed as server-sent events
  (`data: {...}\\n\\n` chunks, a final chunk carrying `finish_reason`, then `data: [DONE]`); with
  `stream_options.include_usage` every chunk has `"usage": null` and one extra chunk with empty
  `choices` carries the usage, as OpenAI and vLLM do;
* `POST /tokenize` like vLLM's (`{"tokens": [...], "count": n, "max_model_len": m}`), `POST /detokenize`
  (`{"tokens": [...]}` → `{"prompt": "..."}`: words this stub has tokenized, `<id>` for others) and
  `GET /tokenizer_info` (a small tokenizer_config; 404 with `tokenizer_info=False`, like a vLLM started
  without `--enable-tokenizer-info-endpoint`).

Output is deterministic: the completion repeats the prompt's whitespace-separated words in order
(cycling), `completion_tokens` of them. Token counts are therefore *whitespace* counts, not a real
tokenizer's, and chat messages are joined with "\\n" without a chat template:

* `prompt_tokens` = number of whitespace-separated words in the prompt (chat: every message's text);
* `completion_tokens` = min(request `max_completion_tokens`/`max_tokens`, `StubConfig.completion_tokens`);
  `finish_reason` is "length" when the request's limit cut the answer, else "stop".

Test knobs, per instance: fixed added latency, stream pacing (tokens/s), a random share of failures,
and at run time `POST /admin/behaviour` with JSON such as `{"status": 503, "count": 3}` (the next
3 completion requests fail with 503), `{"hang_s": 5}` (completion requests wait 5 s before answering),
`{"health_status": 503}`, `{"abort_after_tokens": 2}` (streams end after 2 tokens without a final
chunk or [DONE]) or `{"reset": true}`. `GET /admin/requests` returns the method, path and headers
of the last `record_requests` API requests (e.g. to check `traceparent` propagation);
`DELETE /admin/requests` forgets them. /health and /admin/* are not recorded.

It binds loopback by default: it has no authentication and its admin endpoints change behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fleetlens.net import free_port, is_loopback

log = logging.getLogger(__name__)

VOCAB_SIZE = 32_000  # token ids from /tokenize are crc32(word) % VOCAB_SIZE: stable, not meaningful
# Words seen by /tokenize in this process, for /detokenize: shared by every stub instance, as replicas
# of one model share a tokenizer (a request may tokenize on one replica and detokenize on another).
_SEEN_WORDS: dict[int, str] = {}
_MAX_SEEN_WORDS = 100_000


@dataclass(frozen=True)
class StubConfig:
    """Start-up behaviour of one stub replica; `Behaviour` (mutable at run time) starts from it."""

    model: str = "stub-model"
    latency_ms: float = 0.0
    tokens_per_s: float | None = None  # stream pacing; None = as fast as possible
    fail_rate: float = 0.0  # share of API requests answered with `fail_status`
    fail_status: int = 500
    completion_tokens: int = 16  # answer length when the request sets no smaller max_tokens
    max_model_len: int = 4096
    record_requests: int = 100  # how many API requests' headers /admin/requests keeps
    seed: int = 0  # of the fail_rate draws, so a failing test replays
    tokenizer_info: bool = True  # serve GET /tokenizer_info (vLLM: --enable-tokenizer-info-endpoint)


@dataclass
class Behaviour:
    """What the stub does now; `POST /admin/behaviour` updates any subset of these fields.

    Only the two completion endpoints misbehave. `status` with `count` fails the next `count`
    of them (then `status` clears); `status` without `count` fails every one until reset. `hang_s` likewise, sharing `count` when
    both are given in one update.
    """

    latency_ms: float = 0.0
    tokens_per_s: float | None = None
    fail_rate: float = 0.0
    fail_status: int = 500
    status: int | None = None
    hang_s: float = 0.0
    count: int | None = None
    health_status: int = 200
    abort_after_tokens: int | None = None

    @classmethod
    def from_config(cls, config: StubConfig) -> Behaviour:
        return cls(
            latency_ms=config.latency_ms, tokens_per_s=config.tokens_per_s,
            fail_rate=config.fail_rate, fail_status=config.fail_status,
        )


_BEHAVIOUR_FIELDS = {f.name for f in fields(Behaviour)}
_INT_FIELDS = {"fail_status", "status", "count", "health_status", "abort_after_tokens"}
_NULLABLE = {"tokens_per_s", "status", "count", "abort_after_tokens"}


def _valid_value(key: str, value: Any) -> bool:
    """A runtime update must keep the types `misbehave()` relies on (a typo'd "503" must not stick)."""
    if value is None:
        return key in _NULLABLE
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if key in _INT_FIELDS else isinstance(value, (int, float))


@dataclass
class StubState:
    """Mutable state of one app instance (behaviour, recorded requests, counters)."""

    config: StubConfig
    behaviour: Behaviour
    recorded: deque[dict[str, Any]]
    rng: random.Random
    requests_total: int = 0
    ids: int = 0
    in_flight: int = 0  # completions being answered (streams until their last chunk)

    def next_id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}-stub{self.ids:08x}"


# --------------------------------------------------------------------------- helpers


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(status: int, message: str, kind: str) -> Response:
    """vLLM's error shape (`{"error": {...}}`, OpenAI-compatible)."""
    return _json({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def _chat_text(messages: Any) -> str:
    parts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


def _prompt_text(body: dict[str, Any]) -> str | None:
    """The /v1/completions prompt: a string or a one-element list of strings (no batching here)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


def completion_words(prompt: str, limit: int) -> list[str]:
    """The deterministic answer: the prompt's words, cycled, `limit` of them ("ok" for no words)."""
    words = prompt.split() or ["ok"]
    return [words[i % len(words)] for i in range(limit)]


def _limit(body: dict[str, Any], config: StubConfig) -> tuple[int, bool]:
    """(completion tokens, whether the request's max_tokens was what stopped it)."""
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(requested, int) and not isinstance(requested, bool) and requested >= 0:
        if requested <= config.completion_tokens:
            return requested, True
    return config.completion_tokens, False


# --------------------------------------------------------------------------- app


def make_app(config: StubConfig | None = None) -> Starlette:
    """A fresh stub app; its `StubState` is at `app.state.stub` (tests may poke it directly)."""
    config = config or StubConfig()
    state = StubState(
        config=config,
        behaviour=Behaviour.from_config(config),
        recorded=deque(maxlen=max(1, config.record_requests)),
        rng=random.Random(config.seed),
    )

    def record(request: Request) -> None:
        state.requests_total += 1
        state.recorded.append({
            "method": request.method,
            "path": request.url.path,
            "headers": dict(request.headers),
            "time": time.time(),
        })

    async def misbehave() -> Response | None:
        """Apply latency, hang and failure behaviour; an error Response when this request fails."""
        b = state.behaviour
        status, hang = b.status, b.hang_s
        if b.count is not None and (status is not None or hang):
            b.count -= 1
            if b.count <= 0:
                b.status, b.hang_s, b.count = None, 0.0, None
        delay = b.latency_ms / 1000.0 + hang
        if delay > 0:
            await asyncio.sleep(delay)
        if status is None and b.fail_rate > 0 and state.rng.random() < b.fail_rate:
            status = b.fail_status
        if status is not None and status >= 400:
            return _error(status, f"stub upstream: injected failure ({status})", "StubInjectedError")
        return None

    async def read_body(request: Request) -> dict[str, Any] | Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            return _error(400, f"invalid JSON body: {error}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "BadRequestError")
        model = body.get("model")
        if model is not None and model != config.model:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body

    async def health(request: Request) -> Response:
        return Response(status_code=state.behaviour.health_status)

    async def models(request: Request) -> Response:
        record(request)
        return _json({"object": "list", "data": [{
            "id": config.model, "object": "model", "created": 0, "owned_by": "fleetlens-stub",
            "root": config.model, "parent": None, "max_model_len": config.max_model_len,
        }]})

    async def tokenize(request: Request) -> Response:
        record(request)
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        text = _chat_text(body["messages"]) if "messages" in body else _prompt_text(body)
        if text is None:
            return _error(400, "give `prompt` (a string) or `messages`", "BadRequestError")
        tokens = [zlib.crc32(word.encode()) % VOCAB_SIZE for word in text.split()]
        if len(_SEEN_WORDS) < _MAX_SEEN_WORDS:
            _SEEN_WORDS.update(zip(tokens, text.split()))
        return _json({"tokens": tokens, "count": len(tokens), "max_model_len": config.max_model_len})

    async def detokenize(request: Request) -> Response:
        record(request)
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return _error(400, "`tokens` must be a list of integers", "BadRequestError")
        return _json({"prompt": " ".join(_SEEN_WORDS.get(t, f"<{t}>") for t in tokens)})

    async def tokenizer_info(request: Request) -> Response:
        record(request)
        if not config.tokenizer_info:
            return _json({"detail": "Not Found"}, 404)  # FastAPI's answer for a route that is not there
        return _json({
            "tokenizer_class": "StubWhitespaceTokenizer", "model_max_length": config.max_model_len,
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": None,
            "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
        })

    async def generate(request: Request, chat: bool) -> Response:
        state.in_flight += 1
        response: Response | None = None
        try:
            response = await _generate(request, chat)
            return response
        finally:
            if isinstance(response, StreamingResponse):
                response.body_iterator = _counted(state, response.body_iterator)
            else:
                state.in_flight -= 1

    async def _generate(request: Request, chat: bool) -> Response:
        record(request)
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        if chat:
            if not isinstance(body.get("messages"), list):
                return _error(400, "`messages` must be a list", "BadRequestError")
            prompt = _chat_text(body["messages"])
        else:
            found = _prompt_text(body)
            if found is None:
                return _error(400, "`prompt` must be a string", "BadRequestError")
            prompt = found
        failure = await misbehave()
        if failure is not None:
            return failure
        limit, cut = _limit(body, config)
        words = completion_words(prompt, limit)
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(words),
            "total_tokens": len(prompt.split()) + len(words),
        }
        finish = "length" if cut else "stop"
        model = config.model
        created = int(time.time())
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            chunks = _stream(state, chat, model, created, words, finish, usage, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text = " ".join(words)
        if chat:
            return _json({
                "id": state.next_id("chatcmpl"), "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish,
                }],
                "usage": usage,
            })
        return _json({
            "id": state.next_id("cmpl"), "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        })

    async def metrics(request: Request) -> Response:
        """The two vLLM gauges a launcher drains on (vLLM's names, so the same code reads both)."""
        label = f'{{model_name="{config.model}"}}'
        text = (f"vllm:num_requests_running{label} {float(state.in_flight)}\n"
                f"vllm:num_requests_waiting{label} 0.0\n")
        return Response(text, media_type="text/plain; version=0.0.4")

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def set_behaviour(request: Request) -> Response:
        try:
            update = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            return _error(400, f"invalid JSON body: {error}", "BadRequestError")
        if not isinstance(update, dict):
            return _error(400, "the body must be a JSON object", "BadRequestError")
        if update.pop("reset", False):
            state.behaviour = Behaviour.from_config(config)
        unknown = sorted(set(update) - set(_BEHAVIOUR_FIELDS))
        if unknown:
            return _error(400, f"unknown behaviour fields {unknown}", "BadRequestError")
        bad = sorted(k for k, v in update.items() if not _valid_value(k, v))
        if bad:
            return _error(400, f"behaviour fields {bad} need numbers (status/count: integers)", "BadRequestError")
        for key, value in update.items():
            setattr(state.behaviour, key, value)
        return _json(vars(state.behaviour))

    async def get_behaviour(request: Request) -> Response:
        return _json(vars(state.behaviour))

    async def get_requests(request: Request) -> Response:
        return _json({"requests": list(state.recorded), "total": state.requests_total})

    async def clear_requests(request: Request) -> Response:
        state.recorded.clear()
        return Response(status_code=204)

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
        Route("/admin/behaviour", set_behaviour, methods=["POST"]),
        Route("/admin/behaviour", get_behaviour, methods=["GET"]),
        Route("/admin/requests", get_requests, methods=["GET"]),
        Route("/admin/requests", clear_requests, methods=["DELETE"]),
    ])
    app.state.stub = state
    return app


async def _counted(state: StubState, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream that counts as in flight until its last chunk is sent (or it is cut)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        state.in_flight -= 1


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _stream(
    state: StubState, chat: bool, model: str, created: int, words: list[str], finish: str,
    usage: dict[str, int], include_usage: bool,
) -> AsyncIterator[bytes]:
    """SSE chunks: (chat: a role chunk,) one chunk per word, a finish chunk, usage chunk, [DONE]."""
    chunk_id = state.next_id("chatcmpl" if chat else "cmpl")
    kind = "chat.completion.chunk" if chat else "text_completion"
    base: dict[str, Any] = {"id": chunk_id, "object": kind, "created": created, "model": model}
    if include_usage:
        base["usage"] = None

    def choice(text: str, finish_reason: str | None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    behaviour = state.behaviour
    pause = 1.0 / behaviour.tokens_per_s if behaviour.tokens_per_s else 0.0
    abort_after = behaviour.abort_after_tokens
    if chat:
        first = choice("", None)
        first["delta"] = {"role": "assistant", "content": ""}
        yield _sse({**base, "choices": [first]})
    for index, word in enumerate(words):
        if abort_after is not None and index >= abort_after:
            return  # a replica that died mid-answer: no finish chunk, no [DONE]
        if pause:
            await asyncio.sleep(pause)
        yield _sse({**base, "choices": [choice(word if index == 0 else " " + word, None)]})
    yield _sse({**base, "choices": [choice("", finish)]})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- running it


def _uvicorn_config(config: StubConfig, host: str, port: int, shutdown_grace_s: float | None = None) -> uvicorn.Config:
    if not is_loopback(host):
        log.warning("stub upstream bound to non-loopback %s: anyone who can reach it can change it", host)
    return uvicorn.Config(
        make_app(config), host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=shutdown_grace_s,
    )


def serve(config: StubConfig, host: str = "127.0.0.1", port: int = 8000, shutdown_grace_s: float | None = None) -> None:
    """Run the stub in the foreground until interrupted (what `python -m ...stub_upstream` does).
    `shutdown_grace_s`: on SIGTERM, cut the answers still open after this long (vLLM does not finish
    open streams when it shuts down); None waits for them."""
    uvicorn.Server(_uvicorn_config(config, host, port, shutdown_grace_s)).run()


class StubServer:
    """A stub on a uvicorn thread in this process: `with StubServer(cfg, port) as stub: stub.url`.

    `stop()` closes the listening socket (a replica going away); a new `StubServer` on the same
    port brings it back. In-process keeps tests fast: no interpreter start per replica.
    """

    def __init__(self, config: StubConfig | None = None, port: int = 0, host: str = "127.0.0.1") -> None:
        self.config = config or StubConfig()
        self.host = host
        self.port = port or free_port(host)
        self._server = uvicorn.Server(_uvicorn_config(self.config, host, self.port))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> StubState:
        return self._server.config.app.state.stub

    def start(self, timeout_s: float = 10.0) -> StubServer:
        self._thread = threading.Thread(target=self._run, name=f"stub-upstream-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"stub upstream did not start on {self.url}")
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        # Our own loop in our own thread; uvicorn must not touch signal handlers off the main thread.
        asyncio.run(self._server.serve(sockets=None))

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlens.serving.stub_upstream",
        description="STUB OpenAI-compatible upstream for tests and benches (a vLLM stand-in, no model).",
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="default loopback: the stub has no auth")
    parser.add_argument("--model", default="stub-model", help="served model name")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every API request")
    parser.add_argument("--tokens-per-s", type=float, default=None, help="stream pacing")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of API requests that fail")
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    # Stand-in for vLLM under `fleetlens serve replica` (replica.engine_command): take vLLM's flags.
    parser.add_argument("--served-model-name", default=None, help="served model name (overrides --model)")
    parser.add_argument("--startup-delay-s", type=float, default=0.0, help="sleep before listening (a load time)")
    parser.add_argument("--shutdown-grace-s", type=float, default=None,
                        help="on SIGTERM, cut open answers after this long, as vLLM does (default: let them finish)")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        logging.getLogger(__name__).info("ignoring vLLM arguments %s", ignored)
    time.sleep(args.startup_delay_s)
    config = StubConfig(
        model=args.served_model_name or args.model, latency_ms=args.latency_ms, tokens_per_s=args.tokens_per_s,
        fail_rate=args.fail_rate, fail_status=args.fail_status,
        completion_tokens=args.completion_tokens, seed=args.seed,
    )
    logging.basicConfig(level=logging.WARNING)
    serve(config, args.host, args.port, args.shutdown_grace_s)


if __name__ == "__main__":
    main()


__all__ = ["Behaviour", "StubConfig", "StubServer", "StubState", "completion_words", "make_app", "serve"]
