"""`fleetlens load`: real traffic through the gateway, from a traffic-mix file.

    fleetlens load --mix serving/examples/traffic.yaml --requests 200 --rate 20 \\
        --gateway http://127.0.0.1:8080 [--seed 7] [--json-out run.json]

The mix file (YAML, `TrafficMix` below) names the gateway, the customers (API keys, given literally
or through an environment variable), the product features (prompt style and length, max_tokens,
share of "hard" prompts, share of streamed requests, an optional model), how customers and features
combine, and the arrival process (Poisson at a rate, optional bursts, a request count or a duration).

The request *plan* (`plan()`) is a pure function of the mix and its seed: send times, customer,
feature, prompt text, max_tokens, stream flag. Running it (`run()`) is open-loop: each request is
sent at its planned time whether or not earlier ones have been answered (up to `concurrency` in
flight; a request that waits for a slot is sent late and its lag is recorded). Every request
carries its own W3C `traceparent` (random trace id, sampled); the gateway joins it, so the trace id
of each request is known here and "N requests → N traces" can be checked in the warehouse.

Streamed requests parse server-sent events: TTFT is the time to the first chunk with content, the
token counts come from the usage chunk (the gateway asks upstream for it). Plain requests read
`usage` from the body. A rich progress bar shows sent/done/errors/rps while it runs; a summary table
(latency and TTFT percentiles overall, per feature and per customer; errors by status; tokens/s)
follows, and `--json-out` writes the summary plus one record per request.

Prompt lengths are in *words* (the stub upstream counts whitespace words as tokens; a real
tokenizer makes ~1.3 tokens of an English word). "Hard" prompts contain two of the cascade router's
hard keywords and (by the mix) are longer and ask for more output, so the cascade sends them to the
large model; `plan()` records each request's difficulty score under the default cascade policy.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetlens.config import ConfigError, read_yaml_file

from .loadgen_report import Record, render_summary, summarize
from .registry import DEFAULT_HARD_KEYWORDS, CascadePolicy, RequestFeatures, difficulty

FEATURE_HEADER = "X-FleetLens-Feature"

# --------------------------------------------------------------------------- the mix file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constant(_Strict):
    dist: Literal["constant"] = "constant"
    value: int = Field(ge=0)

    def sample(self, rng: random.Random) -> int:
        return self.value


class Uniform(_Strict):
    """Integers uniformly in [low, high]."""

    dist: Literal["uniform"]
    low: int = Field(ge=0)
    high: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.high < self.low:
            raise ValueError("high must be >= low")
        return self

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class LogNormal(_Strict):
    """Heavy-tailed lengths: `mean` is the distribution's mean (not mu), `sigma` the log-space spread;
    draws are rounded and clipped to [min, max]."""

    dist: Literal["lognormal"]
    mean: float = Field(gt=0)
    sigma: float = Field(ge=0, le=4)
    min: int = Field(1, ge=0)
    max: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LogNormal:
        if self.max < self.min:
            raise ValueError("max must be >= min")
        return self

    def sample(self, rng: random.Random) -> int:
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        return int(min(self.max, max(self.min, round(rng.lognormvariate(mu, self.sigma)))))


Distribution = Annotated[Union[Constant, Uniform, LogNormal], Field(discriminator="dist")]


def _constant(value: Any) -> Any:
    """A bare number is a constant distribution."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"dist": "constant", "value": value}
    return value


class Customer(_Strict):
    name: str = Field(min_length=1)
    api_key: str | None = Field(None, repr=False, description="The key itself (prefer api_key_env).")
    api_key_env: str | None = Field(None, description="Environment variable holding the key.")
    weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _one_key(self) -> Customer:
        if (self.api_key is None) == (self.api_key_env is None):
            raise ValueError("give exactly one of api_key and api_key_env")
        return self

    def key(self) -> str:
        if self.api_key is not None:
            return self.api_key
        assert self.api_key_env is not None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(f"customer {self.name!r}: environment variable {self.api_key_env} is not set")
        return value


