"""`fleetlens serve replica --model NAME`: one vLLM replica of a registry model, traced, timed, registered.

What a replica needs to be part of the fleet, done in one place:
* vLLM's OpenAI server with the registry's path, served name, quantization and extra arguments, on
  its own port, and OTLP tracing to the collector with `OTEL_SERVICE_NAME=vllm-{replica}` (so its
  `llm_request` spans say which replica served them);
* the cold start measured from launch to the first good health check and written as a
  `replica.cold_start` span (model, variant, GPU type/count/price), because loading time is paid
  GPU time that the cost models must see;
* registration in the replica directory (see `registration.py`) once ready, deregistration on exit,
  so the gateway routes to it without a restart and stops routing to it when it goes.

On this machine vLLM is the CPU build in `.venv-serving` (`python -m vllm.entrypoints.openai.api_server`,
because its `vllm` console script looks for a distribution named `vllm`); on a GPU host the normal
`vllm serve` is used, or whatever `replica.engine_command` says.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from fleetlens import semconv as sc
from fleetlens.config import ConfigError, Settings
from fleetlens.stack import stop_group

from .registration import ReplicaDirectory, ReplicaRecord
from .registry import ModelRegistry, ModelSpec

log = logging.getLogger("fleetlens.replica")

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVING_VENV = ".venv-serving"
VLLM_API_SERVER = "vllm.entrypoints.openai.api_server"


class ReplicaFailed(RuntimeError):
    """vLLM exited or never became ready; the message carries the end of its log."""


def default_engine_command(cwd: Path | None = None) -> list[str]:
    """The serving venv's python (next to the checkout or in the working directory), else `vllm serve`."""
    for root in (cwd or Path.cwd(), REPO_ROOT):
        python = root / SERVING_VENV / "bin" / "python"
        if python.exists():
            return [str(python), "-m", VLLM_API_SERVER]
    if shutil.which("vllm"):
        return ["vllm", "serve"]
    raise ConfigError("no vLLM found: run scripts/setup-serving-venv (CPU build in .venv-serving), install "
                      "vllm, or set replica.engine_command (FLEETLENS_REPLICA__ENGINE_COMMAND)")


@dataclass(frozen=True)
class ReplicaPlan:
    """Everything needed to start one replica, decided before anything runs (printable, testable)."""

    name: str
    model: str
    spec: ModelSpec
    served_name: str
    host: str
    port: int
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def plan_replica(registry: ModelRegistry, model: str, settings: Settings, *, port: int, name: str,
                 engine: list[str] | None = None) -> ReplicaPlan:
    """The vLLM command line and environment for replica `name` of registry model `model`."""
    if model not in registry.models:
        known = ", ".join(sorted(registry.models))
        raise ConfigError(f"model {model!r} is not in the model registry (known: {known})")
    spec = registry.models[model]
    served = registry.served_name(model)
    host = settings.replica.host
    endpoint = (settings.replica.otlp_traces_endpoint
                or f"http://127.0.0.1:{settings.collector.http_port}/v1/traces")
    argv = [*(engine or settings.replica.engine_command or default_engine_command()),
            "--model", spec.path, "--served-model-name", served, "--host", host, "--port", str(port),
            "--otlp-traces-endpoint", endpoint]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.quantization:
        argv += ["--quantization", spec.quantization]
    argv += spec.extra_args
    resource = {sc.REPLICA: name, sc.MODEL_VARIANT: spec.variant, sc.REQUEST_MODEL: model}
    env = {
        "OTEL_SERVICE_NAME": f"{sc.VLLM_SERVICE_PREFIX}{name}",
        "OTEL_RESOURCE_ATTRIBUTES": ",".join(f"{k}={v}" for k, v in resource.items()),
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "VLLM_CPU_KVCACHE_SPACE": f"{settings.replica.kv_cache_gib:g}",
        # Nothing is downloaded at run time: checkpoints are local paths or already in the HF cache.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_NO_USAGE_STATS": "1",
        **spec.env,
    }
    return ReplicaPlan(name, model, spec, served, host, port, argv, env)


