"""`fleetlens eval ...`: run the eval suite through the gateway, list its tasks, compare two stored runs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

eval_app = typer.Typer(help="Evals: lm-eval tasks run through the gateway, results in the warehouse.",
                       no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _suite(tasks_dir: Path | None, data_dir: Path | None):
    from .suite import DEFAULT_SUITE, Suite

    return Suite((tasks_dir or DEFAULT_SUITE.tasks_dir).resolve(), (data_dir or DEFAULT_SUITE.data_dir).resolve())


@eval_app.command("tasks")
def tasks_command(
    tasks_dir: Annotated[Optional[Path], typer.Option(help="Task YAML folder (default: the shipped evals/tasks).")]
    = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Data folder of relative data_files (default: evals/data).")]
    = None,
) -> None:
    """List the suite's tasks (evals/tasks/*.yaml) with their data files and item counts."""
    from .suite import EvalConfigError

    suite = _suite(tasks_dir, data_dir)
    try:
        specs = suite.resolve(suite.names()) if suite.names() else []
    except EvalConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    table = Table(title=f"eval tasks ({suite.tasks_dir})")
    for column in ("task", "type", "items", "data", "description"):
        table.add_column(column, justify="right" if column == "items" else "left")
    for spec in specs:
        count = spec.count_items()
        table.add_row(spec.name, spec.output_type, "-" if count is None else f"{count:,}",
                      ", ".join(p.name for p in spec.data_files), spec.description)
    console.print(table)


@eval_app.command("run")
def run_command(
    target: Annotated[str, typer.Option(help="Registry model (or `model` value) the gateway serves.")],
    gateway: Annotated[str, typer.Option(help="Gateway base URL, e.g. http://127.0.0.1:8080.")],
    api_key_file: Annotated[Path, typer.Option(help="File holding the gateway API key (one line).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names (`fleetlens eval tasks`).")]
    = "lookup_easy,lookup_hard",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N items of each task.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the requests and of lm-eval.")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    feature: Annotated[str, typer.Option(help="Feature the requests are attributed to.")] = "eval",
    variant: Annotated[str, typer.Option(help="Variant label stored with the run (e.g. int4).")] = "",
    route: Annotated[str, typer.Option(help="Route label stored with the run (the feature TARGET names).")] = "",
    json_out: Annotated[Optional[Path], typer.Option(help="Also write the result (every item) here.")] = None,
    store: Annotated[bool, typer.Option(help="Store the run in the warehouse (eval_runs, eval_items).")] = True,
    tasks_dir: Annotated[Optional[Path], typer.Option(help="Task YAML folder (default: the shipped evals/tasks).")]
    = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Data folder of relative data_files (default: evals/data).")]
    = None,
    verbose: Annotated[bool, typer.Option(help="Show lm-eval's own log.")] = False,
) -> None:
    """Run the eval suite on TARGET through the gateway; exit 1 unless every item got a result."""
    from .runner import EvalError, ProgressEvent, run_eval
    from .suite import EvalConfigError

    suite = _suite(tasks_dir, data_dir)

    try:
        api_key = api_key_file.read_text().strip()
    except OSError as error:
        err_console.print(f"[red]cannot read the API key file {api_key_file}: {error.strerror}[/red]")
        raise typer.Exit(2) from None
    if not api_key:
        err_console.print(f"[red]the API key file {api_key_file} is empty[/red]")
        raise typer.Exit(2)
    try:
        specs = suite.resolve(tasks)
    except EvalConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None

    client = database = None
    if store:
        client, database = _warehouse()
    if not verbose:
        _quiet()

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[failed]}"), TimeElapsedColumn(), console=console) as progress:
        bars: dict[str, int] = {}
        preparing = progress.add_task(f"loading {len(specs)} task(s)", total=None, failed="")

        def on_event(event: ProgressEvent) -> None:
            if preparing in progress.task_ids:
                progress.remove_task(preparing)
            if event.kind == "start":
                bars[event.task] = progress.add_task(f"{event.task} on {target}", total=event.total, failed="")
            elif event.kind == "item" and event.task in bars:
                progress.advance(bars[event.task])
                if not event.ok:
                    progress.update(bars[event.task], failed="[red]endpoint failed[/red]")
            elif event.kind == "error":
                progress.console.print(f"[red]{event.message}[/red]")

        try:
            result = run_eval(target, gateway, api_key, [s.name for s in specs], limit=limit, seed=seed,
                              client=client, database=database, feature=feature, concurrency=concurrency,
                              variant=variant, route=route, suite=suite, progress=on_event)
        except EvalConfigError as error:
            err_console.print(f"[red]{error}[/red]")
            raise typer.Exit(2) from None
        except EvalError as error:
            err_console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None

    table = Table(title=f"eval run {result.run_id}: {target} ({result.model or 'no answer'})")
    for column in ("task", "status", "items", "accuracy", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column in ("task", "status") else "right")
    for name, task in result.tasks.items():
        accuracy = task.accuracy
        colour = "green" if task.status == "complete" else "red"
        table.add_row(name, f"[{colour}]{task.status}[/{colour}]", f"{task.n_items:,}/{task.n_expected:,}",
                      "-" if accuracy is None else f"{accuracy:.4f}",
                      _ms(task.metrics.get("latency_ms_p50")), _ms(task.metrics.get("latency_ms_p95")))
    console.print(table)
    console.print(f"config {result.config_hash[:12]}  suite {result.suite_hash[:12]}  "
                  f"git {result.git_sha[:12] or '-'}  seed {result.seed}  "
                  + (f"stored in {database or 'the warehouse'}" if store else "not stored"))
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if not result.ok:
        err_console.print(f"[red]run {result.status}: {result.error}[/red]")
        raise typer.Exit(1)


