"""Production replay: a task built from what a feature's traffic asked and what production answered.

With `gateway.record_content` on, the gateway puts each request's (redacted) prompt and completion on
its upstream span (`chat {model}`, `gen_ai.input.messages` / `gen_ai.output.messages`, see
fleetlens/semconv.py). `build_replay` reads the recorded requests of one feature from the warehouse's
`otel_traces` and writes an lm-eval task that asks a candidate to answer as production did:

    evals/data/replay_<feature>.jsonl    {"id": trace id, "prompt", "answer": production's completion,
                                          "slice": feature, "ts", "model", "kind", "finish_reason", ...}
    evals/tasks/replay_<feature>.yaml    generate_until, exact match against `answer`

What is taken: answered (HTTP 200) requests of the feature since `since`, the most recent `limit`,
whose answering attempt recorded both sides; `/v1/completions` requests with one text prompt, and
`/v1/chat/completions` requests with a single user message (replayed as a text completion of that
message: exactly what the demo models' chat template does; a model with a richer template answered a
templated prompt in production, so expect less agreement). Other requests are counted and skipped.
Repeated prompts keep their most recent answer unless `dedupe=False`. The candidate generates with
greedy decoding up to the longest recorded answer (in tokens) and no stop sequence of its own, so an
answer production ended with end-of-sequence matches when the candidate ends it the same way.

Caveats a reader of the score should know: production's own sampling settings and stop sequences are
not recorded (a production request that sampled at temperature > 0 is not expected to match); the text
is the *redacted* text (masked e-mail addresses and secrets stay masked in prompt and answer).

`fleetlens eval replay --feature chat [--hours 24 | --since 2026-12-01T00:00] [--limit 500]
[--out-dir evals] [--name replay_chat]`; then `fleetlens eval run --tasks replay_chat ...` (with
`--tasks-dir/--data-dir` when written elsewhere than evals/).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from fleetlens import semconv as sc

from .suite import EVALS_DIR, EvalConfigError

COMPLETIONS_SPAN = "POST /v1/completions"
CHAT_SPAN = sc.ROOT_SPAN  # "POST /v1/chat/completions"
DEFAULT_LIMIT = 500
DEFAULT_HOURS = 24.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ReplayError(RuntimeError):
    """Nothing to replay: no requests of the feature, or none with recorded content."""


@dataclass
class ReplayResult:
    task: str
    feature: str
    data_path: Path
    task_path: Path
    items: list[dict[str, Any]]
    requests: int                      # answered requests of the feature in the window
    with_content: int                  # ... whose answer was recorded
    skipped: dict[str, int] = field(default_factory=dict)  # why others were left out
    max_gen_toks: int = 1


def task_name(feature: str) -> str:
    """`replay_<feature>`, with characters a file or task name should not hold made `_`."""
    return "replay_" + (_UNSAFE.sub("_", feature).strip("_") or "feature")


def build_replay(client: Any, feature: str, *, since: dt.datetime | None = None, limit: int = DEFAULT_LIMIT,
                 out_dir: Path = EVALS_DIR, name: str | None = None, database: str | None = None,
                 dedupe: bool = True, now: dt.datetime | None = None) -> ReplayResult:
    """Write `out_dir/data/<name>.jsonl` and `out_dir/tasks/<name>.yaml` from `feature`'s recorded
    requests since `since` (default: the last 24 hours); returns what was written.

    Raises ReplayError when the feature has no answered requests in the window, or none with
    recorded content (record_content off), and EvalConfigError for bad arguments."""
    if not feature or not feature.strip():
        raise EvalConfigError("name the feature to replay (--feature)")
    if limit < 1:
        raise EvalConfigError(f"limit must be at least 1, got {limit}")
    name = name or task_name(feature)
    if _UNSAFE.search(name):
        raise EvalConfigError(f"task name {name!r} may hold letters, digits, '_' and '-' only")
    now = now or dt.datetime.now(dt.UTC)
    since = since or now - dt.timedelta(hours=DEFAULT_HOURS)
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    table = f"{database}.otel_traces" if database else "otel_traces"
    window = {"service": sc.GATEWAY_SERVICE, "feature": feature, "spans": [COMPLETIONS_SPAN, CHAT_SPAN],
              "since": since.astimezone(dt.UTC).replace(tzinfo=None)}
    roots = f"""
        SELECT TraceId, Timestamp, SpanName FROM {table}
        WHERE ServiceName = {{service:String}} AND SpanKind = 'Server' AND SpanName IN {{spans:Array(String)}}
          AND Timestamp >= {{since:DateTime64(9)}} AND SpanAttributes['{sc.FEATURE}'] = {{feature:String}}
          AND SpanAttributes['{sc.HTTP_STATUS_CODE}'] = '200'"""
    requests = int(client.query(f"SELECT count() FROM ({roots})", parameters=window).result_rows[0][0])
    if requests == 0:
        raise ReplayError(f"no answered requests of feature {feature!r} since {since.isoformat()} in {table}: "
                          "nothing to replay (check the feature name and the time window)")
    # the answering attempt's CLIENT span holds the recorded prompt and answer (a failed attempt has no answer)
    joined = f"""
        FROM ({roots}) AS r
        INNER JOIN (
            SELECT TraceId, SpanAttributes FROM {table}
            WHERE ServiceName = {{service:String}} AND SpanKind = 'Client'
              AND startsWith(SpanName, '{sc.UPSTREAM_SPAN_PREFIX}')
              AND Timestamp >= {{since:DateTime64(9)}} - INTERVAL 1 HOUR
              AND mapContains(SpanAttributes, '{sc.OUTPUT_MESSAGES}')
        ) AS u ON u.TraceId = r.TraceId"""
    with_content = int(client.query(f"SELECT uniqExact(r.TraceId) {joined}", parameters=window).result_rows[0][0])
    # the most recent first; more rows than `limit`, as some are skipped (repeats, multi-message chats)
    rows = client.query(f"""
        SELECT r.TraceId, r.Timestamp, r.SpanName, u.SpanAttributes['{sc.INPUT_MESSAGES}'],
               u.SpanAttributes['{sc.OUTPUT_MESSAGES}'], u.SpanAttributes['{sc.USAGE_OUTPUT_TOKENS}'],
               u.SpanAttributes['{sc.RESPONSE_MODEL}'], u.SpanAttributes['{sc.REQUEST_MODEL}']
        {joined}
        ORDER BY r.Timestamp DESC, r.TraceId
        LIMIT 1 BY r.TraceId
        LIMIT {{rows:UInt32}}""", parameters={**window, "rows": min(limit * 4, limit + 100_000)}).result_rows
    if not rows:
        raise ReplayError(
            f"feature {feature!r} has {requests} answered request{'s' if requests != 1 else ''} since "
            f"{since.isoformat()}, but no recorded content: the gateway records prompts and completions only "
            "with `gateway.record_content` on (FLEETLENS_GATEWAY__RECORD_CONTENT=true); turn it on, let traffic "
            "flow, then build the replay task")
    items: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for trace_id, ts, span_name, inputs, outputs, output_tokens, response_model, request_model in rows:
        kind = "chat" if span_name == CHAT_SPAN else "completion"
        prompt, why = _prompt(inputs, kind)
        answer, finish, why_not = _answer(outputs)
        why = why or why_not
        if why is None and dedupe and prompt in seen:
            why = "repeated prompt (the most recent answer is kept)"
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        seen.add(prompt)
        items.append({"id": trace_id, "prompt": prompt, "answer": answer, "slice": feature,
                      "ts": _iso(ts), "model": response_model or request_model, "kind": kind,
                      "finish_reason": finish, "output_tokens": _int(output_tokens)})
        if len(items) == limit:
            break
    if not items:
        raise ReplayError(f"feature {feature!r}: none of the {with_content} recorded requests can be replayed "
                          f"({'; '.join(f'{n} {why}' for why, n in skipped.items())})")
    items.reverse()  # oldest first: a file that grows at the end when rebuilt later
    max_gen_toks = max(1, *(item["output_tokens"] or _rough_tokens(item["answer"]) for item in items))
    data_dir, tasks_dir = out_dir / "data", out_dir / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    data_path, task_path = data_dir / f"{name}.jsonl", tasks_dir / f"{name}.yaml"
    data_path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    task_path.write_text(_task_yaml(name, feature, items, since, now, max_gen_toks))
    return ReplayResult(name, feature, data_path, task_path, items, requests, with_content, skipped, max_gen_toks)


def _task_yaml(name: str, feature: str, items: list[dict[str, Any]], since: dt.datetime, now: dt.datetime,
               max_gen_toks: int) -> str:
    models = sorted({str(i["model"]) for i in items if i["model"]})
    header = (
        f"# Production replay of feature `{feature}`: {len(items)} recorded requests, answer as production did.\n"
        f"# Built by `fleetlens eval replay` on {now.isoformat(timespec='seconds')} from otel_traces since "
        f"{since.isoformat(timespec='seconds')}\n"
        f"# (first {items[0]['ts']}, last {items[-1]['ts']}; answered by {', '.join(models) or 'unknown'}).\n"
        "# Score: exact match of the candidate's greedy completion against the recorded (redacted) answer.\n"
        "# Rebuild rather than edit: the data file is regenerated with the task.\n")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",      # the recorded prompt, as is
        "doc_to_target": "answer",    # production's completion
        "target_delimiter": "",
        # no stop sequence of our own (production's are not recorded): the candidate stops where the
        # model ends the answer, or at the longest recorded answer's length
        "generation_kwargs": {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False}],
        "metadata": {"version": 1.0, "feature": feature},
    }
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _messages(raw: str) -> list[dict[str, Any]] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(m, dict) for m in value) else None


def _text(message: dict[str, Any]) -> str | None:
    parts = message.get("parts")
    if not isinstance(parts, list):
        return None
    texts = [p.get("content") for p in parts if isinstance(p, dict) and p.get("type", "text") == "text"]
    return "".join(texts) if texts and all(isinstance(t, str) for t in texts) else None


def _prompt(raw: str, kind: str) -> tuple[str, str | None]:
    """(prompt, None) or ("", why it cannot be replayed)."""
    messages = _messages(raw)
    if not messages:
        return "", "no recorded prompt (a token-id prompt, or unreadable)"
    if len(messages) != 1:
        return "", ("chat with more than one message" if kind == "chat" else "several prompts in one request")
    if messages[0].get("role", "user") != "user":
        return "", "no user message"
    text = _text(messages[0])
    if not text:
        return "", "empty prompt"
    return text, None


def _answer(raw: str) -> tuple[str, str, str | None]:
    messages = _messages(raw)
    if not messages:
        return "", "", "no recorded answer"
    if len(messages) != 1:
        return "", "", "several answers (n > 1)"
    text = _text(messages[0])
    if text is None:
        return "", "", "no recorded answer"
    return text, str(messages[0].get("finish_reason") or ""), None


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _rough_tokens(text: str) -> int:
    return max(1, len(text) // 3)


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    return str(value)


# --------------------------------------------------------------------------- `fleetlens eval replay`


def replay_command(
    feature: Annotated[str, typer.Option(help="The feature whose recorded requests to replay.")],
    since: Annotated[Optional[dt.datetime], typer.Option(
        help="Requests from this time on (UTC unless it says otherwise); default: --hours back from now.")] = None,
    hours: Annotated[float, typer.Option(min=0.0, help="Look back this many hours (when --since is not given).")]
    = DEFAULT_HOURS,
    limit: Annotated[int, typer.Option(min=1, help="At most this many items (the most recent requests).")]
    = DEFAULT_LIMIT,
    out_dir: Annotated[Path, typer.Option(help="Writes OUT_DIR/data/NAME.jsonl and OUT_DIR/tasks/NAME.yaml.")]
    = EVALS_DIR,
    name: Annotated[Optional[str], typer.Option(help="Task name (default: replay_<feature>).")] = None,
    dedupe: Annotated[bool, typer.Option(help="Keep one item per distinct prompt (its most recent answer).")]
    = True,
) -> None:
    """Build a production-replay task from a feature's recorded requests (needs gateway.record_content).

    Exit codes: 0 written; 1 nothing to replay (no requests, or no recorded content) or the warehouse
    is unusable; 2 bad options or settings."""
    from rich.console import Console

    from .cli import warehouse_or_exit

    console, err = Console(), Console(stderr=True)
    client, database = warehouse_or_exit(("otel_traces",))
    now = dt.datetime.now(dt.UTC)
    start = since if since is not None else now - dt.timedelta(hours=hours)
    try:
        result = build_replay(client, feature, since=start, limit=limit, out_dir=out_dir, name=name,
                              database=database, dedupe=dedupe, now=now)
    except EvalConfigError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    except ReplayError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    except OSError as error:
        err.print(f"[red]cannot write the task under {out_dir}: {error}[/red]")
        raise typer.Exit(2) from None
    except Exception as error:  # noqa: BLE001 - the warehouse query failed: report, do not crash
        err.print(f"[red]cannot read the warehouse: {error}[/red]")
        raise typer.Exit(1) from None
    console.print(f"{result.task}: {len(result.items)} items from {result.requests} answered requests of feature "
                  f"{feature!r} ({result.with_content} with recorded content); max_gen_toks {result.max_gen_toks}")
    for why, count in result.skipped.items():
        console.print(f"  skipped {count}: {why}")
    console.print(f"wrote {result.data_path}\nwrote {result.task_path}")
    extra = "" if out_dir.resolve() == EVALS_DIR else \
        f" --tasks-dir {result.task_path.parent} --data-dir {result.data_path.parent}"
    console.print(f"run it: fleetlens eval run --tasks {result.task} --target MODEL --gateway URL "
                  f"--api-key-file KEY{extra}")
