"""Gateway overhead: the latency `fleetlens gateway` adds over calling the same upstream directly,
side by side with LiteLLM's proxy in front of the same upstream.

    .venv/bin/python bench/gateway_overhead.py [--concurrency 50] [--seconds 3] [--rounds 16] [--max-steal 0.01]
        [--completion-tokens 16] [--tokens-per-s 50] [--spans-to collector|discard]
        [--max-concurrency 64] [--max-seconds 8] [--arrivals staggered|lockstep]
        [--litellm/--no-litellm] [--profile] [--json results.json] [--samples requests.csv]

What runs (every child in its own process group on loopback ports, always stopped):
- two stub upstreams (`python -m fleetlens.serving.stub_upstream`, zero added delay), each in its own
  process, answering streams of `--completion-tokens` content chunks + a finish chunk + a usage
  chunk + [DONE]: one paced at `--tokens-per-s` per stream (as a replica decodes; the latency
  phases), one as fast as it can (paired latency and max requests/s);
- `fleetlens gateway --workers N` (`--workers`, default 2: one process per core of this machine;
  `--workers 1` for one event loop) with tracing ON: every span is made, encoded and POSTed over
  OTLP/HTTP, by default to a sink on loopback that answers 200 and keeps nothing — the gateway's
  whole tracing cost, with the collector elsewhere as in production, and as LiteLLM runs here
  (no database, logging off). `--spans-to collector`: to a real `fleetlens collector` writing them
  to an embedded warehouse (`fleetlens warehouse serve`) on the same 2 cores, as `fleetlens up`
  runs them on one box: their CPU and disk bursts (spool fsyncs, inserts) are then part of what the
  client sees;
- LiteLLM's proxy (`litellm[proxy]==1.106.2` in a throwaway venv, `--litellm-venv`, created when
  missing): the two stub models, no database, logging off, as many workers (`--num_workers`).

The load client is this process: raw asyncio (uvloop) over HTTP/1.1 keep-alive sockets, one per
concurrent stream, requests pre-serialized, chunked responses decoded by hand (~30 µs of client CPU
per request, where httpx costs ~10x that), so on 2 cores it does not become the bottleneck; its
CPU share is printed, and so are the times its loop woke 5 ms or more late — stalls of the machine,
which hit whichever target is being measured. Each stream is closed-loop: send, read to the last
chunk, send the next. The streams enter spread over one stream's length and each stream's first
request is not measured (`--arrivals staggered`, steady state); `lockstep` starts all of them at
once, and paced streams then stay in step, so every 16 x 20 ms all 50 end and 50 new requests
arrive in the same millisecond: a burst test, reported as such.

Measured:
1. latency at each `--concurrency` (default 50 concurrent streams, each decoding at 50 tokens/s):
   `--rounds` rounds of direct → gateway → LiteLLM phases of `--seconds` each (short and interleaved,
   so drift of the machine hits all targets alike); p50/p99 of request latency (send → last chunk)
   and TTFB, added latency = target percentile − direct percentile over all kept rounds, and each
   round's added p99 (its spread is the noise of this machine); CPU ms per request of the server
   process. A round in which the hypervisor took more than `--max-steal` of the machine's CPU time
   (steal in /proc/stat) is discarded and run again, after waiting for a quiet second: on this VM
   steal comes in bursts of 10-35 % of the CPU for seconds at a time, which add 40-70 ms to every
   request in flight, direct or proxied — a round with a burst measures the burst, not the proxy.
   What the discarded rounds measured is printed too;
2. paired added latency at concurrency 1 (unpaced upstream): one stream alternating direct and
   proxied requests (one proxy at a time), the per-request difference proxied − the direct request
   just before it;
3. max requests/s (unpaced upstream): closed loop at `--max-concurrency` for `--max-seconds` per
   target, where latency is all queueing (≈ streams x CPU per request).

CPU ms per request (and max req/s) are the stable numbers; tail latencies move with whatever else
the machine runs. Bar: p99 added latency <= 5 ms at 50 concurrent streams; goal: below LiteLLM's.

--profile runs `py-spy record` on the gateway during its first phase at each concurrency and prints
the top functions by self and total time, and self time by package (summary saved in bench/profiles/,
raw stacks in the temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fleetlens.net import free_port, wait_http  # noqa: E402
from fleetlens.serving.loadgen_report import percentile  # noqa: E402

LITELLM_VERSION = "1.106.2"
BAR_ADDED_P99_MS = 5.0
MODEL = "stub-model"        # the paced upstream: 50 concurrent streams decoding at --tokens-per-s
FAST_MODEL = "stub-fast"    # the unpaced one: single-stream added latency and max requests/s
STALL_S = 0.005             # a client-loop lag at least this long is counted as a machine stall
LITELLM_KEY = "sk-fleetlens-bench-" + os.urandom(8).hex()  # its master key (no DB: the only key)
console = Console(width=170)


# ======================================================================= child processes
@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**clean_env(), **self.env}, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU of the child and its descendants (0 for the ones gone)."""
        if not self.alive:
            return 0.0
        total = 0.0
        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total