# Exit codes of `fleetlens eval compare` (and of the gate built on it).
EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_INCOMPLETE = 0, 1, 2, 3


@eval_app.command("compare")
def compare_command(
    baseline_run: Annotated[str, typer.Option(help="run_id of the baseline eval run (eval_runs).")],
    candidate_run: Annotated[str, typer.Option(help="run_id of the candidate eval run.")],
    policy: Annotated[Optional[Path], typer.Option(help="Gate policy YAML (default: the shipped evals/gate.yaml).")]
    = None,
    report_out: Annotated[Optional[Path], typer.Option(help="Also write the Markdown report here.")] = None,
    store: Annotated[bool, typer.Option(help="Store the decision in gate_decisions (dashboard's Evals page).")]
    = True,
    baseline_cost: Annotated[Optional[float], typer.Option(help="Baseline cost per request (from telemetry).")]
    = None,
    candidate_cost: Annotated[Optional[float], typer.Option(help="Candidate cost per request (from telemetry).")]
    = None,
    require_cost: Annotated[bool, typer.Option(
        help="Count a missing cost per request as incomplete. Default: eval runs carry no cost, so an "
             "unmeasured cost is reported as 'not measured' and left out of the verdict.")] = False,
    change: Annotated[Optional[list[str]], typer.Option(
        help="What changed between baseline and candidate (repeatable), listed in the report.")] = None,
) -> None:
    """Decide the gate from two stored runs. Exit 0 pass, 1 fail, 3 incomplete, 2 could not decide
    (unknown run id, bad policy file, warehouse unusable).

    Prints the Markdown report, writes it to --report-out and appends it to $GITHUB_STEP_SUMMARY when set.
    """
    from fleetlens.config import ConfigError

    from .compare import UnknownRunError, decide, load_run, render_report, store_decision
    from .policy import load_policy
    from .stats import Verdict

    try:
        gate_policy = load_policy(policy)
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    try:
        client, database = _warehouse()
    except typer.Exit:
        raise typer.Exit(EXIT_ERROR) from None  # 1 would read as a quality fail
    try:
        baseline = load_run(client, database, baseline_run)
        candidate = load_run(client, database, candidate_run)
    except UnknownRunError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    decision = decide(baseline, candidate, gate_policy, cost_per_request=(baseline_cost, candidate_cost),
                      changes=change or [], require_cost=require_cost)
    report = render_report(decision)
    _publish(report, report_out)
    if store:
        try:
            gate_id = store_decision(client, database, decision, baseline_run, candidate_run, report_md=report)
        except Exception as error:  # noqa: BLE001 - the decision stands; say it was not stored
            err_console.print(f"[red]could not store the decision in gate_decisions: {error}[/red]")
            raise typer.Exit(EXIT_ERROR) from None
        console.print(f"stored gate decision {gate_id}")
    raise typer.Exit({Verdict.PASS: EXIT_PASS, Verdict.FAIL: EXIT_FAIL}.get(decision.verdict, EXIT_INCOMPLETE))