class Feature(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:/-]{1,64}$")
    weight: float = Field(1.0, ge=0)
    prompt_style: Literal["question", "document", "fragment", "lookup"] = "question"
    prompt_words: Distribution = Field(default_factory=lambda: Constant(value=30))
    max_tokens: Distribution = Field(default_factory=lambda: Constant(value=64))
    hard_share: float = Field(0.0, ge=0, le=1, description="Share of prompts with hard keywords.")
    hard_prompt_words: Distribution | None = Field(None, description="Prompt length of hard prompts.")
    hard_max_tokens: Distribution | None = Field(None, description="max_tokens of hard prompts.")
    stream_share: float = Field(0.0, ge=0, le=1)
    model: str = Field("auto", min_length=1, description="The body's model: 'auto' lets the route decide.")
    endpoint: Literal["chat", "completions"] = "chat"
    ignore_eos: bool = Field(False, description="vLLM's `ignore_eos`: always generate max_tokens tokens (real decode "
                             "work from models that would stop at once, such as the demo models on prose).")

    _dists = field_validator("prompt_words", "max_tokens", "hard_prompt_words", "hard_max_tokens",
                             mode="before")(_constant)


class Burst(_Strict):
    """`multiplier` x the base rate from `start_s` for `duration_s` seconds of the run."""

    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    multiplier: float = Field(gt=0)


class Arrival(_Strict):
    process: Literal["poisson"] = "poisson"
    rate: float = Field(gt=0, description="Requests per second (base rate).")
    requests: int | None = Field(None, gt=0)
    duration_s: float | None = Field(None, gt=0)
    bursts: list[Burst] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bounded(self) -> Arrival:
        if self.requests is None and self.duration_s is None:
            raise ValueError("give requests or duration_s (or both: whichever ends first)")
        return self


class TrafficMix(_Strict):
    target: str = Field("http://127.0.0.1:8080", description="Gateway base URL.")
    seed: int = 0
    customers: list[Customer] = Field(min_length=1)
    features: list[Feature] = Field(min_length=1)
    mix: dict[str, dict[str, float]] | None = Field(
        None, description="{customer: {feature: weight}}; default: customer weight x feature weight.")
    arrival: Arrival
    timeout_s: float = Field(60.0, gt=0)
    concurrency: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> TrafficMix:
        for kind, names in (("customer", [c.name for c in self.customers]),
                            ("feature", [f.name for f in self.features])):
            dupes = sorted(n for n, count in Counter(names).items() if count > 1)
            if dupes:
                raise ValueError(f"duplicate {kind} names {dupes}")
        if self.mix is not None:
            customers, features = {c.name for c in self.customers}, {f.name for f in self.features}
            for customer, row in self.mix.items():
                if customer not in customers:
                    raise ValueError(f"mix: unknown customer {customer!r} (customers: {sorted(customers)})")
                for feature, weight in row.items():
                    if feature not in features:
                        raise ValueError(f"mix.{customer}: unknown feature {feature!r} (features: {sorted(features)})")
                    if weight < 0:
                        raise ValueError(f"mix.{customer}.{feature}: weight must be >= 0")
        if not any(w > 0 for w in self.pair_weights().values()):
            raise ValueError("every customer x feature weight is 0: nothing to send")
        return self

    def pair_weights(self) -> dict[tuple[str, str], float]:
        """Weight of each (customer, feature) pair."""
        if self.mix is not None:
            return {(c, f): w for c, row in self.mix.items() for f, w in row.items()}
        return {(c.name, f.name): c.weight * f.weight for c in self.customers for f in self.features}

    def customer(self, name: str) -> Customer:
        return next(c for c in self.customers if c.name == name)

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)