def clean_env() -> dict[str, str]:
    """This environment less FLEETLENS_* settings (each child gets exactly the ones it is given)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETLENS_")}


class Stack:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        self.children.append(child.start())
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def fleetlens(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetlens", *args]


def start_upstream(stack: Stack, args: argparse.Namespace, model: str, tokens_per_s: float) -> tuple[str, Child]:
    """A stub upstream serving `model`, paced at `tokens_per_s` (0: as fast as it can)."""
    port = free_port()
    argv = [sys.executable, "-m", "fleetlens.serving.stub_upstream", "--port", str(port), "--model", model,
            "--completion-tokens", str(args.completion_tokens)]
    if tokens_per_s:
        argv += ["--tokens-per-s", str(tokens_per_s)]
    child = stack.add(Child(f"upstream {model}", argv, stack.work / f"upstream-{model}.log"))
    url = f"http://127.0.0.1:{port}"
    if not wait_http(url + "/health", 30, alive=lambda: child.alive):
        raise RuntimeError(f"stub upstream did not start: {child.tail()}")
    return url, child


# A span sink for `--spans-to discard`: answers every OTLP/HTTP POST 200 and keeps nothing. It separates
# what the gateway's own tracing costs from the CPU a collector + warehouse on the same two cores take.
SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def start_span_sink(stack: Stack) -> tuple[str, list[Child]]:
    port = free_port()
    sink = stack.add(Child("span sink", [sys.executable, "-c", SINK, str(port)], stack.work / "sink.log"))
    if not wait_http(f"http://127.0.0.1:{port}/health", 30, alive=lambda: sink.alive):
        raise RuntimeError(f"span sink did not start: {sink.tail()}")
    return f"http://127.0.0.1:{port}", [sink]


def start_span_collector(stack: Stack) -> tuple[str, list[Child]]:
    """Warehouse + schema + collector; returns the collector's OTLP/HTTP base URL and the two children."""
    import clickhouse_connect

    from fleetlens.schema import RenderOptions, migrate

    work = stack.work
    wh_port = free_port()
    warehouse = stack.add(Child("warehouse", fleetlens("warehouse", "serve", "--path", str(work / "warehouse"),
                                                        "--port", str(wh_port), "--log-level", "warning"),
                                work / "warehouse.log"))
    if not wait_http(f"http://127.0.0.1:{wh_port}/ping", 90, alive=lambda: warehouse.alive):
        raise RuntimeError(f"warehouse did not start: {warehouse.tail()}")
    migrate(clickhouse_connect.get_client(host="127.0.0.1", port=wh_port), RenderOptions(database="bench"))
    grpc_port, http_port = free_port(), free_port()
    env = {"FLEETLENS_WAREHOUSE_URL": f"http://default@127.0.0.1:{wh_port}/bench",
           "FLEETLENS_DATA_DIR": str(work / "collector")}
    collector = stack.add(Child("collector", fleetlens("collector", "--otlp-grpc-port", str(grpc_port),
                                                        "--otlp-http-port", str(http_port), "--log-level", "warning"),
                                work / "collector.log", env))
    if not wait_http(f"http://127.0.0.1:{http_port}/health", 60, alive=lambda: collector.alive):
        raise RuntimeError(f"collector did not start: {collector.tail()}")
    return f"http://127.0.0.1:{http_port}", [collector, warehouse]


def start_gateway(stack: Stack, upstreams: dict[str, str], tracing: bool = True,
                  spans_to: str = "collector", workers: int = 1) -> tuple[str, str, Child, list[Child]]:
    """The span receiver (collector + warehouse, or a discarding sink) and the gateway tracing to it,
    with one model and one feature of the same name per upstream ({served model name: URL});
    returns URL, key, gateway, the receiver's children."""
    from fleetlens.serving.keys import generate_key

    work = stack.work
    spans_url, receivers = start_span_sink(stack) if spans_to == "discard" else start_span_collector(stack)
    (work / "models.yaml").write_text("models:\n" + "".join(
        f"  {name}:\n    path: /models/{name}\n    served_name: {name}\n    variant: bf16\n"
        f"    gpu: {{type: cpu, count: 1}}\n    replicas: 0\n    replica_urls: [{url}]\n"
        for name, url in upstreams.items()))
    (work / "routes.yaml").write_text(f"default: {MODEL}\nfeatures:\n" + "".join(
        f"  {name}:\n    model: {name}\n    max_attempts: 1\n" for name in upstreams))
    key, digest = generate_key()
    (work / "keys.yaml").write_text(f"- {{id: bench, customer: bench, hash: '{digest}', feature: {MODEL}}}\n")
    port = free_port()
    env = {"FLEETLENS_GATEWAY__OTLP_ENDPOINT": spans_url, "FLEETLENS_DATA_DIR": str(work / "gateway")}
    if not tracing:  # diagnosis only: the SDK hands out no-op tracers, nothing is exported
        env["OTEL_SDK_DISABLED"] = "true"
    gateway = Child("gateway", fleetlens("gateway", "--port", str(port), "--models", str(work / "models.yaml"),
                                         "--routes", str(work / "routes.yaml"), "--keys", str(work / "keys.yaml"),
                                         "--workers", str(workers), "--log-level", "warning"),
                    work / "gateway.log", env)
    stack.add(gateway)
    url = f"http://127.0.0.1:{port}"
    if not wait_http(url + "/health", 60, alive=lambda: gateway.alive):
        raise RuntimeError(f"gateway did not start: {gateway.tail()}")
    return url, key, gateway, receivers


