"""Run the eval suite through the gateway with lm-eval and store every item in the warehouse.

`run_eval(target, base_url, api_key, tasks)` evaluates one target (a registry model, or whatever
`model` the gateway routes) with lm-eval's `local-completions` model class against
`{base_url}/v1/completions`, i.e. *through the FleetLens gateway*: every eval request becomes a
trace like production traffic, attributed to feature `eval` (the `X-FleetLens-Feature: eval`
header, which the gateway prefers over the key's default feature) and carrying its own
`traceparent`, whose trace id is stored with the item, so per-item quality joins the same
telemetry that prices and times production (cost and latency of a target come from the traces).

Likelihood tasks (`output_type: multiple_choice` or `loglikelihood`) go the same way: one
`/v1/completions` request per *item* — every choice of the item as one prompt of a batched prompt
(token ids, `echo: true`, `logprobs: 1`, `max_tokens: 1`, greedy) — and each continuation's
log-likelihood is the sum of its echoed prompt-token logprobs (lm-eval's `parse_logprobs` rule).
Token ids come from the gateway's `/tokenize` (the replica's own tokenizer, `add_special_tokens`
as for a text prompt, so BOS is there like in generation); lm-eval's `tokenizer_backend=remote`
is not used: it needs `/tokenizer_info`, which vLLM serves only with
`--enable-tokenizer-info-endpoint`, and it names no model. So an item is one trace (its trace id
is stored), its latency is that one request's, its tokens that request's usage (prompt tokens of
all its choices; completion tokens: one per choice, the `max_tokens: 1` that echo needs).

Why the request loop is ours: lm-eval's `TemplateAPI.generate_until` raises on the first request
that fails its retries and returns nothing, so an endpoint that dies at item 900 of 1,000 would
lose 899 answers. `GatewayCompletions` subclasses `LocalCompletionsAPI` (same payload: prompt,
model, greedy `temperature: 0`, `max_tokens`, stop sequences, seed) and sends the requests itself:
it times each one, reads its token usage, and when the endpoint fails (after `max_retries`
attempts for 5xx/429/network errors, at once for other 4xx) stops sending. lm-eval still scores
every answer it got (its filters and metrics, `log_samples=True`); items that got no answer are
dropped, the run is stored `incomplete` with the items that finished, and the result says why.
A run is `complete` only when every item of every task was answered and scored. `loglikelihood`
does the same for likelihood requests (a failed /tokenize call counts as the endpoint failing).

Warehouse rows (fleetlens/schema/migrations/0003_evals.sql): one `eval_runs` row per task with
status `running` when the run starts, then the final row (`complete` / `incomplete` / `failed`,
newer `updated_at`; the table is a ReplacingMergeTree on it); one `eval_items` row per answered
item (score, correct, latency, tokens, trace id, slice).

Determinism: greedy decoding (`temperature: 0`), the seed in every request and in lm-eval's
seeds, items in the data files' order (`limit` takes the first N), so the same seed, suite and
target give the same items, answers and scores.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Literal

import httpx

from .stats import p95
from .suite import DEFAULT_SUITE, DEFAULT_TASKS, EvalConfigError, Suite, TaskSpec

log = logging.getLogger(__name__)

FEATURE_HEADER = "X-FleetLens-Feature"
DEFAULT_FEATURE = "eval"
COMPLETIONS_PATH = "/v1/completions"
TOKENIZE_PATH = "/tokenize"
GENERATIVE = "generate_until"
LIKELIHOOD = frozenset({"multiple_choice", "loglikelihood"})
SUPPORTED_OUTPUT_TYPES = (GENERATIVE, "multiple_choice", "loglikelihood")
UNANSWERED_LOGPROB = -1e30
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
REPO = Path(__file__).resolve().parents[1]

Status = Literal["running", "complete", "incomplete", "failed"]


class EvalError(RuntimeError):
    """A run that did not complete; `result` holds what was stored (partial items included)."""

    def __init__(self, message: str, result: RunResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class EvalEndpointError(EvalError):
    """The gateway (or the model behind it) failed; the message says what it answered."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ItemResult:
    task: str
    item_id: str
    doc_id: int
    slice: str
    score: float
    correct: bool
    latency_ms: float
    input_tokens: int
    output_tokens: int
    trace_id: str
    response: str
    target: str
    ts: dt.datetime | None = None  # when the answer came back


