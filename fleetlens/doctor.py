"""`fleetlens doctor`: check this machine and the settings before anything starts, and say what to fix.

Each check returns a `CheckResult` (status, what was found, the exact command or setting that fixes it).
Statuses: `ok`, `info` (worth knowing, nothing to do), `warn` (works, but something is missing or
tight), `fail` (a command the user is about to run would fail). `fleetlens doctor` exits 1 when any
check fails, 0 otherwise. Everything here is side-effect free and quick: nothing is started, created
or written, network probes use short timeouts (well under 3 s in all on a healthy machine).

Decisions:
* Settings that do not load are one failed `config` check (the ConfigError text); the checks that
  need settings are then skipped, the others (Python, venvs, CPU) still run.
* `.venv` missing or not the interpreter running doctor is a warning: FleetLens evidently runs from
  wherever doctor runs, only the README's `.venv/bin/fleetlens` and `make` targets would not.
* The serving engine (`.venv-serving` with vLLM, `vllm` on PATH or `replica.engine_command`) is
  only needed for serving: missing is a warning, because `fleetlens up` then skips the gateway and
  the replicas; it is a failure with `--serving` (as `fleetlens up --serving` would fail), or when
  `.venv-serving/bin/python` exists without vLLM (`up` would pick it and the replicas would die).
* Ports are those `fleetlens up` would bind with these settings: the embedded warehouse's (only
  without `warehouse_url`), the collector's gRPC and HTTP ports, the dashboards', the gateway's
  (a failure when serving would start, a warning otherwise) and Airflow's (only with `--airflow` or
  when `airflow.*` is set). A port held by the same FleetLens component already running (`fleetlens
  up` is up) is ok: recognised by the holder's command line (`fleetlens collector`, ...) when psutil
  can see it, else by the component's own answer on the port (the collector's and the gateway's
  `/metrics` families, the embedded warehouse's `X-ClickHouse-Server-Display-Name: fleetlens`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import ConfigError, Settings, WarehouseURL, load_settings
from .net import client_host

Status = Literal["ok", "info", "warn", "fail"]
GiB = 1024**3
DISK_WARN_BYTES = 5 * GiB
DISK_FAIL_BYTES = 1 * GiB
MEMORY_WARN_SERVING_BYTES = 6 * GiB  # two CPU vLLM replicas of the demo models take ~3 GB each
MEMORY_WARN_BYTES = 2 * GiB  # warehouse + collector (+ dashboards) alone
PROBE_TIMEOUT_S = 0.7
WAREHOUSE_TIMEOUT_S = 2.0
SERVING_VENV = ".venv-serving"  # as fleetlens.serving.replica.default_engine_command looks for it
MAIN_VENV = ".venv"

# The checkout this fleetlens runs from (editable install), or None for an installed wheel.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    detail: str
    fix: str = ""


def exit_code(results: list[CheckResult]) -> int:
    return 1 if any(r.status == "fail" for r in results) else 0


def repo_root() -> Path | None:
    """The FleetLens checkout running now, None when fleetlens is installed from a wheel."""
    root = _PACKAGE_ROOT
    return root if (root / "pyproject.toml").is_file() and (root / "scripts" / "setup-venv").is_file() else None


# ------------------------------------------------------------------------------------------ all checks
def run_checks(*, serving: bool | None = None, airflow: bool = False, root: Path | None = None,
               settings: Settings | None = None) -> list[CheckResult]:
    """Every check, in the order they are shown. `serving` is `fleetlens up`'s flag (None = as `up`
    decides: when a vLLM is installed); `root` is the checkout whose venvs are checked (default: the
    one running, if any)."""
    results: list[CheckResult] = []
    if settings is None:
        config, settings = check_config()
        results.append(config)
    else:
        results.append(CheckResult("config", "ok", "settings loaded"))
    checkout = root if root is not None else repo_root()
    results.append(check_python(checkout))
    results.append(check_fleetlens())
    results.append(check_venv(checkout))
    engine = check_serving_engine(settings, checkout, wanted=serving, explicit_root=root is not None)
    results.append(engine.result)
    serving_on = serving if serving is not None else engine.found
    if settings is not None:
        airflow_on = airflow or "airflow" in settings.model_fields_set
        results.extend(check_ports(settings, serving_on=serving_on, airflow_on=airflow_on))
        results.append(check_data_dir(settings))
        results.append(check_warehouse(settings))
        results.append(check_disk(settings))
    results.append(check_memory(serving_on))
    results.append(check_cpu())
    if settings is not None and serving_on:
        results.append(check_demo_models(settings))
    return results


# ------------------------------------------------------------------------------------------ config
def check_config() -> tuple[CheckResult, Settings | None]:
    source = os.environ.get("FLEETLENS_CONFIG") or ("fleetlens.yaml" if Path("fleetlens.yaml").is_file() else None)
    try:
        settings = load_settings()
    except ConfigError as error:
        return CheckResult("config", "fail", str(error).strip(),
                           "correct or unset the named FLEETLENS_* variables"
                           + (f" / keys in {source}" if source else "")), None
    except Exception as error:  # noqa: BLE001 - a broken fleetlens.yaml, say: report it, do not crash
        return CheckResult("config", "fail", f"settings cannot be loaded: {type(error).__name__}: {error}",
                           f"fix {source or 'the FLEETLENS_* environment'}"), None
    env = sorted(n for n in os.environ if n.startswith("FLEETLENS_") and not n.startswith("FLEETLENS_DBT_"))
    where = ", ".join(filter(None, [source and f"file {source}", env and f"{len(env)} FLEETLENS_* variable(s)"]))
    return CheckResult("config", "ok", f"settings loaded ({where or 'defaults'})"), settings


# ------------------------------------------------------------------------------------------ python
def _requires_python(root: Path | None) -> str | None:
    if root is not None and (root / "pyproject.toml").is_file():
        import tomllib

        try:
            return tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
        except (OSError, ValueError, KeyError):
            pass
    try:
        return importlib.metadata.metadata("fleetlens").get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_ok(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # packaging is everywhere pip is; a crude fallback for ">=3.11,<3.12"
        parts = tuple(int(p) for p in version.split(".")[:2])
        for clause in spec.split(","):
            clause = clause.strip()
            for op in (">=", "<", "=="):
                if clause.startswith(op):
                    bound = tuple(int(p) for p in clause[len(op):].strip().split(".")[:2])
                    broken = {">=": parts < bound, "<": parts >= bound, "==": parts != bound}[op]
                    if broken:
                        return False
        return True
    return SpecifierSet(spec).contains(version, prereleases=True)


def check_python(root: Path | None = None) -> CheckResult:
    version = ".".join(str(p) for p in sys.version_info[:3])
    spec = _requires_python(root)
    detail = f"Python {version} ({sys.executable})"
    if spec is None:
        return CheckResult("python", "ok", detail + "; requires-python unknown")
    if not _version_ok(version, spec):
        return CheckResult("python", "fail", f"{detail}; FleetLens requires Python {spec}",
                           "install Python 3.11 and recreate the venv: rm -rf .venv && PYTHON=python3.11 make venv")
    return CheckResult("python", "ok", f"{detail}; requires {spec}")


# Sub-packages a full install provides, and the optional components (extras of `.[all]`).
_COMPONENTS = ("fleetlens.collector", "fleetlens.serving", "fleetlens.dashboards", "fleetlens.evals", "fleetlens.dags")
_EXTRAS = {"dbt": "dbt-core (pipeline)", "airflow": "apache-airflow (pipeline)", "streamlit": "streamlit (dashboards)",
           "lm_eval": "lm-eval (evals)"}


def _find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_fleetlens() -> CheckResult:
    """fleetlens and its components import from the running interpreter (found, not imported)."""
    import fleetlens

    where = Path(fleetlens.__file__).resolve().parent
    missing = [name for name in _COMPONENTS if not _find(name)]
    if missing:
        return CheckResult("fleetlens", "fail",
                           f"fleetlens {fleetlens.__version__} at {where} lacks {', '.join(missing)}",
                           "reinstall: make venv (pip install -c constraints.txt -e '.[all,dev]')")
    extras = [label for module, label in _EXTRAS.items() if not _find(module)]
    detail = f"fleetlens {fleetlens.__version__} importable from {sys.executable} ({where})"
    if extras:
        return CheckResult("fleetlens", "warn", f"{detail}; not installed: {', '.join(extras)}",
                           "make venv (installs the [all] extras)")
    return CheckResult("fleetlens", "ok", detail)


# ------------------------------------------------------------------------------------------ venvs
def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _venv_python_version(venv: Path) -> str | None:
    try:
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() in ("version", "version_info"):
                return value.strip()
    except OSError:
        pass
    return None


def check_venv(root: Path | None) -> CheckResult:
    """The main venv `<root>/.venv` (what `make venv` builds and the README's commands run)."""
    name = f"venv {MAIN_VENV}"
    if root is None:
        return CheckResult(name, "ok", f"not a checkout: fleetlens installed in {sys.prefix}")
    venv = root / MAIN_VENV
    running = Path(sys.prefix)
    if not (venv / "bin" / "python").exists():
        return CheckResult(name, "warn", f"missing: {venv} (doctor runs from {running})",
                           f"run `make venv` in {root} (./scripts/setup-venv)")
    version = _venv_python_version(venv)
    spec = _requires_python(root)
    if version and spec and not _version_ok(version, spec):
        return CheckResult(name, "fail", f"{venv} has Python {version}; FleetLens requires {spec}",
                           f"recreate it: rm -rf {venv} && PYTHON=python3.11 make venv")
    stamp = venv / ".fleetlens-install"
    try:
        want = hashlib.sha256((root / "pyproject.toml").read_bytes() + (root / "constraints.txt").read_bytes())
        stale = stamp.read_text().strip() != want.hexdigest()
    except OSError:
        stale = True
    if stale:
        return CheckResult(name, "warn", f"{venv} is not installed for the current pyproject.toml/constraints.txt",
                           "run `make venv` (reinstalls the pinned packages)")
    if not _same_path(running, venv):
        return CheckResult(name, "warn", f"{venv} is there, but doctor runs from {running}",
                           f"use {venv / 'bin' / 'fleetlens'} (or activate {venv})")
    return CheckResult(name, "ok", f"{venv} (running)")


@dataclass(frozen=True)
class EngineCheck:
    result: CheckResult
    found: bool  # whether `fleetlens up` would decide a vLLM is there (engine_available)


def _venv_has_vllm(venv: Path) -> bool:
    return any(venv.glob("lib/python3*/site-packages/vllm/__init__.py"))


def check_serving_engine(settings: Settings | None, root: Path | None, *, wanted: bool | None = None,
                         explicit_root: bool = False) -> EngineCheck:
    """What `fleetlens serve replica` would start vLLM with: `replica.engine_command`, else
    `.venv-serving` (in `root`, and the working directory unless `root` was given), else `vllm` on PATH."""
    name = f"venv {SERVING_VENV}"
    needed = "needed by `fleetlens up` (gateway + demo replicas), `serve replica` and `models make-demo`"
    command = settings.replica.engine_command if settings is not None else None
    if command:
        program = command[0]
        if shutil.which(program) or Path(program).is_file():
            return EngineCheck(CheckResult(name, "ok", f"replica.engine_command: {' '.join(command)}"), True)
        return EngineCheck(CheckResult(name, "fail" if wanted is not False else "warn",
                                       f"replica.engine_command names {program}, which is not there",
                                       "correct FLEETLENS_REPLICA__ENGINE_COMMAND (replica.engine_command)"), True)
    roots = [root] if explicit_root or root is not None else []
    if not explicit_root and Path.cwd() not in roots:
        roots.insert(0, Path.cwd())
    for base in roots:
        venv = base / SERVING_VENV
        if not (venv / "bin" / "python").exists():
            continue
        if not _venv_has_vllm(venv):
            status: Status = "warn" if wanted is False else "fail"
            return EngineCheck(CheckResult(name, status, f"{venv} has no vllm package (incomplete install); "
                                           "`fleetlens up` would use it and its replicas would not start",
                                           "run `make serving-venv` (./scripts/setup-serving-venv)"), True)
        stamp, script = venv / ".fleetlens-serving-install", base / "scripts" / "setup-serving-venv"
        try:
            stale = script.is_file() and stamp.read_text().strip() != hashlib.sha256(script.read_bytes()).hexdigest()
        except OSError:
            stale = True
        if stale:
            return EngineCheck(CheckResult(name, "warn", f"{venv} has vLLM but predates scripts/setup-serving-venv",
                                           "run `make serving-venv`"), True)
        return EngineCheck(CheckResult(name, "ok", f"{venv} with vLLM (CPU build)"), True)
    on_path = shutil.which("vllm")
    if on_path:
        return EngineCheck(CheckResult(name, "ok", f"no {SERVING_VENV}; `vllm serve` from {on_path}"), True)
    where = " or ".join(str(base / SERVING_VENV) for base in roots) or SERVING_VENV
    if wanted:
        return EngineCheck(CheckResult(name, "fail", f"missing: {where} (and no vllm on PATH); serving was asked for "
                                       f"(--serving), {needed}", "run `make serving-venv` (or drop --serving)"), False)
    return EngineCheck(CheckResult(name, "warn", f"missing: {where} (and no vllm on PATH); {needed} — "
                                   "`fleetlens up` runs without serving", "run `make serving-venv`"), False)


# ------------------------------------------------------------------------------------------ ports
@dataclass(frozen=True)
class PortUse:
    component: str  # warehouse | collector | gateway | dashboards | airflow
    setting: str  # dotted key, e.g. collector.http_port
    host: str
    port: int
    required: bool  # a taken port fails (the component would start) or only warns

    @property
    def env(self) -> str:
        return "FLEETLENS_" + self.setting.upper().replace(".", "__")


def ports_to_check(settings: Settings, *, serving_on: bool, airflow_on: bool) -> list[PortUse]:
    uses = []
    if settings.uses_embedded_warehouse:
        server = settings.warehouse_server
        uses.append(PortUse("warehouse", "warehouse_server.port", server.host, server.port, True))
    collector = settings.collector
    if collector.grpc_port:
        uses.append(PortUse("collector", "collector.grpc_port", collector.host, collector.grpc_port, True))
    uses.append(PortUse("collector", "collector.http_port", collector.host, collector.http_port, True))
    uses.append(PortUse("gateway", "gateway.port", settings.gateway.host, settings.gateway.port, serving_on))
    uses.append(PortUse("dashboards", "dashboards.port", settings.dashboards.host, settings.dashboards.port, True))
    if airflow_on:
        uses.append(PortUse("airflow", "airflow.port", settings.airflow.host, settings.airflow.port, True))
    return uses


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on (host, port) now, None when it could. SO_REUSEADDR as
    uvicorn and grpc set it, so connections in TIME_WAIT do not count as taken."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {error}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error
    return None


def _next_free_port(host: str, port: int, avoid: set[int]) -> int | None:
    for candidate in range(port + 1, min(port + 50, 65536)):
        if candidate not in avoid and bind_error(host, candidate) is None:
            return candidate
    return None


@dataclass
class _Holder:
    pid: int | None
    name: str = ""
    cmdline: list[str] = field(default_factory=list)
    environ: dict[str, str] | None = None

    def describe(self) -> str:
        if self.pid is None:
            return "a process this user cannot see"
        shown = _short(self.cmdline, 120) or self.name
        return f"pid {self.pid} ({self.name}: {shown})" if shown != self.name else f"pid {self.pid} ({self.name})"


def _short(argv: list[str], limit: int) -> str:
    text = " ".join(" ".join(argv).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _holders(port: int, connections: list | None) -> list[_Holder]:
    """Processes with a listening (or bound, unconnected) TCP socket on `port`, as psutil sees them."""
    import psutil

    if connections is None:
        return []
    pids: list[int | None] = []
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and not conn.raddr and conn.pid not in pids:
            if conn.status in (psutil.CONN_LISTEN, psutil.CONN_NONE, psutil.CONN_CLOSE):
                pids.append(conn.pid)
    holders = []
    for pid in pids:
        holder = _Holder(pid)
        if pid is not None:
            try:
                process = psutil.Process(pid)
                holder.name = process.name()
                holder.cmdline = process.cmdline()
                try:
                    holder.environ = process.environ()
                except psutil.Error:
                    holder.environ = None
            except psutil.Error:
                pass
        holders.append(holder)
    return holders


def _tcp_connections() -> list | None:
    import psutil

    try:
        return psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None


_SUBCOMMANDS = {"warehouse": ("warehouse", "serve"), "collector": ("collector",), "gateway": ("gateway",)}


def _is_fleetlens_component(holder: _Holder, use: PortUse, settings: Settings) -> bool:
    """The holder's command line says it is this FleetLens component (`python -m fleetlens collector`,
    `.venv/bin/fleetlens warehouse serve ...`, streamlit on the dashboards' app, FleetLens' Airflow)."""
    argv = holder.cmdline
    if use.component in _SUBCOMMANDS:
        words = _SUBCOMMANDS[use.component]
        for i, arg in enumerate(argv):
            if os.path.basename(arg) == "fleetlens" and tuple(argv[i + 1:i + 1 + len(words)]) == words:
                return True
        return False
    if use.component == "dashboards":
        return any("streamlit" in arg for arg in argv) and any(
            arg.replace(os.sep, "/").endswith("dashboards/app.py") for arg in argv)
    if use.component == "airflow":
        is_airflow = any(os.path.basename(arg).startswith("airflow") for arg in argv[:3])
        home = (holder.environ or {}).get("AIRFLOW_HOME")
        return is_airflow and home is not None and _same_path(Path(home), settings.airflow_home)
    return False


def _probe_component(use: PortUse, settings: Settings) -> str | None:
    """What answers on the port when it is this FleetLens component: a description, else None."""
    import httpx

    base = f"http://{client_host(use.host)}:{use.port}"
    try:
        if use.component == "warehouse":
            url = settings.warehouse
            headers = {"X-ClickHouse-User": url.username, "X-ClickHouse-Key": url.password.get_secret_value()}
            reply = httpx.get(base + "/", params={"query": "SELECT 1"}, headers=headers, timeout=PROBE_TIMEOUT_S)
            if reply.headers.get("X-ClickHouse-Server-Display-Name") == "fleetlens":
                return "the FleetLens embedded warehouse"
        elif use.component == "collector":
            http = f"http://{client_host(use.host)}:{settings.collector.http_port}/metrics"
            if "fleetlens_collector_" in httpx.get(http, timeout=PROBE_TIMEOUT_S).text:
                grpc = use.setting.endswith("grpc_port")
                return "a FleetLens collector" + (" (its HTTP port answers)" if grpc else "")
        elif use.component == "gateway":
            if "fleetlens_gateway_" in httpx.get(base + "/metrics", timeout=PROBE_TIMEOUT_S).text:
                return "a FleetLens gateway"
    except httpx.HTTPError:
        return None
    return None


def _probe_other(use: PortUse) -> str | None:
    """A recognisable server of that kind that is not (provably) FleetLens'."""
    import httpx

    base = f"http://{client_host(use.host)}:{use.port}"
    try:
        if use.component == "warehouse" and httpx.get(base + "/ping", timeout=PROBE_TIMEOUT_S).text == "Ok.\n":
            return "a ClickHouse server"
        if use.component == "dashboards" and httpx.get(base + "/_stcore/health", timeout=PROBE_TIMEOUT_S).text == "ok":
            return "a Streamlit app"
        if use.component == "airflow" and httpx.get(base + "/api/v2/monitor/health",
                                                    timeout=PROBE_TIMEOUT_S).status_code == 200:
            return "an Airflow API server"
    except httpx.HTTPError:
        return None
    return None


def check_ports(settings: Settings, *, serving_on: bool, airflow_on: bool) -> list[CheckResult]:
    uses = ports_to_check(settings, serving_on=serving_on, airflow_on=airflow_on)
    results: list[CheckResult] = []
    by_port: dict[int, list[PortUse]] = {}
    for use in uses:
        by_port.setdefault(use.port, []).append(use)
    connections: list | None = None
    connections_read = False
    avoid = {use.port for use in uses}
    for use in uses:
        name = f"port {use.port} ({use.setting})"
        clash = [other for other in by_port[use.port] if other is not use]
        if clash:
            others = ", ".join(o.setting for o in clash)
            results.append(CheckResult(name, "fail", f"{use.setting} and {others} are both {use.port}",
                                       f"give one of them another port: {clash[0].env}=<port>"))
            continue
        error = bind_error(use.host, use.port)
        if error is None:
            results.append(CheckResult(name, "ok", f"{use.host}:{use.port} free for the {use.component}"))
            continue
        if error.errno == errno.EACCES:
            results.append(CheckResult(name, "fail", f"no permission to listen on {use.host}:{use.port} "
                                       "(ports below 1024 need root)", f"set {use.env} to a port above 1023"))
            continue
        if error.errno != errno.EADDRINUSE:
            host_setting = use.setting.rsplit(".", 1)[0] + ".host"
            results.append(CheckResult(name, "fail",
                                       f"cannot listen on {use.host}:{use.port}: {error.strerror or error}",
                                       f"set FLEETLENS_{host_setting.upper().replace('.', '__')} to an address of "
                                       "this machine (127.0.0.1)"))
            continue
        if not connections_read:
            connections, connections_read = _tcp_connections(), True
        holders = _holders(use.port, connections)
        own = next((h for h in holders if h.pid is not None and _is_fleetlens_component(h, use, settings)), None)
        if own is not None:
            results.append(CheckResult(name, "ok", f"in use by a running FleetLens {use.component} "
                                       f"(pid {own.pid}: {_short(own.cmdline, 100)})"))
            continue
        known = [h for h in holders if h.pid is not None]
        answered = None if known else _probe_component(use, settings)
        if answered:
            results.append(CheckResult(name, "ok", f"in use by {answered} on {use.host}:{use.port}"))
            continue
        other = _probe_other(use)
        who = ", ".join(h.describe() for h in holders) or "a process psutil cannot see"
        what = f"{use.host}:{use.port} is already in use by {who}" + (f" — {other}" if other else "")
        if use.component == "gateway" and not use.required:
            what += " (only matters when the gateway runs: serving is off)"
        suggestion = _next_free_port(use.host, use.port, avoid)
        stop = (f"stop pid {', '.join(str(h.pid) for h in known)}" if known
                else f"find the holder with `ss -ltnp 'sport = :{use.port}'` (sudo for other users' processes) "
                     "and stop it")
        move = f"set {use.env}={suggestion if suggestion else '<free port>'} ({use.setting})"
        if use.component == "warehouse":
            move += f" or run `fleetlens up --port {suggestion or '<port>'}`"
            if other == "a ClickHouse server":
                move += "; or use that server: FLEETLENS_WAREHOUSE_URL=http://user:password@host:port/fleetlens"
        results.append(CheckResult(name, "fail" if use.required else "warn", what, f"{stop}, or {move}"))
    return results


# ------------------------------------------------------------------------------------------ warehouse
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> str | None:
    """Why FleetLens could not create/write `path` (a directory), None when it could."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable by this user"
    parent = _nearest_existing(path)
    if not parent.is_dir():
        return f"{parent} is not a directory, so {path} cannot be created"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{path} cannot be created ({parent} is not writable)"


def check_data_dir(settings: Settings) -> CheckResult:
    paths = {"data_dir": settings.data_dir, "collector spool": settings.spool_path}
    if settings.uses_embedded_warehouse:
        paths["warehouse data"] = settings.warehouse_path
    problems = [problem for problem in (_writable(p) for p in paths.values()) if problem]
    if problems:
        return CheckResult("data dir", "fail", "; ".join(problems),
                           "make it writable (chown/chmod) or set FLEETLENS_DATA_DIR (data_dir) to a writable "
                           "directory")
    shown = settings.data_dir.absolute()
    return CheckResult("data dir", "ok", f"{shown} writable" + ("" if shown.exists() else " (created on first start)"))


def _redact(text: str, url: WarehouseURL) -> str:
    secret = url.password.get_secret_value()
    return text.replace(secret, "***") if secret else text


def check_warehouse(settings: Settings) -> CheckResult:
    """The warehouse answers `SELECT 1` and has FleetLens' tables. An external URL must answer; the
    embedded one may be stopped (`fleetlens up` starts it) but must answer if its port does."""
    from .warehouse.client import ping

    url = settings.warehouse
    shown = url.redacted()
    if settings.uses_embedded_warehouse:
        if not ping(url, timeout_s=PROBE_TIMEOUT_S):
            return CheckResult("warehouse", "ok", f"embedded, not running: `fleetlens up` starts it at {shown} "
                               f"with data in {settings.warehouse_path}")
        return _query_warehouse(url, "embedded warehouse running at " + shown)
    return _query_warehouse(url, shown)


def _query_warehouse(url: WarehouseURL, label: str) -> CheckResult:
    env_fix = "FLEETLENS_WAREHOUSE_URL (warehouse_url)"
    unreachable = _tcp_unreachable(url.host, url.port)
    if unreachable:
        return CheckResult("warehouse", "fail", f"cannot reach {label}: {unreachable}",
                           f"start the ClickHouse server at {url.host}:{url.port}, or correct {env_fix}")
    with _quiet_driver():
        return _select_1(url, label, env_fix)


def _tcp_unreachable(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port fails (refused, timed out, unknown host), None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=WAREHOUSE_TIMEOUT_S):
            return None
    except socket.gaierror as error:
        return f"unknown host {host!r} ({error.strerror or error})"
    except TimeoutError:
        return f"no answer from {host}:{port} within {WAREHOUSE_TIMEOUT_S:.0f} s"
    except OSError as error:
        return f"{error.strerror or error} ({host}:{port})"


@contextlib.contextmanager
def _quiet_driver() -> Iterator[None]:
    """clickhouse-connect logs its own errors; doctor reports them in its table instead."""
    logger = logging.getLogger("clickhouse_connect")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _select_1(url: WarehouseURL, label: str, env_fix: str) -> CheckResult:
    from .schema import TABLES
    from .warehouse.client import WarehouseUnavailable, connect, missing_tables

    try:
        client = connect(url, database="default", connect_timeout=WAREHOUSE_TIMEOUT_S,
                         send_receive_timeout=WAREHOUSE_TIMEOUT_S + 1, query_retries=0, compress=False)
    except WarehouseUnavailable as error:
        cause = error.__cause__ or error
        text = _redact(_first_line(str(cause)), url)
        if _auth_error(text):
            return CheckResult("warehouse", "fail", f"{label} refused the credentials: {text}",
                               f"correct the user/password in {env_fix}")
        return CheckResult("warehouse", "fail", f"cannot reach {label}: {text}",
                           f"start the ClickHouse server at {url.host}:{url.port}, or correct {env_fix}")
    try:
        client.query("SELECT 1")
        version = client.server_version
        missing = missing_tables(client, url.database, TABLES)
    except Exception as error:  # noqa: BLE001 - any driver error is the finding
        text = _redact(_first_line(str(error)), url)
        return CheckResult("warehouse", "fail", f"{label} answered but a query failed: {text}",
                           f"check the user's grants and {env_fix}")
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass
    if missing:
        return CheckResult("warehouse", "warn", f"{label} (ClickHouse {version}) answers; database {url.database} "
                           f"lacks {', '.join(missing)}", "run `fleetlens migrate`")
    return CheckResult("warehouse", "ok", f"{label} (ClickHouse {version}): SELECT 1 ok, {len(TABLES)} tables present")


def _first_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _auth_error(text: str) -> bool:
    lowered = text.lower()
    return "authentication" in lowered or "code: 516" in lowered or ("401" in lowered and "unauthorized" in lowered)


# ------------------------------------------------------------------------------------------ machine
def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def check_disk(settings: Settings) -> CheckResult:
    where = _nearest_existing(settings.data_dir)
    try:
        free = shutil.disk_usage(where).free
    except OSError as error:
        return CheckResult("disk", "warn", f"cannot read free space at {where}: {error}")
    detail = f"{_gib(free)} free at {where} (data_dir {settings.data_dir})"
    fix = "free space there, or set FLEETLENS_DATA_DIR (data_dir) to a directory on a larger disk"
    if free < DISK_FAIL_BYTES:
        return CheckResult("disk", "fail", f"{detail}; under {_gib(DISK_FAIL_BYTES)}", fix)
    if free < DISK_WARN_BYTES:
        return CheckResult("disk", "warn", f"{detail}; under {_gib(DISK_WARN_BYTES)}", fix)
    return CheckResult("disk", "ok", detail)


def check_memory(serving_on: bool) -> CheckResult:
    import psutil

    memory = psutil.virtual_memory()
    detail = f"{_gib(memory.available)} available of {_gib(memory.total)}"
    need = MEMORY_WARN_SERVING_BYTES if serving_on else MEMORY_WARN_BYTES
    if memory.available < need:
        why = "the demo's two vLLM replicas take ~3 GB each" if serving_on else "warehouse + collector + dashboards"
        fix = ("close other programs, or start without serving: `fleetlens up --no-serving`" if serving_on
               else "close other programs")
        return CheckResult("memory", "warn", f"{detail}; under {_gib(need)} ({why})", fix)
    return CheckResult("memory", "ok", detail)


def check_cpu() -> CheckResult:
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = total
    load = ""
    try:
        load = " load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return CheckResult("cpu", "info", f"{usable} usable CPU(s) of {total};{load}")


def check_demo_models(settings: Settings) -> CheckResult:
    """Whether `fleetlens up` will reuse the demo models or train them first (~1.5 min on 2 cores)."""
    out = settings.data_dir / "models" / "demo"
    try:
        from .serving.demo_models.make import cache_key, load
    except ImportError as error:
        return CheckResult("demo models", "warn", f"cannot inspect them: {error}", "make venv")
    built = load(out)
    if built is None:
        return CheckResult("demo models", "info", f"not built in {out}: the first `fleetlens up` trains them "
                           "(~1.5 min on 2 cores)", "optional, ahead of time: `fleetlens models make-demo`")
    if built.cache_key != cache_key({"seed": 0}):
        return CheckResult("demo models", "info", f"{out} holds an older build: `fleetlens up` retrains it",
                           "optional, ahead of time: `fleetlens models make-demo`")
    return CheckResult("demo models", "ok", f"cached in {out}")