def ensure_litellm(venv: Path) -> Path:
    """The `litellm` executable in `venv`, installing litellm[proxy] there when missing."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    console.print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once; a few minutes)...")
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
                          capture_output=True, text=True)
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"pip install litellm[proxy] failed: {done.stderr[-1500:]}")
    return exe


def start_litellm(stack: Stack, upstreams: dict[str, str], venv: Path, workers: int = 1) -> tuple[str, Child]:
    exe = ensure_litellm(venv)
    config = stack.work / "litellm.yaml"
    models = "".join(f"  - model_name: {name}\n    litellm_params:\n      model: openai/{name}\n"
                     f"      api_base: {url}/v1\n      api_key: sk-bench\n" for name, url in upstreams.items())
    config.write_text("model_list:\n" + models + textwrap.dedent("""\
        litellm_settings:
          telemetry: false
          set_verbose: false
          turn_off_message_logging: true
        general_settings: {}
        """))
    port = free_port()
    env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_MODE": "PRODUCTION",
           "DISABLE_ADMIN_UI": "True", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True"}
    child = stack.add(Child("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                        "--num_workers", str(workers)], stack.work / "litellm.log", env))
    url = f"http://127.0.0.1:{port}"
    if not wait_http(url + "/health/liveliness", 180, alive=lambda: child.alive, interval_s=0.5):
        raise RuntimeError(f"litellm proxy did not start: {child.tail()}")
    return url, child


# ======================================================================= the client
@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    body: dict
    server: Child | None = None  # whose CPU is charged per request
    extra: list[Child] = field(default_factory=list)  # and what else it makes work (span collector, warehouse)

    def request(self) -> bytes:
        host = self.url.removeprefix("http://")
        payload = json.dumps(self.body).encode()
        lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
                 f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


class Connection:
    """One keep-alive HTTP/1.1 connection; `call` sends a pre-built request and reads the whole answer."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.request = target.request()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> tuple[float, float, str]:
        """(latency s, time to the first body bytes s, outcome: "ok" for a 200 whose stream ended with
        [DONE], else what went wrong)."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(*self.target.address)
        reader, writer = self.reader, self.writer
        started = time.perf_counter()
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        first = 0.0
        tail = b""
        close = b"connection: close" in lower
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if not first:
                    first = time.perf_counter() - started
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                tail = (tail + data[:-2])[-64:]
        else:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in lower else 0
            tail = (await reader.readexactly(length))[-64:] if length else b""
            first = time.perf_counter() - started
        latency = time.perf_counter() - started
        if close:
            writer.close()
            self.writer = None
        outcome = "ok" if status == 200 and b"[DONE]" in tail else f"HTTP {status}" if status != 200 else "no [DONE]"
        return latency, first, outcome

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Phase:
    target: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: int = 0
    completed: int = 0  # every successful request, measured or not (req/s and CPU per request count these)
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    extra_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    rounds: list[list[float]] = field(default_factory=list)  # each round's latencies
    round_steal: list[float] = field(default_factory=list)  # each round's CPU seconds the hypervisor took
    stalls: list[float] = field(default_factory=list)  # lags of this (client) process's loop >= STALL_S
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (sent at, latency, TTFB) for --samples
    error_kinds: Counter[str] = field(default_factory=Counter)

    @property
    def steal_share(self) -> float:
        """Stolen CPU time as a share of all the machine's CPU time in this phase."""
        return machine_share(sum(self.round_steal), self.seconds)

    def absorb(self, other: Phase) -> None:
        """Add a round measured on its own (kept only if the machine ran undisturbed) to this phase."""
        for name in ("latencies", "ttfbs", "rounds", "round_steal", "stalls", "samples"):
            getattr(self, name).extend(getattr(other, name))
        self.error_kinds.update(other.error_kinds)
        for name in ("errors", "completed", "seconds", "server_cpu_s", "extra_cpu_s", "client_cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def machine_share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds as a share of all this machine's CPU time over `wall_s`."""
    return cpu_s / (wall_s * (os.cpu_count() or 1)) if wall_s else 0.0


def stolen_seconds() -> float:
    """Steal time of all CPUs since boot (/proc/stat): time a vCPU of this VM was ready to run and the
    hypervisor ran something else. A burst of it pauses every process here for tens of ms at a time,
    whoever is being measured — not a cost of any target (0 where the kernel does not report it)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def wait_until_quiet(max_share: float, within_s: float, window_s: float = 1.0) -> float:
    """Wait (at most `within_s`) for a `window_s` in which the hypervisor took no more than `max_share`
    of this machine's CPU time; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < within_s:
        before = stolen_seconds()
        await asyncio.sleep(window_s)
        if machine_share(stolen_seconds() - before, window_s) <= max_share:
            break
    return time.perf_counter() - started


async def watch_stalls(stalls: list[float], interval_s: float = 0.02) -> None:
    """Note every time this process's loop wakes STALL_S or more late. The client is light (a few %
    of a core), so a stall it sees is the machine's — the VM not running, or every core busy — and
    it hits whichever target is being measured: the numbers to read next to a bad round."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(interval_s)
        late = time.perf_counter() - started - interval_s
        if late >= STALL_S:
            stalls.append(late)


async def closed_loop(target: Target, concurrency: int, seconds: float, phase: Phase, stagger_s: float = 0.0) -> None:
    """`concurrency` streams, each sending its next request when the last one ended, for `seconds`.

    With `stagger_s` > 0 stream i enters at i/concurrency x stagger_s and its first request is not
    measured: steady-state concurrency, as a fleet sees it. Streams that all start together against
    a paced upstream stay in lockstep for the whole phase (every stream ends, and the next 50
    requests arrive, in the same millisecond), which measures a burst of `concurrency` simultaneous
    arrivals instead (`--arrivals lockstep`)."""
    connections = [Connection(target) for _ in range(concurrency)]
    stop_at = time.perf_counter() + stagger_s + seconds

    async def worker(index: int, conn: Connection) -> None:
        measured = not stagger_s
        if stagger_s:
            await asyncio.sleep(stagger_s * index / concurrency)
        while time.perf_counter() < stop_at:
            try:
                latency, first, outcome = await conn.call()
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
                phase.errors += 1
                phase.error_kinds[type(error).__name__] += 1
                conn.close()
                conn.writer = None
                await asyncio.sleep(0.01)
                continue
            if outcome != "ok":
                phase.errors += 1
                phase.error_kinds[outcome] += 1
                continue
            phase.completed += 1
            if measured:
                phase.latencies.append(latency)
                phase.ttfbs.append(first)
                phase.samples.append((time.time() - latency, latency, first))
            measured = True

    cpu0 = target.server.cpu_seconds() if target.server else 0.0
    extra0 = sum(c.cpu_seconds() for c in target.extra)
    own0, wall0, stolen0 = time.process_time(), time.perf_counter(), stolen_seconds()
    measured_before = len(phase.latencies)
    watcher = asyncio.create_task(watch_stalls(phase.stalls))
    try:
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
    finally:
        watcher.cancel()
    phase.rounds.append(phase.latencies[measured_before:])
    phase.seconds += time.perf_counter() - wall0
    phase.round_steal.append(stolen_seconds() - stolen0)
    phase.client_cpu_s += time.process_time() - own0
    phase.server_cpu_s += (target.server.cpu_seconds() if target.server else 0.0) - cpu0
    phase.extra_cpu_s += sum(c.cpu_seconds() for c in target.extra) - extra0
    for conn in connections:
        conn.close()


async def paired(direct: Target, other: Target, seconds: float) -> list[float]:
    """One stream alternating a direct request and one through `other`: their differences."""
    first, second = Connection(direct), Connection(other)
    diffs: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        (d, _, ok1), (o, _, ok2) = await first.call(), await second.call()
        if ok1 == ok2 == "ok":
            diffs.append(o - d)
    first.close()
    second.close()
    return diffs


pct = percentile  # numpy's 'linear' percentile, shared with `fleetlens load`


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


# ======================================================================= profile
def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = REPO / ".venv" / "bin" / "py-spy"
    if not spy.exists():
        console.print("[yellow]py-spy not found in .venv: no profile[/yellow]")
        return None
    return subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--format",
                             "raw", "-o", str(out), "--nonblocking", "--subprocesses"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def print_profile(raw: Path, summary: Path | None = None, top: int = 25) -> None:
    """Top functions by self and total time and self time by package; also saved as text to `summary`."""
    if not raw.exists():
        console.print("[yellow]no profile written[/yellow]")
        return
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[_short(frames[-1])] += n
        packages[_package(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            total[frame] += n
    table = Table(title=f"gateway py-spy profile: {samples} samples (raw stacks: {raw})")
    table.add_column("function (self)")
    table.add_column("self %", justify="right")
    table.add_column("function (total)")
    table.add_column("total %", justify="right")
    # the entry chain (runpy, typer, uvicorn's server loop, starlette's middleware stack) is in every
    # request's stack: leave it out of the totals
    totals = [(f, n) for f, n in total.most_common() if not _ENTRY_FRAMES.search(f)]
    for (f1, n1), (f2, n2) in zip(own.most_common(top), totals[:top]):
        table.add_row(f1, f"{100 * n1 / samples:.1f}", f2, f"{100 * n2 / samples:.1f}")
    table.caption = "total leaves out the entry chain (runpy, typer, uvicorn's server loop, starlette's middleware)"
    by_package = "self time by package: " + ", ".join(f"{name} {100 * n / samples:.0f}%"
                                                      for name, n in packages.most_common(12))
    console.print(table)
    console.print(by_package)
    if summary is not None:
        summary.parent.mkdir(exist_ok=True)
        with summary.open("w") as out:
            saved = Console(file=out, width=160)
            saved.print(table)
            saved.print(by_package)
        console.print(f"profile summary saved to {summary.relative_to(REPO)}")


_ENTRY_FRAMES = re.compile(r"\((<frozen runpy>|typer/|_click/|click/|uvicorn/(main|server|_compat)\.py|"
                           r"asyncio/runners\.py|fleetlens/(cli|__main__)\.py|serving/service\.py|middleware/|"
                           r"starlette/(applications|routing|_exception_handler)\.py|http/httptools_impl\.py|"
                           r"[^)]*proxy_headers)")


def _package(frame: str) -> str:
    where = frame.partition(" (")[2]
    top = where.split("/")[0] if "/" in where else where.split(":")[0].removesuffix(".py")
    return top or "?"


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(where).parts[-2:])})"


# ======================================================================= main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="50", help="comma-separated concurrent streams")
    parser.add_argument("--seconds", type=float, default=3.0, help="one latency phase (per target, per round)")
    parser.add_argument("--rounds", type=int, default=16, help="rounds kept (each: one phase per target)")
    parser.add_argument("--max-steal", type=float, default=0.01,
                        help="a round in which the hypervisor took more than this share of the machine's CPU time "
                             "(steal, /proc/stat) is discarded and run again (up to 3x --rounds tries)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait, before each round, for a second without steal above --max-steal")
    parser.add_argument("--samples", type=Path, help="write every measured request of the latency phases (CSV)")
    parser.add_argument("--paired-seconds", type=float, default=8.0)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--completion-tokens", type=int, default=16, help="content chunks per stream")
    parser.add_argument("--tokens-per-s", type=float, default=50.0,
                        help="the latency phases' upstream: tokens/s per stream (0 = unpaced)")
    parser.add_argument("--arrivals", choices=("staggered", "lockstep"), default="staggered",
                        help="paced streams: enter spread over one stream's length (steady state), or all at once")
    parser.add_argument("--litellm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--litellm-venv", type=Path, default=Path("/tmp/litellm-venv"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes of each proxy (fleetlens gateway --workers, litellm --num_workers)")
    parser.add_argument("--gateway-tracing", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-gateway-tracing: diagnosis only, the gateway exports no spans")
    parser.add_argument("--spans-to", choices=("collector", "discard"), default="discard",
                        help="where the gateway's spans go: a sink that discards them (default: the gateway's own "
                             "tracing cost), or a real collector + warehouse on this machine (theirs too)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]

    try:
        import uvloop
        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    work = Path(tempfile.mkdtemp(prefix="fleetlens-gw-bench-"))
    stack = Stack(work)
    notes: list[str] = []
    results: dict = {"phases": [], "stolen": {}, "paired": {}, "max_rps": {}, "cpu_ms_per_request": {}}
    try:
        with console.status("starting upstreams, warehouse, collector, gateway..."):
            paced_url, paced_child = start_upstream(stack, args, MODEL, args.tokens_per_s)
            fast_url, fast_child = start_upstream(stack, args, FAST_MODEL, 0)
            upstreams = {MODEL: paced_url, FAST_MODEL: fast_url}
            gw_url, key, gateway, tracing = start_gateway(stack, upstreams, tracing=args.gateway_tracing,
                                                          spans_to=args.spans_to, workers=args.workers)
        gw_headers = {"Authorization": f"Bearer {key}"}

        def body(model: str) -> dict:
            return {"model": model, "stream": True, "max_tokens": args.completion_tokens,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "how much does a token cost on this fleet"}]}

        # latency phases against the paced upstream; paired and max req/s against the fast one. The
        # gateway routes by feature (`model: auto` + X-FleetLens-Feature), as its clients do.
        targets = [Target("direct", paced_url, {}, body(MODEL), paced_child),
                   Target("fleetlens", gw_url, {**gw_headers, "X-FleetLens-Feature": MODEL}, body("auto"), gateway,
                          tracing)]
        fast = [Target("direct", fast_url, {}, body(FAST_MODEL), fast_child),
                Target("fleetlens", gw_url, {**gw_headers, "X-FleetLens-Feature": FAST_MODEL}, body("auto"),
                       gateway, tracing)]
        if args.litellm:
            try:
                with console.status("starting the LiteLLM proxy..."):
                    litellm_url, litellm = start_litellm(stack, upstreams, args.litellm_venv, args.workers)
                litellm_headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
                targets.append(Target("litellm", litellm_url, litellm_headers, body(MODEL), litellm))
                fast.append(Target("litellm", litellm_url, litellm_headers, body(FAST_MODEL), litellm))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
                notes.append(f"LiteLLM skipped: {str(error)[-600:]}")
                console.print(f"[yellow]{notes[-1]}[/yellow]")

        # one stream's length against a paced upstream: streams enter spread over it (see closed_loop)
        stagger_s = (args.completion_tokens / args.tokens_per_s
                     if args.tokens_per_s and args.arrivals == "staggered" else 0.0)

        async def run_all() -> None:
            # warm-up (connections, caches, LiteLLM's first-request setup); the unpaced targets are
            # warmed after the latency phases: a burst of thousands of requests just before left the
            # gateway slower for a while (measured 1.61 vs 1.34 ms/request after, with 2.6x the live
            # objects), which is not its steady state
            for target in targets:
                warm = Phase(target.name, 8)
                await closed_loop(target, 8, 2.0, warm)
                if not warm.latencies:
                    raise RuntimeError(f"{target.name}: no successful request in the warm-up "
                                       f"({warm.errors} errors)")
            for level in levels:
                phases = {t.name: Phase(t.name, level) for t in targets}
                stolen = {t.name: Phase(t.name, level) for t in targets}  # rounds the hypervisor disturbed
                kept = tried = 0
                waited_s = 0.0
                while kept < args.rounds and tried < args.rounds * 3:
                    tried += 1
                    waited_s += await wait_until_quiet(args.max_steal, args.quiet_wait)
                    trial = {t.name: Phase(t.name, level) for t in targets}
                    for target in targets:
                        profiling = None
                        if args.profile and target.name == "fleetlens" and tried == 1:
                            raw = Path(tempfile.gettempdir()) / f"fleetlens-gateway-overhead-c{level}.raw"
                            profiling = (start_profile(gateway.process.pid, args.seconds, raw), raw)
                        console.print(f"  c={level} round {kept + 1}/{args.rounds}: {target.name}")
                        await closed_loop(target, level, args.seconds, trial[target.name], stagger_s)
                        if profiling and profiling[0]:
                            profiling[0].wait(timeout=60)
                            results.setdefault("profiles", []).append(profiling[1])
                    worst = max(p.steal_share for p in trial.values())
                    keep = worst <= args.max_steal
                    for name, phase in trial.items():
                        (phases if keep else stolen)[name].absorb(phase)
                    kept += keep
                    if not keep:
                        console.print(f"  [yellow]round discarded: the hypervisor took {100 * worst:.1f}% of this "
                                      f"machine's CPU time in it (steal)[/yellow]")
                results["phases"] += [phases[t.name] for t in targets]
                results["stolen"][level] = (stolen, tried, waited_s)
            for target in fast:
                await closed_loop(target, 8, 2.0, Phase(target.name, 8))
            for target in fast[1:]:
                console.print(f"  paired, concurrency 1: direct / {target.name}")
                results["paired"][target.name] = await paired(fast[0], target, args.paired_seconds)
            for target in fast:
                console.print(f"  max req/s: {target.name} at c={args.max_concurrency}")
                phase = Phase(target.name, args.max_concurrency)
                await closed_loop(target, args.max_concurrency, args.max_seconds, phase)
                results["max_rps"][target.name] = phase

        asyncio.run(run_all())
    except RuntimeError as error:
        console.print(f"[red]{error}[/red]")
        return 1
    finally:
        stack.stop()
        for child in stack.children:  # what the proxies said went wrong, before their logs are deleted
            said = [line for line in child.tail().splitlines() if re.search(r"WARNING|ERROR|Error|Traceback", line)]
            if said and child.name in ("gateway", "litellm"):
                notes.append(f"{child.name}'s log, last warnings/errors:\n  " + "\n  ".join(said[-8:]))
        shutil.rmtree(work, ignore_errors=True)

    report(results, targets, levels, args, loop_name, notes)
    for raw in results.get("profiles", []):
        summary = REPO / "bench" / "profiles" / raw.with_suffix(".txt").name.replace("fleetlens-", "")
        print_profile(raw, summary)
    return 0


def report(results: dict, targets: list[Target], levels: list[int], args: argparse.Namespace, loop_name: str,
           notes: list[str]) -> None:
    by = {(p.target, p.concurrency): p for p in results["phases"]}
    pacing = (f"each stream decoding at {args.tokens_per_s:g} tokens/s" if args.tokens_per_s
              else "an unpaced upstream")
    table = Table(title=f"gateway overhead: streaming chat completions ({args.completion_tokens} content chunks + "
                        f"usage), {pacing}, closed loop, {args.rounds} x {args.seconds:g} s per target, interleaved; "
                        f"spans to {'a discarding sink' if args.spans_to == 'discard' else 'collector + warehouse'}")
    for column in ("streams", "target", "requests", "req/s", "errors", "p50 ms", "p99 ms", "TTFB p50", "TTFB p99",
                   "added p50", "added p99", "added p99 by round", "server CPU ms/req", "spans CPU ms/req",
                   "client CPU", "stalls", "steal"):
        table.add_column(column, justify="left" if column == "target" else "right")
    out: dict = {"latency": [], "paired_ms": {}, "max_rps": {}, "notes": notes,
                 "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    for level in levels:
        direct = by[("direct", level)]
        for target in targets:
            p = by[(target.name, level)]
            n = len(p.latencies)
            added50 = added99 = None
            # each round's p99 and steal, against the direct round before it
            rounds = [(pct(mine, 99), pct(base, 99), steal, base_steal) for mine, base, steal, base_steal
                      in zip(p.rounds, direct.rounds, p.round_steal, direct.round_steal) if mine and base]
            by_round: list[float] = []
            if target.name != "direct" and p.latencies and direct.latencies:
                added50 = pct(p.latencies, 50) - pct(direct.latencies, 50)
                added99 = pct(p.latencies, 99) - pct(direct.latencies, 99)
                by_round = sorted(mine - base for mine, base, _, _ in rounds)
            done = p.completed
            cpu_per = p.server_cpu_s / done if done else None
            row = {"streams": level, "target": target.name, "requests": n, "rps": done / p.seconds if p.seconds else 0,
                   "errors": p.errors, "p50_ms": _ms(pct(p.latencies, 50)), "p99_ms": _ms(pct(p.latencies, 99)),
                   "ttfb_p50_ms": _ms(pct(p.ttfbs, 50)), "ttfb_p99_ms": _ms(pct(p.ttfbs, 99)),
                   "added_p50_ms": _ms(added50), "added_p99_ms": _ms(added99),
                   "server_cpu_ms_per_request": _ms(cpu_per),
                   "collector_warehouse_cpu_ms_per_request": _ms(p.extra_cpu_s / done if done and target.extra else None),
                   "client_cpu_share": p.client_cpu_s / p.seconds if p.seconds else 0.0,
                   "added_p99_by_round_ms": [_ms(v) for v in by_round],
                   "stalls": len(p.stalls), "stall_max_ms": _ms(max(p.stalls, default=0.0)),
                   "steal_share": p.steal_share, "error_kinds": dict(p.error_kinds),
                   "rounds": [{"p99_ms": _ms(mine), "direct_p99_ms": _ms(base), "stolen_ms": _ms(steal),
                               "direct_stolen_ms": _ms(base_steal)} for mine, base, steal, base_steal in rounds]}
            out["latency"].append(row)
            table.add_row(str(level), target.name, str(n), f"{row['rps']:.0f}", str(p.errors),
                          ms(pct(p.latencies, 50)), ms(pct(p.latencies, 99)), ms(pct(p.ttfbs, 50)),
                          ms(pct(p.ttfbs, 99)), ms(added50), ms(added99),
                          f"{by_round[0] * 1000:.1f}–{by_round[-1] * 1000:.1f}, med "
                          f"{by_round[len(by_round) // 2] * 1000:.1f}" if by_round else "-", ms(cpu_per),
                          ms(p.extra_cpu_s / done if done and target.extra else None),
                          f"{100 * row['client_cpu_share']:.0f}%",
                          f"{len(p.stalls)}, max {max(p.stalls) * 1000:.0f}" if p.stalls else "0",
                          f"{100 * p.steal_share:.1f}%")
        table.add_section()
    table.caption = ("added = target percentile − direct percentile, all rounds pooled; by round = min–max and "
                     "median of each round's added p99 (the round against the direct round before it); server CPU = "
                     "the proxy's process(es) (direct: the stub's); spans CPU = the collector + warehouse taking "
                     "fleetlens' spans; client CPU = this process's share of one core; stalls = times this light "
                     f"client's loop woke >= {STALL_S * 1000:.0f} ms late (max, ms) (the machine's stalls, whoever is measured); "
                     "steal = share of the machine's CPU time the hypervisor gave to others (rounds above "
                     f"{100 * args.max_steal:g}% are discarded and run again)")
    console.print(table)
    for p in [*results["phases"], *results["max_rps"].values()]:
        if p.error_kinds:
            console.print(f"[yellow]{p.target} at {p.concurrency} streams, errors: "
                          f"{', '.join(f'{kind} x{n}' for kind, n in p.error_kinds.most_common())}[/yellow]")
    for level, (stolen, tried, waited_s) in results["stolen"].items():
        line = (f"{level} streams: {tried - len(stolen['direct'].rounds)} of {tried} rounds kept, "
                f"{len(stolen['direct'].rounds)} discarded for steal; {waited_s:.0f} s spent waiting for a quiet "
                "machine before rounds")
        direct, mine = stolen["direct"], stolen["fleetlens"]
        if mine.latencies and direct.latencies:
            line += (f"; in the discarded rounds (hypervisor took {100 * mine.steal_share:.1f}% / "
                     f"{100 * direct.steal_share:.1f}% of the CPU time) fleetlens' added p99 was "
                     f"{(pct(mine.latencies, 99) - pct(direct.latencies, 99)) * 1000:.2f} ms "
                     f"(direct p99 {pct(direct.latencies, 99) * 1000:.1f} ms)")
        out.setdefault("discarded", {})[level] = {"tried": tried, "discarded": len(direct.rounds),
                                                  "waited_s": waited_s}
        console.print(line)

    pairs = Table(title=f"paired added latency: 1 stream alternating direct / target (unpaced upstream), "
                        f"{args.paired_seconds:g} s each")
    for column in ("target", "pairs", "added p50 ms", "added p90 ms", "added p99 ms"):
        pairs.add_column(column, justify="left" if column == "target" else "right")
    for name, diffs in results["paired"].items():
        pairs.add_row(name, str(len(diffs)), ms(pct(diffs, 50)), ms(pct(diffs, 90)), ms(pct(diffs, 99)))
        out["paired_ms"][name] = {"pairs": len(diffs), "p50": _ms(pct(diffs, 50)), "p90": _ms(pct(diffs, 90)),
                                  "p99": _ms(pct(diffs, 99))}
    console.print(pairs)

    peak = Table(title=f"max requests/s, closed loop at {args.max_concurrency} streams (unpaced upstream), "
                       f"{args.max_seconds:g} s")
    for column in ("target", "req/s", "errors", "p50 ms", "p99 ms", "server CPU ms/req", "server CPU cores"):
        peak.add_column(column, justify="left" if column == "target" else "right")
    for name, p in results["max_rps"].items():
        n = p.completed
        rps = n / p.seconds if p.seconds else 0
        peak.add_row(name, f"{rps:.0f}", str(p.errors), ms(pct(p.latencies, 50)), ms(pct(p.latencies, 99)),
                     ms(p.server_cpu_s / n if n else None), f"{p.server_cpu_s / p.seconds:.2f}")
        out["max_rps"][name] = {"rps": rps, "errors": p.errors, "server_cpu_ms_per_request":
                                _ms(p.server_cpu_s / n if n else None)}
    console.print(peak)

    top = max(levels)
    mine = next((r for r in out["latency"] if r["streams"] == top and r["target"] == "fleetlens"), None)
    theirs = next((r for r in out["latency"] if r["streams"] == top and r["target"] == "litellm"), None)
    if mine and mine["added_p99_ms"] is not None:
        verdict = "PASS" if mine["added_p99_ms"] <= BAR_ADDED_P99_MS else "FAIL"
        kept = len(next(p for p in results["phases"] if p.target == "fleetlens" and p.concurrency == top).rounds)
        if kept < args.rounds:  # the tries ran out on a machine the hypervisor kept disturbing
            verdict = f"INCONCLUSIVE (only {kept} of {args.rounds} rounds undisturbed by steal; {verdict} on those)"
        line = f"bar: p99 added latency at {top} streams = {mine['added_p99_ms']:.2f} ms (<= {BAR_ADDED_P99_MS} ms): {verdict}"
        if theirs and theirs["added_p99_ms"] is not None:
            line += (f"; goal (below LiteLLM's {theirs['added_p99_ms']:.2f} ms): "
                     f"{'MET' if mine['added_p99_ms'] < theirs['added_p99_ms'] else 'NOT MET'}")
        console.print(f"[bold]{line}[/bold]")
    load = os.getloadavg()
    console.print(f"client: {loop_name}, raw HTTP/1.1 keep-alive, one socket per stream; machine: {os.cpu_count()} "
                  f"CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other work on the machine makes "
                  f"latencies noisy; CPU ms/request is the steadier number)")
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        console.print(f"wrote {args.json}")
    if args.samples:
        with open(args.samples, "w") as samples:
            samples.write("target,streams,sent_unix_s,latency_ms,ttfb_ms\n")
            for p in results["phases"]:
                for sent, latency, first in p.samples:
                    samples.write(f"{p.target},{p.concurrency},{sent:.6f},{latency * 1e3:.3f},{first * 1e3:.3f}\n")
        console.print(f"wrote {args.samples}")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


if __name__ == "__main__":
    sys.exit(main())