@dataclass
class TaskResult:
    task: str
    status: Status
    n_expected: int
    items: list[ItemResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("exact_match", self.metrics.get("acc"))


@dataclass
class RunResult:
    run_id: str
    target: str
    status: Status
    tasks: dict[str, TaskResult]
    config_hash: str
    suite_hash: str
    git_sha: str
    seed: int
    started_at: dt.datetime
    finished_at: dt.datetime
    model: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    def raise_for_status(self) -> RunResult:
        if not self.ok:
            raise EvalError(self.error or f"eval run {self.run_id} is {self.status}", self)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "target": self.target, "model": self.model, "status": self.status,
            "error": self.error, "config_hash": self.config_hash, "suite_hash": self.suite_hash,
            "git_sha": self.git_sha, "seed": self.seed, "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "tasks": {name: {"status": t.status, "n_items": t.n_items, "n_expected": t.n_expected,
                             "metrics": t.metrics,
                             "items": [{"item_id": i.item_id, "slice": i.slice, "score": i.score,
                                        "correct": i.correct, "latency_ms": i.latency_ms,
                                        "input_tokens": i.input_tokens, "output_tokens": i.output_tokens,
                                        "trace_id": i.trace_id} for i in t.items]}
                      for name, t in self.tasks.items()},
        }


@dataclass(frozen=True)
class ProgressEvent:
    """`start` (per task, with its item count), `item` (one answered or failed), `error` (endpoint gave up)."""

    kind: Literal["start", "item", "error"]
    task: str
    total: int = 0
    ok: bool = True
    message: str = ""


Progress = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class _Call:
    """One answered request."""

    text: str
    latency_ms: float
    input_tokens: int
    output_tokens: int
    trace_id: str
    model: str
    finished_at: dt.datetime


# --------------------------------------------------------------------------- the lm-eval model