@eval_app.command("gate")
def gate_command(
    baseline: Annotated[str, typer.Option(help="Baseline fleet: a git revision, a directory with models.yaml and "
                                               "routes.yaml, or one of those files.")],
    candidate: Annotated[str, typer.Option(help="Candidate fleet, in the same forms (e.g. HEAD, or ./routes.yaml).")],
    models_path: Annotated[Optional[Path], typer.Option(
        help="models.yaml in the repository/working tree (default: gateway.models_file).")] = None,
    routes_path: Annotated[Optional[Path], typer.Option(
        help="routes.yaml in the repository/working tree (default: gateway.routes_file).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Only these tasks (comma-separated).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N items of each task.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the requests and of lm-eval.")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight per run.")] = 4,
    policy: Annotated[Optional[Path], typer.Option(help="Gate policy YAML (default: the shipped evals/gate.yaml).")]
    = None,
    report_out: Annotated[Optional[Path], typer.Option(help="Also write the Markdown report here.")] = None,
    store: Annotated[bool, typer.Option(help="Store the decision in gate_decisions (dashboard's Evals page).")]
    = True,
    require_cost: Annotated[bool, typer.Option(
        help="A cost per request the telemetry cannot give (collector down) makes the gate incomplete.")] = True,
    evaluate: Annotated[Optional[list[str]], typer.Option(
        help="Also evaluate this route or model, changed or not (repeatable); same ref on both sides = A/A check.")]
    = None,
    plan_only: Annotated[bool, typer.Option(help="Print what changed and what would be evaluated; start nothing.")]
    = False,
    work_dir: Annotated[Optional[Path], typer.Option(help="Configs and logs of the gate's processes "
                                                          "(default <data_dir>/gate/<time>).")] = None,
) -> None:
    """Gate a change of models.yaml / routes.yaml: find what changed, start the replicas and a gateway per
    side, run the suite on both through the gateway, judge quality, p95 latency and cost per request by
    the policy. Exit 0 pass, 1 fail, 3 incomplete, 2 could not decide (bad reference or config, fleet did
    not start, warehouse unusable). The report goes to stdout, --report-out and $GITHUB_STEP_SUMMARY."""
    from fleetlens.config import ConfigError, load_settings

    from .gate import GateError, default_work_dir, prepare_gate, store_gate
    from .stats import Verdict

    try:
        settings = load_settings()
        sides, plan, gate_policy = prepare_gate(baseline, candidate, settings, models_path=models_path,
                                                routes_path=routes_path, tasks=tasks, policy=policy,
                                                evaluate=evaluate or ())
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    _print_plan(sides, plan)
    if plan_only:
        raise typer.Exit(EXIT_PASS)
    try:
        client, database = _warehouse()
    except typer.Exit:
        raise typer.Exit(EXIT_ERROR) from None
    try:
        result = run_gate_with_progress(sides, plan, console, policy=gate_policy, client=client, database=database,
                                        settings=settings, work_dir=work_dir or default_work_dir(settings), seed=seed,
                                        limit=limit, concurrency=concurrency, require_cost=require_cost)
    except GateError as error:
        err_console.print(f"[red]the gate could not run: {error}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    _publish(result.report, report_out)
    if store:
        try:
            console.print(f"stored gate decision {store_gate(client, database, result)}")
        except Exception as error:  # noqa: BLE001 - the decision stands; say it was not stored
            err_console.print(f"[red]could not store the decision in gate_decisions: {error}[/red]")
            raise typer.Exit(EXIT_ERROR) from None
    console.print(f"gate {result.verdict} in {result.wall_s:.0f} s (start-up {result.startup_s:.0f} s)")
    raise typer.Exit({Verdict.PASS: EXIT_PASS, Verdict.FAIL: EXIT_FAIL}.get(result.verdict, EXIT_INCOMPLETE))


def run_gate_with_progress(sides, plan, console: Console, **kwargs):
    """`run_gate` under a spinner that shows its current step, each step also printed with the seconds
    since the start (the gate runs for minutes). Raises GateError as `run_gate` does."""
    from .gate import run_gate

    started = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress:
        status = progress.add_task("planning", total=None)

        def on_status(message: str) -> None:
            progress.update(status, description=message)
            progress.console.print(f"[dim]{time.monotonic() - started:6.0f} s[/dim]  {message}")

        return run_gate(*sides, plan, on_status=on_status, **kwargs)


def _print_plan(sides, plan) -> None:
    baseline, candidate = sides
    table = Table(title=f"eval gate: {baseline.label} -> {candidate.label}")
    table.add_column("evaluate")
    table.add_column("tasks")
    table.add_column("why")
    for unit in plan.units:
        table.add_row(unit.title, ", ".join(unit.tasks), unit.why)
    if not plan.units:
        table.add_row("(nothing)", "-", "no change can alter an answer")
    console.print(table)
    for change in plan.changes or ["no change"]:
        console.print(f"  changed: {change}")
    for note in plan.notes:
        console.print(f"  [dim]not gated: {note}[/dim]")


def _publish(report: str, report_out: Path | None) -> None:
    """The Markdown report on the console, in --report-out, and in the GitHub job summary when there is one."""
    from rich.markdown import Markdown

    console.print(Markdown(report))
    if report_out is not None:
        report_out.write_text(report)
        console.print(f"wrote {report_out}")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(report + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _warehouse():
    return warehouse_or_exit(("eval_runs", "eval_items"))


def warehouse_or_exit(tables: tuple[str, ...]):
    """(client, database) of the configured warehouse; exit 2 on bad settings, 1 when it is down or lacks
    one of `tables` (not migrated)."""
    from fleetlens.config import ConfigError, load_settings
    from fleetlens.warehouse.client import WarehouseUnavailable, connect, missing_tables

    try:
        url = load_settings().warehouse
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    try:
        client = connect(url)
        missing = missing_tables(client, url.database, tables)
    except (WarehouseUnavailable, Exception) as error:  # noqa: BLE001 - report, do not crash
        err_console.print(f"[red]cannot use the warehouse at {url.redacted()}: {error}[/red]")
        raise typer.Exit(1) from None
    if missing:
        err_console.print(f"[red]{url.redacted()} has no {', '.join(missing)}: run `fleetlens migrate`[/red]")
        raise typer.Exit(1)
    return client, url.database


def _quiet() -> None:
    """lm-eval and HF datasets log and draw progress bars of their own; the CLI draws one."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("lm_eval", "lm-eval", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


from .replay import replay_command  # noqa: E402 - `fleetlens eval replay` (evals/replay.py)

eval_app.command("replay")(replay_command)