def parse_mix(data: Any, *, source: str = "traffic mix") -> TrafficMix:
    """Validate parsed YAML; errors name every bad key (`features[1].prompt_words.sigma: ...`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with customers, features, arrival")
    try:
        return TrafficMix.model_validate(data)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            loc = item["loc"]
            # drop pydantic's union-member tags ("lognormal") from the path; keep list indexes
            parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc
                     if p not in ("constant", "uniform", "lognormal")]
            where = "".join(p if p.startswith("[") else f".{p}" for p in parts).lstrip(".") or "<top>"
            message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
            lines.append(f"  {where}: {message}")
        raise ConfigError(f"invalid traffic mix {source}:\n" + "\n".join(dict.fromkeys(lines))) from None


def load_mix(path: str | Path) -> TrafficMix:
    return parse_mix(read_yaml_file(path, "traffic mix"), source=str(path))


# --------------------------------------------------------------------------- prompts

_WORDS = """
the a an of to in for on with at by from about into over after before between under during
system service customer request response model data cluster region node queue cache latency
budget invoice account order shipment warehouse report summary message ticket user team project
release version feature update change issue question answer document page section table value
price cost rate limit token prompt output input result status error window time day week month
quarter year morning evening team manager engineer analyst partner vendor supplier office store
product catalog inventory payment refund discount subscription plan tier usage metric dashboard
alert incident outage recovery backup storage network server database index query record field
is are was were be has have had will would can could should may might must does did
new old large small fast slow simple clear recent current previous next final main early late
high low good better best quick short long open closed ready pending active stable safe
write read send check review update plan schedule share describe list find show tell help
make keep move start stop run build ship track note record finish include expect need want
please also then still just only very more most less each every some many few other same
green blue north south east west river mountain garden city village market station harbor bridge
coffee bread apple paper window door chair table light music story letter travel weather
""".split()

_HARD_PARTS = {part for keyword in DEFAULT_HARD_KEYWORDS for part in keyword.split()}
VOCABULARY = tuple(sorted({w for w in _WORDS if w not in _HARD_PARTS
                           and not any(k.replace(" ", "") in w for k in DEFAULT_HARD_KEYWORDS)}))
_SINGLE_WORD_HARD = tuple(k for k in DEFAULT_HARD_KEYWORDS if " " not in k and "-" not in k)
_LOOKUP_KEYS = ("customer_id", "order_id", "region", "sku", "account", "status", "invoice", "zone")
_OPENERS = {
    "question": ("Can you help me with this?", "Quick question.", "Hi there.", "I need some help."),
    "document": ("Summarize the following text in a few sentences.", "Give a short summary of this report."),
    "fragment": ("Continue this text:", "Complete the sentence:"),
}


def _sentences(rng: random.Random, words: int) -> str:
    out: list[str] = []
    sentence: list[str] = []
    target = rng.randint(6, 14)
    for _ in range(words):
        sentence.append(rng.choice(VOCABULARY))
        if len(sentence) >= target:
            out.append(" ".join(sentence).capitalize() + ".")
            sentence, target = [], rng.randint(6, 14)
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def make_prompt(rng: random.Random, style: str, words: int, hard: bool) -> str:
    """English-ish text of about `words` words; hard prompts name two hard keywords."""
    if style == "lookup":
        pairs = [f"{rng.choice(_LOOKUP_KEYS)}={rng.randint(1000, 99999)}" for _ in range(max(1, min(words, 6)))]
        text = "lookup " + " ".join(pairs)
    else:
        opener = rng.choice(_OPENERS[style])
        text = f"{opener} {_sentences(rng, max(1, words - len(opener.split())))}"
    if hard:
        first, second = rng.sample(_SINGLE_WORD_HARD, 2)
        text = f"Please {first} and {second} this step by step. " + text
    return text


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    at_s: float  # send time, seconds after the start
    customer: str
    feature: str
    stream: bool
    hard: bool
    endpoint: str
    model: str
    max_tokens: int
    prompt: str
    difficulty: float  # under the default cascade policy (registry.difficulty)
    ignore_eos: bool = False

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "stream": self.stream}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def arrival_times(arrival: Arrival, rng: random.Random, *, requests: int | None = None,
                  duration_s: float | None = None) -> list[float]:
    """Poisson send times (piecewise-constant rate: base x burst multiplier), from 0, until the
    request count or the duration is reached (whichever comes first)."""
    limit_n = requests if requests is not None else arrival.requests
    limit_t = duration_s if duration_s is not None else arrival.duration_s
    if requests is not None and duration_s is None:
        limit_t = None
    if duration_s is not None and requests is None:
        limit_n = None
    edges = sorted({0.0, *(b.start_s for b in arrival.bursts), *(b.start_s + b.duration_s for b in arrival.bursts)})

    def rate_at(t: float) -> float:
        multiplier = 1.0
        for burst in arrival.bursts:
            if burst.start_s <= t < burst.start_s + burst.duration_s:
                multiplier *= burst.multiplier
        return arrival.rate * multiplier

    times: list[float] = []
    t = 0.0
    while limit_n is None or len(times) < limit_n:
        step = rng.expovariate(rate_at(t))
        boundary = next((e for e in edges if e > t), None)
        if boundary is not None and t + step >= boundary:
            t = boundary  # memoryless: restart the draw at the rate change
            continue
        t += step
        if limit_t is not None and t >= limit_t:
            break
        times.append(t)
    return times


def plan(mix: TrafficMix, *, requests: int | None = None, rate: float | None = None,
         duration_s: float | None = None, seed: int | None = None) -> list[PlannedRequest]:
    """The deterministic request plan for `mix` (command-line overrides win over the file)."""
    seed = mix.seed if seed is None else seed
    arrival = mix.arrival.model_copy(update={"rate": rate}) if rate is not None else mix.arrival
    times = arrival_times(arrival, random.Random(f"{seed}:arrivals"), requests=requests, duration_s=duration_s)
    pairs = [(pair, w) for pair, w in mix.pair_weights().items() if w > 0]
    choose = random.Random(f"{seed}:mix")
    content = random.Random(f"{seed}:content")
    policy = CascadePolicy(small="small", large="large")
    chosen = choose.choices([p for p, _ in pairs], weights=[w for _, w in pairs], k=len(times))
    out = []
    for index, (at, (customer, feature_name)) in enumerate(zip(times, chosen)):
        feature = mix.feature(feature_name)
        hard = content.random() < feature.hard_share
        stream = content.random() < feature.stream_share
        words_dist = (feature.hard_prompt_words or feature.prompt_words) if hard else feature.prompt_words
        tokens_dist = (feature.hard_max_tokens or feature.max_tokens) if hard else feature.max_tokens
        words = words_dist.sample(content)
        max_tokens = max(1, tokens_dist.sample(content))
        prompt = make_prompt(content, feature.prompt_style, words, hard)
        score = difficulty(RequestFeatures(prompt_text=prompt, max_tokens=max_tokens), policy)
        out.append(PlannedRequest(index, round(at, 6), customer, feature_name, stream, hard, feature.endpoint,
                                  feature.model, max_tokens, prompt, round(score, 4), feature.ignore_eos))
    return out


# --------------------------------------------------------------------------- running it


@dataclass
class Counters:
    sent: int = 0
    done: int = 0
    errors: int = 0
    started: float = field(default_factory=time.perf_counter)
    recent: list[float] = field(default_factory=list)  # completion times of the last few seconds

    def rps(self, window_s: float = 3.0) -> float:
        now = time.perf_counter()
        self.recent = [t for t in self.recent if now - t <= window_s]
        span = min(window_s, now - self.started) or 1e-9
        return len(self.recent) / span


def new_traceparent() -> tuple[str, str]:
    """A fresh W3C traceparent (random, sampled) and its trace id."""
    trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01", trace_id


def _trace_id_from(header: str | None) -> str | None:
    parts = (header or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


async def _send(client: Any, base: str, item: PlannedRequest, key: str, start: float,
                timeout_s: float) -> Record:
    import httpx

    traceparent, trace_id = new_traceparent()
    headers = {"authorization": f"Bearer {key}", FEATURE_HEADER: item.feature, "traceparent": traceparent}
    record = Record(index=item.index, customer=item.customer, feature=item.feature, stream=item.stream,
                    hard=item.hard, planned_s=item.at_s, trace_id=trace_id, max_tokens=item.max_tokens)
    sent = time.perf_counter()
    record.sent_s = round(sent - start, 6)
    try:
        async with client.stream("POST", base + item.path, json=item.body(), headers=headers,
                                 timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))) as response:
            record.status = response.status_code
            record.trace_id = _trace_id_from(response.headers.get("traceparent")) or trace_id
            record.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                body = await response.aread()
                record.error = _error_message(body)
            elif item.stream:
                await _read_stream(response, record, sent)
            else:
                payload = (await response.aread())
                _read_usage(_json_or_none(payload) or {}, record)
    except httpx.TimeoutException:
        record.status, record.error = 0, "timeout"
    except httpx.HTTPError as error:
        record.status, record.error = 0, f"{type(error).__name__}: {error}"[:200]
    record.latency_s = round(time.perf_counter() - sent, 6)
    return record


async def _read_stream(response: Any, record: Record, sent: float) -> None:
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        event = _json_or_none(data)
        if not isinstance(event, dict):
            continue
        if event.get("error"):
            record.error = str(event["error"])[:200]
        if event.get("usage"):
            _read_usage(event, record)
        if record.ttft_s is None:
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or choice.get("text"):
                    record.ttft_s = round(time.perf_counter() - sent, 6)
                    break
    if not done and record.error is None:
        record.error = "stream ended without [DONE]"


def _read_usage(payload: dict[str, Any], record: Record) -> None:
    usage = payload.get("usage") or {}
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    record.completion_tokens = int(usage.get("completion_tokens") or 0)
    record.model = payload.get("model")


def _json_or_none(data: str | bytes) -> Any:
    import json

    try:
        return json.loads(data)
    except ValueError:
        return None


def _error_message(body: bytes) -> str:
    payload = _json_or_none(body)
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))[:200]
    return body[:200].decode("utf-8", "replace")


async def run(mix: TrafficMix, planned: list[PlannedRequest], *, gateway: str | None = None,
              concurrency: int | None = None, timeout_s: float | None = None,
              counters: Counters | None = None) -> tuple[list[Record], float]:
    """Send the plan open-loop; returns the records (in plan order) and the wall time."""
    import httpx

    base = (gateway or mix.target).rstrip("/")
    limit = concurrency or mix.concurrency
    timeout = timeout_s or mix.timeout_s
    keys = {c.name: c.key() for c in mix.customers}
    counters = counters or Counters()
    slots = asyncio.Semaphore(limit)
    records: list[Record | None] = [None] * len(planned)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
                                 timeout=timeout) as client:
        start = time.perf_counter()
        counters.started = start

        async def one(position: int, item: PlannedRequest) -> None:
            async with slots:
                counters.sent += 1
                record = await _send(client, base, item, keys[item.customer], start, timeout)
            records[position] = record
            counters.done += 1
            counters.recent.append(time.perf_counter())
            if not record.ok:
                counters.errors += 1

        tasks = []
        for position, item in enumerate(planned):
            delay = start + item.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(position, item)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return [r for r in records if r is not None], wall


def run_with_progress(mix: TrafficMix, planned: list[PlannedRequest], *, console: Any = None,
                      progress: bool = True, **kwargs: Any) -> tuple[list[Record], float]:
    """`run()` under a rich progress bar (sent/done/errors/rps), refreshed 5 times a second."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    counters = Counters()

    async def main() -> tuple[list[Record], float]:
        if not progress:
            return await run(mix, planned, counters=counters, **kwargs)
        columns = (TextColumn("[bold]load"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("load", total=len(planned), info="")

            async def refresh() -> None:
                while True:
                    bar.update(task, completed=counters.done,
                               info=f"sent {counters.sent}  errors {counters.errors}  {counters.rps():.1f} req/s")
                    await asyncio.sleep(0.2)

            ticker = asyncio.create_task(refresh())
            try:
                return await run(mix, planned, counters=counters, **kwargs)
            finally:
                ticker.cancel()
                bar.update(task, completed=counters.done,
                           info=f"sent {counters.sent}  errors {counters.errors}")

    return asyncio.run(main())


def write_json(path: str | Path, summary: dict[str, Any], records: list[Record],
               planned: list[PlannedRequest] | None = None) -> None:
    """`{"summary": ..., "requests": [...]}`; each request record also names its planned prompt length."""
    import json

    rows = []
    by_index = {p.index: p for p in planned or []}
    for record in records:
        row = asdict(record)
        item = by_index.get(record.index)
        if item is not None:
            row["prompt_words"] = len(item.prompt.split())
            row["difficulty"] = item.difficulty
        rows.append(row)
    Path(path).write_text(json.dumps({"summary": summary, "requests": rows}, indent=1))


__all__ = ["Arrival", "Counters", "Customer", "Feature", "PlannedRequest", "Record", "TrafficMix",
           "arrival_times", "load_mix", "make_prompt", "parse_mix", "plan", "render_summary", "run",
           "run_with_progress", "summarize", "write_json"]