def _model_class():
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class GatewayCompletions(LocalCompletionsAPI):
        """lm-eval's `local-completions` with FleetLens headers, per-item telemetry and partial results."""

        def __init__(self, *, api_key: str, feature: str, num_concurrent: int, progress: Progress | None,
                     **kwargs: Any) -> None:
            # No lm-eval tokenizer: generate_until sends text prompts, and `loglikelihood` (ours)
            # gets token ids from the gateway's /tokenize itself (see `_tokenize`).
            super().__init__(tokenizer_backend=kwargs.pop("tokenizer_backend", None),
                             tokenized_requests=kwargs.pop("tokenized_requests", False),
                             num_concurrent=num_concurrent, **kwargs)
            self._fl_headers = {"Authorization": f"Bearer {api_key}", FEATURE_HEADER: feature}
            self._fl_progress = progress
            # likelihood requests: token ids from the gateway's /tokenize, cached per text
            self._fl_tokenize_url = self.base_url.removesuffix(COMPLETIONS_PATH) + TOKENIZE_PATH
            self._fl_tokenize_by_model = True  # False: the target is a route; name it by feature instead
            self._fl_tokens: dict[str, list[int]] = {}
            self.calls: dict[tuple[str, int], _Call] = {}
            self.error: str | None = None
            self._abort = threading.Event()
            self._lock = threading.Lock()

        @property
        def header(self) -> dict[str, str]:  # lm-eval's own request paths (likelihood) use this
            return dict(self._fl_headers)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            results: list[str] = [""] * len(requests)

            def send(client: httpx.Client, indices: list[int]) -> None:
                (index,) = indices
                call = self._send(client, requests[index])
                results[index] = call.text
                self._store(requests[index], call)

            self._run_items(requests, [[index] for index in range(len(requests))], send)
            return results

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """One request per item (task, doc): its instances' continuations as one batched prompt."""
            # an unanswered instance keeps a placeholder (finite: lm-eval softmaxes the choices) that
            # lm-eval scores, but `_items` drops its doc: it has no call
            results: list[tuple[float, bool]] = [(UNANSWERED_LOGPROB, False)] * len(requests)
            items: dict[tuple[str, int], list[int]] = {}
            for index, request in enumerate(requests):
                items.setdefault((request.task_name, request.doc_id), []).append(index)

            def send(client: httpx.Client, indices: list[int]) -> None:
                scored, call = self._send_likelihood(client, [requests[i] for i in indices])
                for index, value in zip(indices, scored, strict=True):
                    results[index] = value
                self._store(requests[indices[0]], call)

            self._run_items(requests, list(items.values()), send)
            return results

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            raise EvalConfigError("loglikelihood_rolling (perplexity) tasks are not supported by the runner")

        def _run_items(self, requests: list[Any], items: list[list[int]],
                       send: Callable[[httpx.Client, list[int]], None]) -> None:
            """Send every item (a list of request indices) with `send`, `_concurrent` at a time; the
            first EvalEndpointError stops the rest (recorded in `self.error`, reported once)."""
            totals = Counter(requests[indices[0]].task_name for indices in items)
            for task, total in totals.items():
                self._emit(ProgressEvent("start", task, total=total))
            limits = httpx.Limits(max_connections=self._concurrent, max_keepalive_connections=self._concurrent)
            with httpx.Client(timeout=self.timeout, limits=limits) as client:
                def one(indices: list[int]) -> None:
                    task = requests[indices[0]].task_name
                    if self._abort.is_set():
                        return
                    try:
                        send(client, indices)
                    except EvalEndpointError as error:
                        with self._lock:
                            first = self.error is None
                            if first:
                                self.error = str(error)
                        self._abort.set()
                        self._emit(ProgressEvent("item", task, ok=False))
                        if first:
                            self._emit(ProgressEvent("error", task, message=str(error)))
                        return
                    self._emit(ProgressEvent("item", task))

                if self._concurrent <= 1:
                    for indices in items:
                        one(indices)
                else:
                    with ThreadPoolExecutor(self._concurrent, thread_name_prefix="fleetlens-eval") as pool:
                        list(pool.map(one, items))

        def _store(self, request: Any, call: _Call) -> None:
            with self._lock:
                self.calls[(request.task_name, request.doc_id)] = call

        def _send(self, client: httpx.Client, request: Any) -> _Call:
            context, gen_kwargs = request.args[0], request.args[1]
            # create_message takes a *batch* and returns its first prompt for batch size 1 (given a
            # bare string it would return the string's first character)
            payload = self._create_payload(self.create_message([context]), generate=True,
                                           gen_kwargs=copy.deepcopy(gen_kwargs), seed=self._seed, eos=None)
            trace_id = secrets.token_hex(16)
            body, latency_ms = self._post(client, payload, trace_id, request.task_name)
            try:
                text = body["choices"][0].get("text")
            except (KeyError, IndexError, TypeError, AttributeError):
                raise EvalEndpointError(f"{self.base_url} answered 200 without a completion: "
                                        f"{json.dumps(body)[:300]!r}") from None
            usage = body.get("usage") or {}
            return _Call(text if isinstance(text, str) else "", latency_ms,
                         int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                         trace_id, str(body.get("model") or ""), _now())

        def _send_likelihood(self, client: httpx.Client,
                             requests: list[Any]) -> tuple[list[tuple[float, bool]], _Call]:
            """Score one item's (context, continuation) pairs in one request; [(logprob, is_greedy)]."""
            task = requests[0].task_name
            prompts, spans = [], []
            for request in requests:
                context, continuation = request.args[0], request.args[1]
                context_ids, continuation_ids = self._encode_pair(client, context, continuation, task)
                tokens = (context_ids + continuation_ids)[-self.max_length:]
                start = len(tokens) - len(continuation_ids)
                if start < 1:  # the first token has no logprob: nothing to condition on
                    raise EvalConfigError(f"task {task!r}: a continuation needs a non-empty context")
                prompts.append(tokens)
                spans.append((start, len(tokens)))
            # lm-eval's local-completions likelihood payload (echo, logprobs 1, max_tokens 1, greedy)
            payload = self._create_payload(prompts, generate=False, seed=self._seed)
            trace_id = secrets.token_hex(16)
            body, latency_ms = self._post(client, payload, trace_id, task)
            try:
                choices = sorted(body["choices"], key=lambda c: c["index"])
                scored = [_continuation_logprob(choice["logprobs"], start, end)
                          for choice, (start, end) in zip(choices, spans, strict=True)]
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                raise EvalEndpointError(
                    f"{self.base_url} answered 200 without the echoed prompt logprobs likelihood tasks need "
                    f"(`echo: true` with `logprobs` on /v1/completions; vLLM has them): "
                    f"{json.dumps(body)[:300]!r}") from None
            usage = body.get("usage") or {}
            best = max(range(len(scored)), key=lambda i: scored[i][0])
            return scored, _Call(requests[best].args[1], latency_ms, int(usage.get("prompt_tokens") or 0),
                                 int(usage.get("completion_tokens") or 0), trace_id,
                                 str(body.get("model") or ""), _now())

        def _encode_pair(self, client: httpx.Client, context: str, continuation: str,
                         task: str) -> tuple[list[int], list[int]]:
            """lm-eval's causal `_encode_pair`: trailing spaces of the context go to the continuation;
            the continuation's tokens are those of context + continuation after the context's."""
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            context_ids = self._tokenize(client, context, task)
            whole = self._tokenize(client, context + continuation, task)
            return context_ids, whole[len(context_ids):]

        def _tokenize(self, client: httpx.Client, text: str, task: str) -> list[int]:
            """Token ids of `text` as the target's replica tokenizes a text prompt (special tokens
            included, e.g. BOS), from the gateway's /tokenize; a route target (no registry model of
            that name: 404) is tokenized by its feature's model instead."""
            cached = self._fl_tokens.get(text)
            if cached is not None:
                return cached
            while True:
                by_model = self._fl_tokenize_by_model
                payload: dict[str, Any] = {"prompt": text, "add_special_tokens": True}
                headers = dict(self._fl_headers)
                if by_model:
                    payload["model"] = self.model
                else:
                    headers[FEATURE_HEADER] = self.model
                try:
                    body, _ = self._post(client, payload, "", task, url=self._fl_tokenize_url, headers=headers)
                except _NotFound:
                    if not by_model:
                        raise EvalEndpointError(f"{self._fl_tokenize_url} knows no model or route "
                                                f"{self.model!r} to tokenize with") from None
                    self._fl_tokenize_by_model = False
                    continue
                tokens = body.get("tokens") if isinstance(body, dict) else None
                if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                    raise EvalEndpointError(f"{self._fl_tokenize_url} answered 200 without token ids: "
                                            f"{json.dumps(body)[:300]!r}")
                with self._lock:
                    self._fl_tokens[text] = tokens
                return tokens

        def _post(self, client: httpx.Client, payload: dict[str, Any], trace_id: str, task: str, *,
                  url: str | None = None, headers: dict[str, str] | None = None) -> tuple[Any, float]:
            """POST with retries (5xx, 429, network errors); (JSON body, latency of the answered try).
            `trace_id` (if any) goes out as the request's traceparent. Raises EvalEndpointError when
            the endpoint fails for good (or answers another 4xx), `_NotFound` for a 404 on /tokenize."""
            url = url or self.base_url
            headers = dict(headers or self._fl_headers)
            if trace_id:
                headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
            attempts = max(1, self.max_retries)
            last = ""
            for attempt in range(attempts):
                if attempt:
                    time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
                if self._abort.is_set():
                    raise EvalEndpointError("stopped: another request failed")
                started = time.perf_counter()
                try:
                    response = client.post(url, json=payload, headers=headers)
                except httpx.HTTPError as error:
                    last = f"{type(error).__name__}: {error}"
                    continue
                latency_ms = (time.perf_counter() - started) * 1000
                if response.status_code in RETRY_STATUSES:
                    last = f"HTTP {response.status_code}: {_error_text(response)}"
                    continue
                if response.status_code == 404 and url == self._fl_tokenize_url:
                    raise _NotFound(_error_text(response))
                if response.status_code != 200:
                    raise EvalEndpointError(
                        f"{url} answered HTTP {response.status_code} for model {self.model!r}: "
                        f"{_error_text(response)}")
                try:
                    return response.json(), latency_ms
                except ValueError:
                    raise EvalEndpointError(f"{url} answered 200 without JSON: {response.text[:300]!r}") from None
            raise EvalEndpointError(
                f"{url} failed {attempts} time{'s' if attempts > 1 else ''} for one item of task "
                f"{task!r} (model {self.model!r}); last answer: {last}")

        def _emit(self, event: ProgressEvent) -> None:
            if self._fl_progress is not None:
                self._fl_progress(event)

    return GatewayCompletions


