"""`fleetlens demo` (`make demo`): the whole fleet on this machine, end to end, in one command.

    demo models   train the tiny Llamas once (cached in .cache/demo-models, shared with the tests)
    stack         warehouse + schema, collector, gateway with a small and a large vLLM replica
                  (the committed demo fleet, serving/examples/demo-fleet), Airflow, dashboards
    load          `fleetlens load` of the demo traffic (three customers, two features) for --minutes
    marts         Airflow runs the hourly dbt DAG over the load's hours (models and their tests)
    eval gate     the change in demo-fleet/candidate-int8 (demo-large -> its int8 round-trip) judged
                  on quality, p95 latency and cost per request by `fleetlens eval gate`'s rules
    screenshot    headless Chromium opens the dashboards' overview and saves a PNG (when Chromium
                  is installed) — what a user sees, read back from the page
    summary       URLs, requests, spend, tokens, p95 TTFT, utilization, the gate's verdict

Then it keeps the stack up until Ctrl-C, which stops every process it started. Everything lives in
the data dir (`.fleetlens` by default), so a second run reuses the models, the Airflow database, the
warehouse's data and the keys, and is serving again in about a minute.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import launch
from .config import ConfigError, Settings
from .stack import Stack

REPO = Path(__file__).resolve().parents[1]
FLEET = REPO / "serving" / "examples" / "demo-fleet"
CANDIDATE = FLEET / "candidate-int8"
TRAFFIC = FLEET / "traffic.yaml"
DEMO_MODELS = REPO / ".cache" / "demo-models"  # where the demo fleet's models.yaml points
CUSTOMERS = ("demo", "acme", "globex", "initech")  # "demo": the key `fleetlens eval` uses by default
REPLICAS = {"demo-small-0": "demo-small", "demo-large-0": "demo-large"}
HOURLY_DAG = "fleetlens_hourly"
PHASES = ("demo models", "stack", "load", "marts", "eval gate", "screenshot")


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


@dataclass
class DemoOptions:
    minutes: float = 3.0           # of arrivals; the load ends when the last answer is in
    rate: float | None = None      # requests/s (default: the traffic file's)
    gate: bool = True
    screenshot: bool = True
    json_out: Path | None = None   # the outcome as JSON (tests, scripts)


@dataclass
class DemoOutcome:
    timings_s: dict[str, float] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)          # loadgen's summary["overall"]
    marts: dict[str, Any] = field(default_factory=dict)         # run id, state, tasks, failed tasks
    kpis: dict[str, Any] = field(default_factory=dict)          # the overview's figures, from the marts
    gate: dict[str, Any] = field(default_factory=dict)          # verdict, per-unit and budget lines
    screenshot: dict[str, Any] = field(default_factory=dict)    # path and what the page showed

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, default=str))


class Demo:
    """Runs the phases in order on one `Stack`; the caller stops the stack (Ctrl-C or the end)."""

    def __init__(self, settings: Settings, options: DemoOptions, console: Console) -> None:
        self.settings = settings
        self.options = options
        self.console = console
        self.stack = Stack()
        self.outcome = DemoOutcome()
        self.started = time.monotonic()
        self.api_keys: dict[str, str] = {}  # customer -> key, made with the gateway's files

    # ------------------------------------------------------------------ phases
    def run(self) -> DemoOutcome:
        preflight(self.settings)
        self._phase("demo models", self.build_models)
        self._phase("stack", self.start_stack)
        load_started = datetime.now(timezone.utc)
        self._phase("load", self.drive_load)
        self._phase("marts", lambda: self.build_marts(load_started))
        if self.options.gate:
            self._phase("eval gate", self.run_gate)
        self.outcome.kpis = overview_kpis(self.settings)
        if self.options.screenshot:
            self._phase("screenshot", self.take_screenshot)
        self.outcome.timings_s["total"] = round(time.monotonic() - self.started, 1)
        if self.options.json_out:
            self.outcome.write(self.options.json_out)
        return self.outcome

    def _phase(self, name: str, body: Any) -> None:
        number = PHASES.index(name) + 1
        self.console.rule(f"[bold]{number}/{len(PHASES)} {name}")
        started = time.monotonic()
        body()
        self.outcome.timings_s[name] = round(time.monotonic() - started, 1)
        self.console.print(f"[dim]{name}: {self.outcome.timings_s[name]:.0f} s[/dim]")

    def build_models(self) -> None:
        from .cli import demo_models_bar, demo_models_progress
        from .serving.demo_models import DemoBuildError, make_demo

        try:
            with demo_models_bar(self.console) as bar:
                built = make_demo(DEMO_MODELS, progress=demo_models_progress(bar))
        except DemoBuildError as error:
            raise DemoError(str(error)) from None
        accuracy = {name: entry["accuracy"] for name, entry in built.manifest["models"].items()}
        self.console.print(f"{'reused' if built.cached else 'trained'} {len(accuracy)} demo checkpoints in "
                           f"{built.out_dir}: " + ", ".join(f"{n} {a['hard']:.0%}" for n, a in accuracy.items())
                           + " on the hard lookups")

    def start_stack(self) -> None:
        from .cli import migrate_schema
        from .serving.up import prepare_files

        settings = self.settings
        files = prepare_files(settings, FLEET / "models.yaml", routes=FLEET / "routes.yaml", customers=CUSTOMERS)
        self.api_keys = files.api_keys
        setup = launch.ServingSetup(env=files.env(), replicas=REPLICAS,
                                    key_hint=str(settings.data_dir / "gateway" / "demo-api-key"))
        rows: list[launch.Row] = []
        with self.console.status("starting the embedded warehouse..."):
            rows += launch.start_warehouse(self.stack, settings)
        migrate_schema(settings)
        with self.console.status("starting the collector...") as status:
            rows += launch.start_collector(self.stack, settings)
            status.update("starting the gateway and the replicas...")
            serving = launch.launch_serving(self.stack, settings, setup)
            # Airflow and the dashboards start while vLLM loads. The DAGs start paused, so no scheduled
            # build competes with the load for the CPUs; the demo triggers the hourly build and unpauses it.
            status.update("starting Airflow (API server, scheduler, dag-processor) while the replicas load...")
            others = launch.start_airflow(self.stack, settings,
                                          env={"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True"})
            status.update("starting the dashboards while the replicas load...")
            others += launch.start_dashboards(self.stack, settings)
            rows += serving.wait(on_wait=status.update) + others
        self.outcome.urls = {component: url for component, url, _ in rows}
        table = Table(title="the stack is up")
        for column in ("component", "url", "logs"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def drive_load(self) -> None:
        from .serving import loadgen

        mix = with_keys(loadgen.load_mix(TRAFFIC), self.api_keys)
        planned = loadgen.plan(mix, rate=self.options.rate, duration_s=self.options.minutes * 60)
        self.console.print(f"{len(planned)} requests over {self.options.minutes:g} min "
                           f"({', '.join(c.name for c in mix.customers)}; features "
                           f"{', '.join(f.name for f in mix.features)})")
        records, wall = loadgen.run_with_progress(mix, planned, console=self.console,
                                                  gateway=launch.gateway_url(self.settings))
        summary = loadgen.summarize(records, wall)
        loadgen.render_summary(summary, self.console)
        self.outcome.load = summary["overall"]
        if not summary["overall"]["ok"]:
            raise DemoError(f"no request of the load succeeded; see {launch.logs_dir(self.settings)}/gateway.log")

    def build_marts(self, load_started: datetime) -> None:
        self.outcome.marts = build_marts_with_airflow(self.settings, load_started, self.console)
        if self.outcome.marts["state"] != "success":
            failed = ", ".join(self.outcome.marts["failed"]) or "-"
            raise DemoError(f"the {HOURLY_DAG} run {self.outcome.marts['run_id']} ended {self.outcome.marts['state']} "
                            f"(failed: {failed}); its task logs are in {self.settings.airflow_home / 'logs'}")

    def run_gate(self) -> None:
        try:
            self.outcome.gate = run_demo_gate(self.settings, self.console)
        except (DemoError, ConfigError) as error:  # the fleet is up and the marts built: say so, go on
            self.console.print(f"[red]{error}[/red]")
            self.outcome.gate = {"verdict": "error", "error": str(error),
                                 "change": f"{FLEET.relative_to(REPO)} -> {CANDIDATE.relative_to(REPO)}",
                                 "units": [], "budgets": [], "report": ""}

    def take_screenshot(self) -> None:
        from .dashboards.browser import chromium_path, screenshot_overview

        executable = chromium_path()
        if executable is None:
            self.console.print("[yellow]no Chromium on this machine: no screenshot (apt-get install chromium)[/yellow]")
            return
        out = self.settings.data_dir / "demo" / "overview.png"
        with self.console.status("headless Chromium: opening the overview..."):
            shown = screenshot_overview(self.outcome.urls["dashboards"], out, executable)
        self.outcome.screenshot = {"path": str(out.resolve()), "shown": shown}
        self.console.print(f"saved {out} — the overview shows " + ", ".join(f"{k} {v}" for k, v in shown.items()))


# ---------------------------------------------------------------------- the pieces, importable


def with_keys(mix: Any, keys: dict[str, str]) -> Any:
    """The traffic mix with each customer's key given in memory (the demo's keys live in files under
    <data_dir>/gateway, never in the environment of the processes the demo starts)."""
    customers = [c.model_copy(update={"api_key": keys[c.name], "api_key_env": None}) for c in mix.customers]
    return mix.model_copy(update={"customers": customers})


def preflight(settings: Settings) -> None:
    """Before starting anything: a vLLM to serve with, and every port the stack needs free."""
    from .doctor import bind_error, check_ports, ports_to_check
    from .serving.up import engine_available

    if not engine_available(settings):
        raise DemoError("no vLLM to serve the demo models: run `make serving-venv` (the CPU build in "
                        ".venv-serving) or install `vllm`, or set FLEETLENS_REPLICA__ENGINE_COMMAND")
    uses = ports_to_check(settings, serving_on=True, airflow_on=True)
    results = check_ports(settings, serving_on=True, airflow_on=True)
    taken = [(use, result) for use, result in zip(uses, results) if result.status == "fail"
             or bind_error(use.host, use.port) is not None]
    if taken:
        lines = [f"  port {use.port} ({use.component}): {result.detail}"
                 + (f"; fix: {result.fix}" if result.fix else "; stop that FleetLens first (its Ctrl-C)")
                 for use, result in taken]
        raise DemoError("the demo needs these ports, and they are taken:\n" + "\n".join(lines))


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def build_marts_with_airflow(settings: Settings, since: datetime, console: Console,
                             timeout_s: float = 900.0) -> dict[str, Any]:
    """Trigger the hourly DAG over the hours since `since` (its dbt window), unpause it so the
    scheduler runs it (and every hour after), and follow the run's tasks until it ends."""
    from .orchestration import AirflowAPI

    api = AirflowAPI(settings)
    started = time.monotonic()
    try:
        api.login()
        with console.status("waiting for Airflow's dag-processor to parse the DAGs..."):
            deadline = time.monotonic() + 180
            while api.dag(HOURLY_DAG) is None:
                if time.monotonic() > deadline:
                    raise DemoError(f"Airflow has not parsed {HOURLY_DAG} after 180 s; see "
                                    f"{launch.logs_dir(settings)}/airflow.log")
                time.sleep(2)
        now = datetime.now(timezone.utc)
        interval = (_hour(min(since, now)).isoformat(), (_hour(now) + timedelta(hours=1)).isoformat())
        conf = {"check_freshness": True}
        # The logical date the scheduler would give its next run (the last whole hour): taking it means
        # unpausing does not queue a second build of the same hour behind this one.
        run = api.trigger(HOURLY_DAG, logical_date=(_hour(now) - timedelta(hours=1)).isoformat(),
                          interval=interval, conf=conf)
        if run is None:  # that hour has a run (an earlier demo): a run of its own
            run = api.trigger(HOURLY_DAG, logical_date=now.isoformat(), interval=interval, conf=conf)
        assert run is not None
        run_id = run["dag_run_id"]
        api.set_paused(HOURLY_DAG, False)
        columns = (SpinnerColumn(), TextColumn(f"{HOURLY_DAG} [dim]{run_id}[/dim]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("dbt", total=None, info="queued")
            deadline = time.monotonic() + timeout_s
            while True:
                state = api.run(HOURLY_DAG, run_id)["state"]
                tasks = api.task_states(HOURLY_DAG, run_id)
                done = sum(s in ("success", "skipped", "failed", "upstream_failed") for s in tasks.values())
                running = [t.split(".")[-1] for t, s in tasks.items() if s == "running"]
                bar.update(task, total=len(tasks) or None, completed=done,
                           info=("running " + ", ".join(running[:2])) if running else state)
                if state in ("success", "failed"):
                    break
                if time.monotonic() > deadline:
                    state = "timed out"
                    break
                time.sleep(2)
        failed = sorted(t for t, s in tasks.items() if s in ("failed", "upstream_failed"))
        return {"run_id": run_id, "state": state, "tasks": len(tasks), "failed": failed, "window": list(interval),
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        api.close()


def run_demo_gate(settings: Settings, console: Console) -> dict[str, Any]:
    """`fleetlens eval gate --baseline demo-fleet --candidate demo-fleet/candidate-int8` in this process,
    with its replicas and gateways stopped at the end (or on Ctrl-C); returns the verdict's lines."""
    from .evals.cli import run_gate_with_progress
    from .evals.gate import GateError, default_work_dir, prepare_gate, store_gate
    from .warehouse.client import connect

    sides, plan, policy = prepare_gate(str(FLEET), str(CANDIDATE), settings)
    for change in plan.changes:
        console.print(f"  changed: {change}")
    client, database = connect(settings.warehouse), settings.warehouse.database
    try:
        result = run_gate_with_progress(sides, plan, console, policy=policy, client=client, database=database,
                                        settings=settings, work_dir=default_work_dir(settings))
    except GateError as error:
        raise DemoError(f"the eval gate could not run: {error}") from None
    gate_id = store_gate(client, database, result)
    report = settings.data_dir / "demo" / "gate-report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(result.report)
    units = [f"{u.unit.title}: {u.decision.verdict}" for u in result.units]
    budgets = [f"{b.label}: {b.verdict.verdict}{'' if b.counted else ' (not counted)'}" for b in result.budgets]
    console.print(f"gate [bold]{result.verdict}[/bold] in {result.wall_s:.0f} s — " + "; ".join(units + budgets))
    return {"verdict": str(result.verdict), "gate_id": gate_id, "units": units, "budgets": budgets,
            "report": str(report), "seconds": round(result.wall_s, 1),
            "change": f"{FLEET.relative_to(REPO)} -> {CANDIDATE.relative_to(REPO)}"}


def overview_kpis(settings: Settings) -> dict[str, Any]:
    """Today's overview figures, from the marts, exactly as the dashboards' overview computes them."""
    from .dashboards.filters import Filters
    from .dashboards.queries import overview
    from .dashboards.warehouse import DashboardWarehouse

    today = datetime.now(timezone.utc).date()
    kpis = overview(DashboardWarehouse.from_settings(settings), Filters(start=today, end=today)).kpis
    return {key: (None if value is None else float(value)) for key, value in kpis.items()}


def render_summary(outcome: DemoOutcome, console: Console) -> None:
    from .dashboards import formatting as fmt

    k, load, gate = outcome.kpis, outcome.load, outcome.gate
    table = Table(title="FleetLens demo: what the fleet did (today, from the marts)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("where to look", overflow="fold")
    dashboards = outcome.urls.get("dashboards", "")
    if load:
        table.add_row("load sent", f"{load['requests']:,} requests, {load['errors']:,} errors",
                      f"p95 latency {fmt.ms(load['latency_p95_ms'])}, p95 TTFT {fmt.ms(load['ttft_p95_ms'])} (client side)")
    if k:
        table.add_row("requests served", fmt.count(k["requests"]), dashboards)
        table.add_row("tokens (in + out)", fmt.count((k["input_tokens"] or 0) + (k["output_tokens"] or 0)),
                      f"{fmt.count(k['input_tokens'])} in, {fmt.count(k['output_tokens'])} out")
        table.add_row("spend (GPU bill)", fmt.usd(k["bill_usd"]),
                      f"idle {fmt.usd(k['idle_usd'])}; requests fully loaded {fmt.usd(k['fully_loaded_usd'])}")
        table.add_row("p95 TTFT", fmt.ms(k["p95_ttft_ms"]), f"p95 end to end {fmt.ms(k['p95_e2e_ms'])}")
        table.add_row("fleet utilization", fmt.pct(k["utilization"]), "GPU busy time / time up, all replicas")
    if outcome.marts:
        table.add_row("marts (Airflow)", outcome.marts["state"],
                      f"{HOURLY_DAG} run {outcome.marts['run_id']}: {outcome.marts['tasks']} tasks in "
                      f"{outcome.marts['seconds']:.0f} s")
    if gate:
        table.add_row("eval gate", gate["verdict"].upper(),
                      f"{gate['change']} (demo-large -> its int8 round-trip): " + "; ".join(gate["units"] + gate["budgets"])
                      + (f"; report {gate['report']}" if gate["report"] else ""))
    if outcome.screenshot:
        table.add_row("screenshot", "saved", outcome.screenshot["path"])
    table.add_row("time", f"{outcome.timings_s.get('total', 0):.0f} s",
                  ", ".join(f"{name} {s:.0f} s" for name, s in outcome.timings_s.items() if name != "total"))
    console.print(table)
    urls = Table(title="open")
    urls.add_column("component")
    urls.add_column("url", overflow="fold")
    for component, url in outcome.urls.items():
        if not component.startswith("replica"):
            urls.add_row(component, url)
    console.print(urls)