class ReplicaLauncher:
    """Starts the planned vLLM process (its own process group), waits for it, records and registers it."""

    def __init__(self, plan: ReplicaPlan, directory: ReplicaDirectory, log_path: Path,
                 tracer_provider: TracerProvider | None = None, drain_timeout_s: float = 20.0) -> None:
        self.plan = plan
        self.drain_timeout_s = drain_timeout_s
        self.directory = directory
        self.log_path = log_path
        self.tracer_provider = tracer_provider
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at = 0.0
        self.ready_at = 0.0
        self.registered = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting replica %s of %s on %s: %s", self.plan.name, self.plan.model, self.plan.url,
                 " ".join(self.plan.argv))
        self.launched_at = time.time()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.plan.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={**os.environ, **self.plan.env})

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float, tick: Callable[[float], None] | None = None) -> float:
        """Poll `/health` until it answers 200; returns the load time in seconds.

        Raises ReplicaFailed if vLLM exits first or the timeout passes (the cold-start span is still
        written, with an error status, because a failed load costs GPU time too)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.alive:
                    code = self.process.returncode if self.process else None
                    self._record_cold_start(False, f"exited with code {code}")
                    raise ReplicaFailed(f"replica {self.plan.name} exited with code {code} before it was ready; "
                                        f"end of {self.log_path}:\n{self.log_tail()}")
                try:
                    if client.get(self.plan.url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self._record_cold_start(False, "timeout")
                    raise ReplicaFailed(f"replica {self.plan.name} not ready after {timeout_s:.0f} s; "
                                        f"end of {self.log_path}:\n{self.log_tail()}")
                if tick:
                    tick(time.time() - self.launched_at)
                time.sleep(0.5)
        self.ready_at = time.time()
        self._record_cold_start(True)
        return self.ready_at - self.launched_at

    def _record_cold_start(self, ok: bool, error: str | None = None) -> None:
        if self.tracer_provider is None:
            return
        ended = time.time()
        spec = self.plan.spec
        attributes: dict[str, str | int | float] = {
            sc.REPLICA: self.plan.name, sc.REQUEST_MODEL: self.plan.model, sc.MODEL_VARIANT: spec.variant,
            sc.REPLICA_URL: self.plan.url, sc.GPU_TYPE: spec.gpu.type, sc.GPU_COUNT: spec.gpu.count,
            sc.LOAD_SECONDS: round(ended - self.launched_at, 3),
        }
        if spec.gpu.hourly_usd is not None:
            attributes[sc.GPU_HOURLY_USD] = spec.gpu.hourly_usd
        tracer = self.tracer_provider.get_tracer("fleetlens.replica")
        span = tracer.start_span(sc.COLD_START_SPAN, start_time=int(self.launched_at * 1e9), attributes=attributes)
        if ok:
            span.set_status(Status(StatusCode.OK))
        else:
            span.set_attribute(sc.ERROR_TYPE, error or "error")
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=int(ended * 1e9))
        self.tracer_provider.force_flush(5_000)  # telemetry is best effort; a collector that is down costs 5 s

    def register(self) -> None:
        self.directory.register(ReplicaRecord(
            name=self.plan.name, model=self.plan.model, url=self.plan.url, launched_at=self.launched_at,
            ready_at=self.ready_at, variant=self.plan.spec.variant))
        self.registered = True

    def stop(self, grace_s: float = 30.0) -> int | None:
        """Deregister first (the gateway stops sending new requests), drain (wait until vLLM has
        nothing running or waiting, at most `drain_timeout_s`), then SIGTERM the group; SIGKILL after
        `grace_s`. Draining matters: vLLM's shutdown does not finish open streams, and a stream that
        already sent tokens cannot fall back to another replica. A replica stopped while still loading
        has nothing in flight and vLLM ignores SIGTERM until it is up, so it gets 3 s: whoever stops
        this launcher (Ctrl-C, `fleetlens up`, the eval gate) must not out-wait it and SIGKILL the
        launcher first, which would leave vLLM (in its own session) running."""
        if self.registered:
            self.directory.deregister(self.plan.name)
            self.registered = False
            self.drain(self.drain_timeout_s)
        if self.process is None:
            return None
        grace_s = grace_s if self.ready_at else min(grace_s, 3.0)
        code = stop_group(self.process, grace_s)  # vLLM's engine-core and workers are in the same group
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        return code

    def drain(self, timeout_s: float, quiet_s: float = 1.5) -> float:
        """Wait until vLLM reports no request running or waiting for `quiet_s` in a row (longer than
        the gateway takes to see the deregistration, so nothing new arrives after), at most
        `timeout_s`; returns the seconds waited. A replica whose metrics cannot be read is not waited for."""
        started = time.monotonic()
        quiet_since: float | None = None
        with httpx.Client(timeout=1.0) as client:
            while self.alive and time.monotonic() - started < timeout_s:
                busy = self.in_flight(client)
                if busy is None:
                    break
                now = time.monotonic()
                if busy:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= quiet_s:
                    break
                time.sleep(0.2)
        waited = time.monotonic() - started
        log.info("replica %s drained in %.1f s", self.plan.name, waited)
        return waited

    def in_flight(self, client: httpx.Client) -> int | None:
        """Requests vLLM is running or has waiting (its /metrics gauges); None when unreadable."""
        try:
            text = client.get(self.plan.url + "/metrics").text
        except httpx.HTTPError:
            return None
        total, seen = 0.0, False
        for line in text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
        return int(total) if seen else None

    def serve_forever(self) -> int:
        """Block until vLLM exits or SIGTERM/SIGINT arrives; always stops and deregisters."""
        stopping = False

        def on_signal(_signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not stopping and self.alive:
                time.sleep(0.5)
            code = self.process.returncode if self.process and not self.alive else None
            if code is not None and not stopping:
                log.error("replica %s exited with code %s; end of its log:\n%s", self.plan.name, code,
                          self.log_tail())
            self.stop()
            return 0 if stopping else (code or 1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