class _NotFound(Exception):
    """/tokenize answered 404 (no such model)."""


def _continuation_logprob(logprobs: dict[str, Any], start: int, end: int) -> tuple[float, bool]:
    """(sum of the echoed prompt tokens' logprobs in [start, end), whether each was the top token).

    `end` is the prompt's length: what the completion generated after it (max_tokens 1) is ignored."""
    values = logprobs["token_logprobs"]
    tops = logprobs.get("top_logprobs") or [None] * len(values)
    if len(values) < end or any(values[i] is None for i in range(start, end)):
        raise ValueError("fewer echoed logprobs than prompt tokens")
    total = float(sum(values[start:end]))
    greedy = all(not top or values[i] >= max(top.values()) for i, top in
                 ((i, tops[i]) for i in range(start, end)))
    return total, greedy


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return response.text[:300]


# --------------------------------------------------------------------------- the run


def run_eval(
    target: str,
    base_url: str,
    api_key: str,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    seed: int = 0,
    client: Any = None,
    database: str | None = None,
    feature: str = DEFAULT_FEATURE,
    concurrency: int = 4,
    max_retries: int = 3,
    timeout_s: float = 120.0,
    variant: str = "",
    route: str = "",
    suite: Suite = DEFAULT_SUITE,
    progress: Progress | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Evaluate `target` on `tasks` through the gateway at `base_url`; store items and aggregates.

    `client`: a clickhouse-connect client for the warehouse (None: nothing is stored), `database`
    its FleetLens database (default: the client's). Returns the RunResult whatever happened at the
    endpoint: `status` is `complete` only when every item was answered; an endpoint failure gives
    `incomplete` with `error` set and the answered items kept (stored). Raises EvalConfigError
    before anything is sent for an unknown task or a missing data file, and EvalError (after
    storing a `failed` row) when lm-eval itself fails.
    """
    if limit is not None and limit < 1:
        raise EvalConfigError(f"limit must be at least 1, got {limit}")
    specs = suite.resolve(tasks)
    unsupported = [f"{s.name} ({s.output_type})" for s in specs if s.output_type not in SUPPORTED_OUTPUT_TYPES]
    if unsupported:
        raise EvalConfigError(f"the runner scores {', '.join(SUPPORTED_OUTPUT_TYPES)} tasks; not supported: "
                              f"{', '.join(unsupported)}")
    suite_hash = suite.suite_hash(specs, limit=limit)
    config_hash = hashlib.sha256(json.dumps({"suite": suite_hash, "target": target}).encode()).hexdigest()
    run_id = run_id or uuid.uuid4().hex
    started = _now()
    store = _Store(client, database)
    expected = {spec.name: _expected_items(spec, limit) for spec in specs}
    params = {"gateway": base_url, "feature": feature, "limit": "" if limit is None else str(limit),
              "suite_hash": suite_hash, "concurrency": str(concurrency), "lm_eval": _lm_eval_version()}
    row = dict(run_id=run_id, started_at=started, target=target, variant=variant, route=route,
               config_hash=config_hash, git_sha=git_sha(), seed=seed)
    for spec in specs:
        store.run_row(**row, task=spec.name, model="", status="running", n_items=0, metrics={},
                      params=params, finished_at=None)

    _go_offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = _model_class()(
        model=target, base_url=base_url.rstrip("/") + COMPLETIONS_PATH, api_key=api_key, feature=feature,
        num_concurrent=concurrency, progress=progress, max_retries=max_retries, seed=seed,
        timeout=int(timeout_s), max_length=4096)
    try:
        with TemporaryDirectory(prefix="fleetlens-eval-tasks-") as include_dir:
            suite.write_include_dir(specs, Path(include_dir))
            manager = TaskManager(include_path=include_dir, include_defaults=False)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=[spec.name for spec in specs], task_manager=manager, limit=limit,
                log_samples=True, num_fewshot=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
                apply_chat_template=False)
    except Exception as error:
        message = f"lm-eval failed: {type(error).__name__}: {error}"
        log.exception("eval run %s failed", run_id)
        for spec in specs:
            store.run_row(**row, task=spec.name, model="", status="failed", n_items=0, metrics={},
                          params={**params, "error": message[:2000]}, finished_at=_now())
        raise EvalError(message) from error

    samples = (output or {}).get("samples") or {}
    aggregates = (output or {}).get("results") or {}
    results: dict[str, TaskResult] = {}
    models: Counter[str] = Counter(call.model for call in lm.calls.values() if call.model)
    model = models.most_common(1)[0][0] if models else ""
    for spec in specs:
        items = _items(spec.name, samples.get(spec.name) or [], lm.calls)
        complete = lm.error is None and len(items) == expected[spec.name]
        task = TaskResult(spec.name, "complete" if complete else "incomplete", expected[spec.name], items)
        task.metrics = _metrics(aggregates.get(spec.name) or {}, items, complete, _primary_metric(spec))
        results[spec.name] = task
        store.items(run_id, items)
    finished = _now()
    status: Status = "complete" if all(t.status == "complete" for t in results.values()) else "incomplete"
    error = lm.error
    if status == "incomplete" and error is None:
        missing = {n: t.n_expected - t.n_items for n, t in results.items() if t.n_items != t.n_expected}
        error = f"items without a result: {missing}"
    for name, task in results.items():
        final_params = {**params, **({"error": error[:2000]} if error and task.status != "complete" else {})}
        store.run_row(**row, task=name, model=model, status=task.status, n_items=task.n_items,
                      metrics=task.metrics, params=final_params, finished_at=finished)
    return RunResult(run_id, target, status, results, config_hash, suite_hash, row["git_sha"], seed, started,
                     finished, model=model, error=error)


def _items(task: str, samples: list[dict[str, Any]], calls: dict[tuple[str, int], _Call]) -> list[ItemResult]:
    items = []
    seen: set[int] = set()
    for sample in samples:  # one per doc and filter: the task's first filter scores the item
        if sample["doc_id"] in seen:
            continue
        seen.add(sample["doc_id"])
        call = calls.get((task, sample["doc_id"]))
        if call is None:  # never answered: the endpoint failed before or at this item
            continue
        doc = sample.get("doc") or {}
        score = _score(sample)
        target = sample.get("target", "")
        arguments = sample.get("arguments") or []
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(arguments):
            target = arguments[target][1]  # a likelihood item: the right choice's continuation
        items.append(ItemResult(
            task=task, item_id=str(doc.get("id", sample["doc_id"])), doc_id=int(sample["doc_id"]),
            slice=str(doc.get("slice") or task), score=score, correct=score >= 1.0,
            latency_ms=round(call.latency_ms, 3), input_tokens=call.input_tokens,
            output_tokens=call.output_tokens, trace_id=call.trace_id, response=call.text,
            target=str(target), ts=call.finished_at))
    return sorted(items, key=lambda i: i.doc_id)


def _score(sample: dict[str, Any]) -> float:
    """The sample's metric value (exact_match, or acc for likelihood tasks), as a number in [0, 1]."""
    for name in ("exact_match", "acc", *sample.get("metrics", ())):
        value = sample.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool):
            return float(value)
    raise EvalError(f"lm-eval sample without a score: keys {sorted(sample)}")


def _primary_metric(spec: TaskSpec) -> str:
    """The task's first metric (what `_score` reads per item): exact_match or acc by default."""
    for entry in spec.config.get("metric_list") or ():
        if isinstance(entry, dict) and isinstance(entry.get("metric"), str):
            return entry["metric"]
    return "exact_match" if spec.output_type == GENERATIVE else "acc"


def _metrics(aggregate: dict[str, Any], items: list[ItemResult], complete: bool,
             primary: str = "exact_match") -> dict[str, float]:
    """lm-eval's aggregates (`exact_match,none` -> `exact_match`) for a complete task; for an
    incomplete one the mean over the answered items only (lm-eval's would count unanswered as wrong),
    named after the task's primary metric (`exact_match`, `acc`)."""
    metrics: dict[str, float] = {}
    if complete:
        for key, value in aggregate.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, _, filter_name = key.partition(",")
            metrics[name if filter_name in ("", "none") else f"{name}/{filter_name}"] = float(value)
    elif items:
        metrics[primary] = sum(i.score for i in items) / len(items)
    if items:
        latencies = sorted(i.latency_ms for i in items)
        metrics["latency_ms_p50"] = statistics.median(latencies)
        metrics["latency_ms_p95"] = p95(latencies)
        metrics["output_tokens_mean"] = sum(i.output_tokens for i in items) / len(items)
    return metrics


def _expected_items(spec: TaskSpec, limit: int | None) -> int:
    total = spec.count_items()
    if total is None:
        return -1
    return total if limit is None else min(total, limit)


# --------------------------------------------------------------------------- the warehouse


class _Store:
    """eval_runs / eval_items writes (no-ops without a client)."""

    RUN_COLUMNS = ["run_id", "started_at", "finished_at", "target", "model", "variant", "route", "task",
                   "status", "n_items", "metrics", "config_hash", "git_sha", "seed", "params", "updated_at"]
    ITEM_COLUMNS = ["run_id", "task", "item_id", "ts", "slice", "score", "correct", "latency_ms",
                    "input_tokens", "output_tokens", "trace_id"]

    def __init__(self, client: Any, database: str | None) -> None:
        self.client = client
        self.database = database
        self._last = dt.datetime.min.replace(tzinfo=dt.UTC)

    def _table(self, name: str) -> dict[str, Any]:
        return {"table": name, "database": self.database} if self.database else {"table": name}

    def run_row(self, **row: Any) -> None:
        if self.client is None:
            return
        # updated_at must grow between the rows of one (run_id, task): the latest wins
        updated = max(_now(), self._last + dt.timedelta(milliseconds=1))
        self._last = updated
        row = {**row, "updated_at": updated, "params": {k: str(v) for k, v in row["params"].items()}}
        self.client.insert(data=[[row[c] for c in self.RUN_COLUMNS]], column_names=self.RUN_COLUMNS,
                           **self._table("eval_runs"))

    def items(self, run_id: str, items: list[ItemResult]) -> None:
        if self.client is None or not items:
            return
        now = _now()
        rows = [[run_id, i.task, i.item_id, i.ts or now, i.slice, i.score, int(i.correct), i.latency_ms,
                 i.input_tokens, i.output_tokens, i.trace_id] for i in items]
        self.client.insert(data=rows, column_names=self.ITEM_COLUMNS, **self._table("eval_items"))


# --------------------------------------------------------------------------- helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _go_offline() -> None:
    """lm-eval loads the JSON data through HF `datasets`; nothing may reach the Hub."""
    os.environ.update(OFFLINE_ENV)
    try:  # already imported (a long-lived process): its config was read at import time
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return ""


def git_sha(repo: Path = REPO) -> str:
    """The checkout's commit, read from `.git` without running git ('' when unknown).

    `FLEETLENS_GIT_SHA` (or CI's `GITHUB_SHA`) wins: a CI checkout may have no `.git`.
    """
    for name in ("FLEETLENS_GIT_SHA", "GITHUB_SHA"):
        if os.environ.get(name):
            return os.environ[name].strip()
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        for base in (git, common):
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return ""
