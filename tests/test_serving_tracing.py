"""The gateway's span export (`LoopSpanProcessor`): spans encoded on the event loop a slice at a time
as they end, and a batch of them sent as one OTLP/HTTP request; a collector that asks to retry or is down gets them again later; one
that refuses for good, a full queue or a shutdown costs spans, counted, never requests. The wire format is checked by parsing what a real HTTP server received; the gateway
process with its collector down is checked end to end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import TracerProvider

from conftest import gateway_process, run_async, stub_models_yaml, wait_for
from fleetlens.net import free_port
from fleetlens.serving.keys import generate_key
from fleetlens.serving.stub_upstream import StubConfig, StubServer
from fleetlens.serving.tracing import loop_tracer_provider


class Receiver:
    """An HTTP server on loopback that keeps every body POSTed to /v1/traces."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[bytes] = []
        self.status = status
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.bodies.append(await request.read())
        return web.Response(status=self.status)

    def spans(self) -> list[tuple[str, str]]:
        """(service.name, span name) of every span received, in order."""
        out = []
        for body in self.bodies:
            message = ExportTraceServiceRequest.FromString(body)
            for resource_spans in message.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                out += [(service, span.name) for scope in resource_spans.scope_spans for span in scope.spans]
        return out


@contextlib.asynccontextmanager
async def receiving(status: int = 200) -> AsyncIterator[Receiver]:
    receiver = Receiver(status)
    app = web.Application()
    async def handle(request: web.Request) -> web.Response:
        return await receiver.handle(request)  # looked up per request: a test may swap the handler

    app.router.add_post("/v1/traces", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def end_spans(provider: TracerProvider, count: int) -> None:
    """`count` spans: a root and count - 1 children named stage-0, stage-1, ..."""
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("root"):
        for index in range(count - 1):
            with tracer.start_as_current_span(f"stage-{index}"):
                pass


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@run_async
async def test_spans_are_encoded_a_slice_at_a_time_as_they_end_and_a_batch_goes_out_as_one_request() -> None:
    async with receiving() as receiver:
        provider, processor = loop_tracer_provider(receiver.url, service_name="fleetlens-gateway")
        assert processor.slice_spans == 8
        await processor.start()
        end_spans(provider, 20)  # two whole slices: encoded by callbacks, one after the other
        assert processor._encoded_spans == 0  # nothing encoded inside on_end, on the request's path
        await asyncio.sleep(0)
        assert processor._encoded_spans == 8  # one slice per callback: requests run between slices
        await asyncio.sleep(0)
        assert processor._encoded_spans == 16 and processor.queued == 20 and not receiver.bodies
        await processor.flush()  # the 4 left over are encoded then, and all 20 go out in one request
        assert len(receiver.bodies) == 1
        spans = receiver.spans()
        assert {service for service, _ in spans} == {"fleetlens-gateway"}
        assert [name for _, name in spans] == [f"stage-{i}" for i in range(19)] + ["root"]  # as they ended
        assert processor.stats.exported_spans == 20 and processor.stats.failed_spans == 0
        assert processor.queued == 0
        await processor.aclose()


@run_async
async def test_a_batch_over_the_body_limit_goes_out_in_several_requests() -> None:
    async with receiving() as receiver:
        provider, processor = loop_tracer_provider(receiver.url)
        processor.max_body_bytes = 1  # every slice is over it: one request each
        await processor.start()
        end_spans(provider, 40)
        await processor.flush()
        assert [len(ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans)
                for body in receiver.bodies] == [8, 8, 8, 8, 8]
        assert len(receiver.spans()) == 40 and processor.stats.exported_spans == 40
        await processor.aclose()


@run_async
async def test_the_export_task_sends_on_its_own_and_aclose_sends_the_rest() -> None:
    async with receiving() as receiver:
        provider, processor = loop_tracer_provider(receiver.url)
        processor.delay_s = 0.05
        await processor.start()
        end_spans(provider, 5)
        await until(lambda: processor.stats.exported_spans == 5)
        processor.delay_s = 3600  # the timer already waits again, now for an hour: aclose must send the rest
        await asyncio.sleep(0.1)
        end_spans(provider, 3)
        await processor.aclose()
        assert len(receiver.spans()) == 8 and processor.stats.exported_spans == 8


@run_async
async def test_a_collector_that_is_down_keeps_the_spans_queued_and_aclose_counts_them_lost() -> None:
    provider, processor = loop_tracer_provider(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    await processor.start()
    end_spans(provider, 7)
    await processor.flush()
    assert processor.stats.retried_spans == 7 and processor.stats.failed_spans == 0
    assert processor.queued == 7  # waiting for the next try, in order
    await processor.flush()  # backing off: no new attempt yet
    assert processor.stats.retried_spans == 7
    await processor.aclose()  # one last try, then they are lost, counted
    assert processor.stats.failed_spans == 7 and processor.stats.exported_spans == 0


@run_async
async def test_a_collector_that_refuses_for_good_costs_spans_counted() -> None:
    async with receiving(status=400) as receiver:
        provider, processor = loop_tracer_provider(receiver.url)
        await processor.start()
        end_spans(provider, 4)
        await processor.flush()
        assert len(receiver.bodies) == 1
        assert processor.stats.failed_spans == 4 and processor.stats.exported_spans == 0
        assert processor.stats.retried_spans == 0
        await processor.aclose()


@run_async
async def test_an_overloaded_collector_gets_the_spans_again_after_its_retry_after() -> None:
    """503 + Retry-After (the collector's answer when busy or its spool is full), twice, then 200:
    every span arrives once, in order, none counted lost, and the export waited as told."""
    async with receiving() as receiver:
        answers = [503, 503]
        handle = receiver.handle

        async def overloaded(request: web.Request) -> web.Response:
            if answers:
                await request.read()
                return web.Response(status=answers.pop(0), headers={"Retry-After": "0.2"})
            return await handle(request)

        receiver.handle = overloaded  # type: ignore[method-assign]
        provider, processor = loop_tracer_provider(receiver.url)
        processor.delay_s = 0.05
        await processor.start()
        started = asyncio.get_running_loop().time()
        end_spans(provider, 10)
        await until(lambda: processor.stats.exported_spans == 10)
        assert asyncio.get_running_loop().time() - started >= 0.4  # two waits of the Retry-After
        assert [name for _, name in receiver.spans()] == [f"stage-{i}" for i in range(9)] + ["root"]
        assert processor.stats.retried_spans == 20 and processor.stats.failed_spans == 0
        end_spans(provider, 2)  # after a success, no waiting
        await processor.flush()
        assert processor.stats.exported_spans == 12
        await processor.aclose()


@run_async
async def test_past_the_queue_limit_spans_are_dropped_and_counted() -> None:
    async with receiving() as receiver:
        provider, processor = loop_tracer_provider(receiver.url)
        processor.max_queue = 5
        end_spans(provider, 8)  # before start(): they wait in the queue, up to its limit
        assert processor.stats.dropped_spans == 3
        await processor.start()
        await processor.aclose()
        assert processor.stats.exported_spans == 5 and len(receiver.spans()) == 5


def test_the_gateway_answers_with_its_collector_down_and_keeps_its_spans_for_a_retry(tmp_path: Path) -> None:
    upstream = StubServer(StubConfig(model="small-served")).start()
    (tmp_path / "models.yaml").write_text(stub_models_yaml(small=[upstream.url]))
    (tmp_path / "routes.yaml").write_text("default: chat\nfeatures:\n  chat:\n    model: small\n")
    key, digest = generate_key()
    (tmp_path / "keys.yaml").write_text(f"- {{id: k1, customer: acme, hash: '{digest}', feature: chat}}\n")
    try:
        with gateway_process(tmp_path, f"http://127.0.0.1:{free_port()}") as base:
            headers = {"Authorization": f"Bearer {key}"}
            body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(3):
                response = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=10)
                assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")

            def counter(name: str) -> float:
                text = httpx.get(base + "/metrics", timeout=5).text
                line = next(line for line in text.splitlines() if line.startswith(f"fleetlens_gateway_{name}_total"))
                return float(line.split()[-1])

            wait_for(lambda: counter("spans_retried") >= 3 * 6, timeout_s=10)  # every span tried, kept for later
            assert counter("spans_exported") == 0 and counter("spans_dropped") == 0
    finally:
        upstream.stop()


def test_otel_sdk_disabled_turns_the_gateways_tracing_off(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    provider, processor = loop_tracer_provider(f"http://127.0.0.1:{free_port()}")
    end_spans(provider, 3)
    assert processor.queued == 0
    assert not provider.get_tracer("fleetlens.gateway").start_span("auth").is_recording()
