"""Vectorized generation of synthetic gateway requests (`RequestFrame`s), chunk by chunk.

Determinism and chunking: randomness is drawn per *block* of `BLOCK` consecutive requests from a
generator seeded with `(seed, block number)`, and arrivals carry only one float (the running
integrated intensity) from block to block. A chunk is a whole number of blocks, so the requests do
not depend on the chunk size: `generate(..., chunk=4096)` and `chunk=262144` yield the same requests,
only cut differently. Memory stays bounded by the chunk size.

Arrivals are a non-homogeneous Poisson process: unit-rate exponential gaps mapped through the inverse
of the integrated rate Λ(t) (a daily cosine cycle, quieter weekends, see `Traffic`). Load-dependent
latency uses each model's *expected* utilisation at that moment (mean utilisation, from a calibration
sample, times the traffic shape), not the realised queue: that keeps every request independent of
the others, hence vectorizable and chunk-independent, while queueing still grows with load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

from .fleet import Fleet, Traffic, default_fleet
from .tables import FleetTables

BLOCK = 4096
NS_PER_S = 1_000_000_000
DAY_S = 86_400
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
RHO_MAX = 0.97
STAGE_COUNT = 6  # semconv.STAGES order: auth, rate_limit, route, retrieval, prompt_assembly, postprocess
AUTH, RATE_LIMIT, ROUTE, RETRIEVAL, PROMPT_ASSEMBLY, POSTPROCESS = range(STAGE_COUNT)
PREFIX_BLOCK = 16  # vLLM caches prefixes in whole KV blocks

# attempt outcomes
OK, HTTP_5XX, TIMEOUT, REFUSED = 0, 1, 2, 3


@dataclass(frozen=True)
class Outage:
    """A replica unreachable over [start_ns, end_ns): connections refused, scrapes answer up=0. Not a
    restart: the process (and its counters) survive, so no cold start follows."""

    replica: str
    start_ns: int
    end_ns: int


def to_ns(when: datetime | str | int) -> int:
    """Unix nanoseconds from a datetime (naive = UTC), an ISO-8601 string or an int (exact, no floats)."""
    if isinstance(when, int):
        return when
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delta = when - EPOCH
    return (delta.days * DAY_S + delta.seconds) * NS_PER_S + delta.microseconds * 1000


def traffic_shape(t_ns: np.ndarray, traffic: Traffic) -> np.ndarray:
    """Relative arrival rate at `t_ns` (mean 1 over a week): daily cosine × weekday/weekend level."""
    seconds = t_ns // NS_PER_S
    hour = (seconds % DAY_S) / 3600.0
    daily = 1.0 + traffic.daily_amplitude * np.cos(2 * np.pi * (hour - traffic.peak_hour_utc) / 24.0)
    weekday = (seconds // DAY_S + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    level = np.where(weekday >= 5, traffic.weekend_factor, 1.0) * 7.0 / (5.0 + 2.0 * traffic.weekend_factor)
    return daily * level


class ArrivalClock:
    """Maps integrated intensity (expected arrivals since start) to seconds since start.

    Λ is tabulated per minute (the rate is constant within a minute), one UTC-free day of knots at a
    time, and extended only when needed, so durations need not be known in advance.
    """

    STEP_S = 60

    def __init__(self, start_ns: int, rate: float, traffic: Traffic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.start_ns, self.rate, self.traffic = start_ns, rate, traffic
        self.t = np.zeros(1)
        self.big_lambda = np.zeros(1)

    def _extend(self) -> None:
        steps = DAY_S // self.STEP_S
        t = self.t[-1] + self.STEP_S * np.arange(1, steps + 1, dtype=float)
        mid_ns = self.start_ns + ((t - self.STEP_S / 2) * NS_PER_S).astype(np.int64)
        increments = self.rate * self.STEP_S * traffic_shape(mid_ns, self.traffic)
        self.t = np.concatenate([self.t, t])
        self.big_lambda = np.concatenate([self.big_lambda, self.big_lambda[-1] + np.cumsum(increments)])

    def seconds(self, big_lambda: np.ndarray) -> np.ndarray:
        while self.big_lambda[-1] < big_lambda[-1]:
            self._extend()
        return np.interp(big_lambda, self.big_lambda, self.t)


class OutagePlan:
    """Replica outage windows: explicit ones, or drawn per (UTC day, replica) from the seed."""

    def __init__(self, seed: int, tables: FleetTables, explicit: Sequence[Outage] | None) -> None:
        self.seed, self.tables = seed, tables
        self.explicit = None if explicit is None else [
            (tables.replicas.index(o.replica), o.start_ns, o.end_ns) for o in explicit]
        self._days: dict[int, list[tuple[int, int, int]]] = {}

    def _day(self, day: int) -> list[tuple[int, int, int]]:
        if day not in self._days:
            fleet = self.tables.fleet
            out = []
            for r in range(len(self.tables.replicas)):
                rng = np.random.default_rng([self.seed, 0x07A6E, day, r])
                for _ in range(int(rng.poisson(fleet.outages_per_replica_day))):
                    start = day * DAY_S * NS_PER_S + int(rng.integers(0, DAY_S * NS_PER_S))
                    median, sigma = fleet.outage_minutes
                    length = int(60 * NS_PER_S * median * math.exp(sigma * rng.standard_normal()))
                    out.append((r, start, start + max(length, 30 * NS_PER_S)))
            self._days[day] = out
        return self._days[day]

    def windows(self, t0_ns: int, t1_ns: int) -> list[tuple[int, int, int]]:
        """(replica code, start, end) of every window overlapping [t0, t1]."""
        if self.explicit is not None:
            candidates = self.explicit
        else:
            first, last = t0_ns // (DAY_S * NS_PER_S) - 1, t1_ns // (DAY_S * NS_PER_S)
            candidates = [w for d in range(first, last + 1) for w in self._day(d)]
        return sorted(w for w in candidates if w[1] <= t1_ns and w[2] > t0_ns)

    def is_down(self, replica: np.ndarray, t_ns: np.ndarray) -> np.ndarray:
        down = np.zeros(len(replica), dtype=bool)
        if len(replica):
            for r, a, b in self.windows(int(t_ns.min()), int(t_ns.max())):
                down |= (replica == r) & (t_ns >= a) & (t_ns < b)
        return down


@dataclass
class RequestFrame:
    """Per-request arrays of one chunk. Times inside a request are µs offsets from its arrival;
    -1 marks an absent stage / attempt. Attempt arrays are (n, max_attempts)."""

    tables: FleetTables
    first_index: int
    trace_id: np.ndarray  # (n, 16) uint8
    span_ids: np.ndarray  # (n, slots, 8) uint8: root, 6 stages, attempts..., llm_request
    vllm_request_id: np.ndarray  # (n, 16) uint8
    arrival_ns: np.ndarray
    customer: np.ndarray
    feature: np.ndarray
    api_key: np.ndarray
    stream: np.ndarray
    status: np.ndarray  # root http.response.status_code
    routed: np.ndarray
    policy: np.ndarray  # -1 when not routed
    variant: np.ndarray
    model: np.ndarray  # routed (first-attempt) model, -1 when not routed
    stage_start_us: np.ndarray  # (n, 6)
    stage_dur_us: np.ndarray  # (n, 6)
    duration_us: np.ndarray  # root span
    documents: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray  # completion tokens (valid where success)
    max_tokens: np.ndarray
    cached_tokens: np.ndarray
    finish: np.ndarray  # FINISH_REASONS code
    temperature: np.ndarray
    top_p: np.ndarray
    attempts: np.ndarray
    att_model: np.ndarray
    att_replica: np.ndarray
    att_outcome: np.ndarray
    att_status: np.ndarray  # 0 = no HTTP response
    att_start_us: np.ndarray
    att_dur_us: np.ndarray
    success: np.ndarray
    # the served request inside vLLM (valid where success; always the last attempt)
    v_start_us: np.ndarray  # vLLM's arrival (the llm_request span start)
    frontend_us: np.ndarray  # API server: tokenization, chat template, hand-off to the engine
    queue_us: np.ndarray
    prefill_us: np.ndarray
    decode_us: np.ndarray
    preemptions: np.ndarray
    load: np.ndarray  # expected utilisation of the served model at arrival
    seed: int = 0

    def __len__(self) -> int:
        return len(self.arrival_ns)

    @property
    def served_replica(self) -> np.ndarray:
        last = np.maximum(self.attempts - 1, 0)
        return np.where(self.success, self.att_replica[np.arange(len(self)), last], -1)

    @property
    def ttft_us(self) -> np.ndarray:
        """vLLM's time to first token: from its arrival, so front-end time + queue + prefill."""
        return self.frontend_us + self.queue_us + self.prefill_us

    @property
    def e2e_us(self) -> np.ndarray:
        return self.ttft_us + self.decode_us

    @property
    def span_count(self) -> int:
        stages = int((self.stage_start_us >= 0).sum())
        return len(self) + stages + int(self.attempts.sum()) + int(self.success.sum())


class _Columns:
    """Hands out the rows of a (k, n) draw matrix one at a time, in a fixed order."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix, self.i = matrix, 0

    def __call__(self) -> np.ndarray:
        row = self.matrix[self.i]
        self.i += 1
        return row


def _lognormal(z: np.ndarray, median: float | np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    return median * np.exp(sigma * z)


def _us(seconds: np.ndarray) -> np.ndarray:
    return np.rint(seconds * 1e6).astype(np.int64)


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Categorical draw: per-row cumulative weights (k,) or (n, k) against uniforms u (n,)."""
    if cum.ndim == 1:
        return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)
    return np.minimum((u[:, None] >= cum).sum(axis=1), cum.shape[1] - 1)


@dataclass
class _Sampled:
    customer: np.ndarray
    feature: np.ndarray
    api_key: np.ndarray
    stream: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    prompt: np.ndarray
    documents: np.ndarray
    output: np.ndarray
    finish: np.ndarray
    max_tokens: np.ndarray
    hit: np.ndarray
    policy: np.ndarray
    variant: np.ndarray
    model: np.ndarray


def _sample(t: FleetTables, u: _Columns, z: _Columns) -> _Sampled:
    """Who calls, with what, routed where: everything that does not depend on time or load."""
    customer = _pick(t.customer_cum, u())
    feature = _pick(t.customer_feature_cum[customer], u())
    api_key = t.key_offset[customer] + np.minimum((u() * t.key_count[customer]).astype(np.int64),
                                                  t.key_count[customer] - 1)
    stream = u() < t.stream_share[feature]
    temperature = _pick(t.temperature_cum[feature], u())
    top_p = _pick(t.top_p_cum[feature], u())

    prompt = _lognormal(z(), np.exp(t.prompt_mu[feature]), t.prompt_sigma[feature])
    tail_u, pareto_u = u(), u()
    tail = tail_u < t.tail_share[feature]
    prompt = np.where(tail, prompt * (1.0 - pareto_u) ** (-1.0 / t.tail_alpha[feature]), prompt)
    rag = t.rag[feature]
    documents = np.where(rag, np.clip(np.rint(_lognormal(z(), np.exp(t.docs_mu[feature]), 0.4)), 1, 20), 0)
    prompt = prompt + documents * t.doc_tokens[feature] * np.exp(0.15 * z())
    prompt = np.clip(np.rint(prompt), 8, t.prompt_max[feature]).astype(np.int64)

    target = np.maximum(np.rint(_lognormal(z(), np.exp(t.output_mu[feature]), t.output_sigma[feature])), 1)
    max_tokens = t.max_tokens[feature]
    finish = (target >= max_tokens).astype(np.int8)
    output = np.minimum(target, max_tokens).astype(np.int64)
    hit = np.clip(t.prefix_hit[feature] + 0.2 * z(), 0.0, 0.98)

    model = t.route_model[feature].astype(np.int16)
    policy = np.zeros(len(feature), dtype=np.int8)
    long = (t.route_long_tokens[feature] > 0) & (prompt > t.route_long_tokens[feature])
    premium = ~long & t.route_premium[feature, t.customer_tier[customer]]
    large = t.route_large[feature]
    model = np.where(long | premium, large, model)
    policy = np.where(long, 1, np.where(premium, 2, policy)).astype(np.int8)
    canary = (model == t.route_canary_from[feature]) & (u() < t.route_canary_share[feature])
    model = np.where(canary, t.route_canary[feature], model).astype(np.int16)
    return _Sampled(customer, feature, api_key, stream, temperature, top_p, prompt, documents, output, finish,
                    max_tokens, hit, policy, canary.astype(np.int8), model)


def _vllm_latency(t: FleetTables, s: _Sampled, model: np.ndarray, rho: np.ndarray, u_wait: np.ndarray,
                  u_queue: np.ndarray, u_preempt: np.ndarray, z_sched: np.ndarray, z_prefill: np.ndarray,
                  z_tpot: np.ndarray, z_frontend: np.ndarray) -> tuple[np.ndarray, ...]:
    """vLLM's view of one attempt on `model` at utilisation `rho`, in whole microseconds.

    front end: tokenization/templating (∝ prompt tokens) before the engine queue; queue: a few ms of
    scheduling, plus with probability rho² an exponential wait growing as 1/(1 − rho); prefill:
    uncached prompt tokens (prefix-cache hits in whole 16-token blocks) at the model's prefill rate,
    slowed by interleaved batches; decode: (output − 1) tokens at the per-sequence rate, slowed by
    batch size; a preemption (likelier near saturation and for long sequences) recomputes the prompt.
    Returns (frontend, queue, prefill, decode, cached tokens, preemptions).
    """
    cached = np.minimum(np.floor(s.prompt * s.hit / PREFIX_BLOCK) * PREFIX_BLOCK, s.prompt - 1)
    cached = np.maximum(cached, 0).astype(np.int64)
    wait = np.where(u_wait < rho ** 2, -np.log1p(-u_queue) * t.queue_scale_s[model] / (1 - rho), 0.0)
    queue_s = _lognormal(z_sched, 0.002 * (1 + rho), 0.5) + wait
    prefill_s = (s.prompt - cached) / t.prefill_tok_s[model] * (1 + 0.5 * rho) * np.exp(0.1 * z_prefill) + 0.004
    tpot = (1 + t.batch_slowdown[model] * rho) / t.decode_tok_s[model] * np.exp(0.1 * z_tpot)
    p_preempt = np.minimum(0.5, 0.2 * rho ** 8 * (1 + (s.prompt + s.output) / 4000))
    preempt = (u_preempt < p_preempt).astype(np.int64) + (u_preempt < p_preempt / 10)
    decode_s = (s.output - 1) * tpot + preempt * ((s.prompt + s.output / 2) / t.prefill_tok_s[model]
                                                  + t.queue_scale_s[model])
    frontend = np.maximum(1, _us(_lognormal(z_frontend, 0.0015, 0.4) + s.prompt * 0.8e-6))
    return (frontend, np.maximum(1, _us(queue_s)), np.maximum(1, _us(prefill_s)), np.maximum(0, _us(decode_s)),
            cached, preempt)


U_BASE, Z_BASE, U_PER_ATTEMPT, Z_PER_ATTEMPT = 16, 16, 10, 10


@lru_cache(maxsize=8)
def mean_utilisation(fleet: Fleet, rate: float) -> tuple[float, ...]:
    """Expected utilisation of each model's replicas at the mean rate, from a fixed calibration sample:
    prefill work (uncached prompt tokens / prefill rate) + decode work (output tokens / saturated
    batch throughput), in replica-seconds per second."""
    t = FleetTables.build(fleet)
    rng = np.random.default_rng(20240601)
    n = 65_536
    s = _sample(t, _Columns(rng.random((U_BASE, n))), _Columns(rng.standard_normal((Z_BASE, n))))
    work = (s.prompt * (1 - s.hit)) / t.prefill_tok_s[s.model] + s.output / t.batch_tok_s[s.model]
    per_model = np.bincount(s.model, weights=work, minlength=len(t.models)) / n
    return tuple(float(x) for x in rate * per_model / t.replica_count)


class Synthesizer:
    """One synthetic run: seed, start, length (requests or duration), rate, fleet, outages."""

    def __init__(self, seed: int, start: datetime | str | int, *, n_requests: int | None = None,
                 duration_s: float | None = None, rate: float | None = None, fleet: Fleet | None = None,
                 outages: Sequence[Outage] | None = None) -> None:
        if (n_requests is None) == (duration_s is None):
            raise ValueError("give exactly one of n_requests and duration_s")
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.seed = int(seed)
        self.start_ns = to_ns(start)
        self.n_requests, self.duration_s = n_requests, duration_s
        self.fleet = fleet or default_fleet()
        self.rate = float(rate if rate is not None else self.fleet.traffic.rate)
        self.tables = FleetTables.build(self.fleet)
        self.outages = OutagePlan(self.seed, self.tables, outages)
        self.base_util = np.array(mean_utilisation(self.fleet, self.rate))
        self.attempts_max = self.fleet.errors.max_attempts
        self.slots = 1 + STAGE_COUNT + self.attempts_max + 1

    @property
    def end_ns(self) -> int | None:
        """End of the time window (duration runs only)."""
        return None if self.duration_s is None else self.start_ns + int(round(self.duration_s * NS_PER_S))

    # -- randomness ---------------------------------------------------------------------

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, b])
        gaps = rng.standard_exponential(BLOCK)
        uniforms = rng.random((U_BASE + U_PER_ATTEMPT * self.attempts_max, BLOCK))
        normals = rng.standard_normal((Z_BASE + Z_PER_ATTEMPT * self.attempts_max, BLOCK))
        ids = np.frombuffer(rng.bytes(BLOCK * (32 + 8 * self.slots)), dtype=np.uint8).reshape(BLOCK, -1)
        return gaps, uniforms, normals, ids

    # -- the run ------------------------------------------------------------------------

    def requests(self, chunk: int = 65_536) -> Iterator[RequestFrame]:
        """The run's requests, `chunk` (rounded up to a multiple of BLOCK) at a time."""
        blocks_per_chunk = max(1, -(-chunk // BLOCK))
        clock = ArrivalClock(self.start_ns, self.rate, self.fleet.traffic)
        offset, block, produced = 0.0, 0, 0
        end_ns = self.end_ns
        while True:
            parts = []
            for _ in range(blocks_per_chunk):
                gaps, uniforms, normals, ids = self._block(block)
                big_lambda = offset + np.cumsum(gaps)
                offset = float(big_lambda[-1])
                parts.append((big_lambda, uniforms, normals, ids))
                block += 1
                # stop drawing once the run is covered (the blocks themselves do not change)
                if self.n_requests is not None and produced + len(parts) * BLOCK >= self.n_requests:
                    break
                if end_ns is not None and clock.seconds(big_lambda[-1:])[0] * NS_PER_S >= end_ns - self.start_ns:
                    break
            big_lambda = np.concatenate([p[0] for p in parts])
            arrival = self.start_ns + np.rint(clock.seconds(big_lambda) * NS_PER_S).astype(np.int64)
            n = len(arrival)
            if self.n_requests is not None:
                n = min(n, self.n_requests - produced)
            if end_ns is not None:
                n = min(n, int(np.searchsorted(arrival, end_ns, side="left")))
            if n <= 0:
                return
            frame = self._frame(produced, arrival[:n], np.concatenate([p[1] for p in parts], axis=1)[:, :n],
                                np.concatenate([p[2] for p in parts], axis=1)[:, :n],
                                np.concatenate([p[3] for p in parts])[:n])
            produced += n
            yield frame
            if n < len(arrival):
                return

    def _frame(self, first: int, arrival: np.ndarray, uniforms: np.ndarray, normals: np.ndarray,
               ids: np.ndarray) -> RequestFrame:
        t, fleet, timing = self.tables, self.fleet, self.fleet.timing
        errors = fleet.errors
        n, A = len(arrival), self.attempts_max
        u, z = _Columns(uniforms), _Columns(normals)
        s = _sample(t, u, z)
        shape = traffic_shape(arrival, fleet.traffic)

        auth_failed = u() < errors.auth_failure
        rate_limited = ~auth_failed & (u() < t.rate_limited[s.customer])
        routed = ~auth_failed & ~rate_limited
        gap = max(1, round(timing.gap_us))

        def stage_us(median_sigma: tuple[float, float], extra_ms: np.ndarray | float = 0.0) -> np.ndarray:
            median, sigma = median_sigma
            return np.maximum(1, _us((_lognormal(z(), median, sigma) + extra_ms) / 1e3))

        start = np.full((n, STAGE_COUNT), -1, dtype=np.int64)
        dur = np.full((n, STAGE_COUNT), -1, dtype=np.int64)
        cursor = np.full(n, gap, dtype=np.int64)

        def place(stage: int, present: np.ndarray, duration: np.ndarray) -> None:
            start[:, stage] = np.where(present, cursor, -1)
            dur[:, stage] = np.where(present, duration, -1)
            cursor[:] = np.where(present, cursor + duration + gap, cursor)

        everyone = np.ones(n, dtype=bool)
        place(AUTH, everyone, stage_us(timing.auth_ms))
        place(RATE_LIMIT, ~auth_failed, stage_us(timing.rate_limit_ms))
        place(ROUTE, routed, stage_us(timing.route_ms))
        place(RETRIEVAL, routed & t.rag[s.feature], stage_us(timing.retrieval_ms,
                                                               timing.retrieval_per_doc_ms * s.documents))
        place(PROMPT_ASSEMBLY, routed, stage_us(timing.prompt_assembly_ms,
                                                timing.prompt_assembly_per_1k_tokens_ms * s.prompt / 1e3))

        att_model = np.full((n, A), -1, dtype=np.int16)
        att_replica = np.full((n, A), -1, dtype=np.int16)
        att_outcome = np.full((n, A), -1, dtype=np.int8)
        att_status = np.zeros((n, A), dtype=np.int16)
        att_start = np.full((n, A), -1, dtype=np.int64)
        att_dur = np.full((n, A), -1, dtype=np.int64)
        served = {name: np.zeros(n, dtype=np.int64) for name in
                  ("v_start", "frontend", "queue", "prefill", "decode", "preemptions")}
        served_load = np.zeros(n)
        cached = np.zeros(n, dtype=np.int64)
        success = np.zeros(n, dtype=bool)
        attempts = np.zeros(n, dtype=np.int8)

        active = routed.copy()
        model = s.model.copy()
        local = np.zeros(n, dtype=np.int64)
        prev_outcome = np.full(n, -1, dtype=np.int8)
        for a in range(A):
            u_model, u_replica, u_outcome, u_status, u_queue, u_wait, u_preempt, _, _, _ = (
                u() for _ in range(U_PER_ATTEMPT))
            (z_net_in, z_net_out, z_sched, z_prefill, z_tpot, z_frontend, z_fail, z_backoff, z_timeout,
             _) = (z() for _ in range(Z_PER_ATTEMPT))
            if a == 0:
                count = t.replica_count[model]
                local = np.minimum((u_replica * count).astype(np.int64), count - 1)
                begin = cursor.copy()
            else:
                fb = t.fallback[s.feature, model]
                single = t.replica_count[model] == 1
                use_fb = (fb >= 0) & ((prev_outcome == TIMEOUT) | single | (u_model < errors.fallback_share))
                new_model = np.where(use_fb, fb, model).astype(np.int16)
                count = t.replica_count[new_model]
                fresh = np.minimum((u_replica * count).astype(np.int64), count - 1)
                other = (local + 1 + np.minimum((u_replica * (count - 1)).astype(np.int64),
                                                np.maximum(count - 2, 0))) % count
                local = np.where(use_fb | (count == 1), fresh, other)
                model = np.where(active, new_model, model).astype(np.int16)
                backoff = np.maximum(1, _us(_lognormal(z_backoff, *timing.retry_backoff_ms) / 1e3))
                begin = att_start[:, a - 1] + att_dur[:, a - 1] + backoff
            replica = t.replica_offset[model] + local
            down = self.outages.is_down(replica[active], arrival[active] + begin[active] * 1000)
            is_down = np.zeros(n, dtype=bool)
            is_down[active] = down

            rho = np.minimum(self.base_util[model] * shape, RHO_MAX)
            frontend, queue, prefill, decode, cached_a, preempt = _vllm_latency(
                t, s, model, rho, u_wait, u_queue, u_preempt, z_sched, z_prefill, z_tpot, z_frontend)
            ttft_s = (frontend + queue + prefill) / 1e6

            timeout_us = t.timeout_us[s.feature]
            p5 = errors.upstream_5xx * t.error_multiplier[model]
            outcome = np.where(u_outcome < p5, HTTP_5XX,
                               np.where((u_outcome < p5 + errors.upstream_timeout) | (ttft_s * 1e6 > timeout_us),
                                        TIMEOUT, OK))
            outcome = np.where(is_down, REFUSED, outcome).astype(np.int8)

            net_in = np.maximum(1, _us(_lognormal(z_net_in, *timing.network_ms) / 1e3))
            net_out = np.maximum(1, _us(_lognormal(z_net_out, *timing.network_ms) / 1e3))
            e2e = frontend + queue + prefill + decode
            duration = np.select(
                [outcome == OK, outcome == HTTP_5XX, outcome == TIMEOUT],
                [net_in + e2e + net_out,
                 np.maximum(1, _us(_lognormal(z_fail, *timing.upstream_5xx_ms) / 1e3)),
                 timeout_us + np.maximum(1, _us(_lognormal(z_timeout, 0.3, 0.5) / 1e3))],
                np.maximum(1, _us(_lognormal(z_fail, *timing.connect_refused_ms) / 1e3)))
            status = np.select([outcome == OK, outcome == HTTP_5XX],
                               [200, np.where(u_status < 0.6, 503, 500)], 0)

            att_model[:, a] = np.where(active, model, -1)
            att_replica[:, a] = np.where(active, replica, -1)
            att_outcome[:, a] = np.where(active, outcome, -1)
            att_status[:, a] = np.where(active, status, 0)
            att_start[:, a] = np.where(active, begin, -1)
            att_dur[:, a] = np.where(active, duration, -1)
            attempts += active.astype(np.int8)

            ok = active & (outcome == OK)
            success |= ok
            for name, value in (("v_start", begin + net_in), ("frontend", frontend), ("queue", queue),
                                ("prefill", prefill), ("decode", decode), ("preemptions", preempt)):
                served[name] = np.where(ok, value, served[name])
            cached = np.where(ok, cached_a, cached)
            served_load = np.where(ok, rho, served_load)
            prev_outcome = np.where(active, outcome, prev_outcome).astype(np.int8)
            active = active & (outcome != OK)

        last = np.maximum(attempts.astype(np.int64) - 1, 0)
        rows = np.arange(n)
        attempts_end = att_start[rows, last] + att_dur[rows, last]
        cursor = np.where(routed, attempts_end + gap, cursor)
        place(POSTPROCESS, routed, stage_us(timing.postprocess_ms,
                                            timing.postprocess_per_1k_tokens_ms * s.output / 1e3))
        final_outcome = att_outcome[rows, last]
        status = np.select([auth_failed, rate_limited, success, final_outcome == TIMEOUT], [401, 429, 200, 504], 502)

        return RequestFrame(
            tables=t, first_index=first,
            trace_id=np.ascontiguousarray(ids[:, :16]),
            span_ids=np.ascontiguousarray(ids[:, 32:]).reshape(n, self.slots, 8),
            vllm_request_id=np.ascontiguousarray(ids[:, 16:32]),
            arrival_ns=arrival, customer=s.customer.astype(np.int16), feature=s.feature.astype(np.int16),
            api_key=s.api_key.astype(np.int16), stream=s.stream, status=status.astype(np.int16), routed=routed,
            policy=np.where(routed, s.policy, -1).astype(np.int8),
            variant=np.where(routed, s.variant, -1).astype(np.int8),
            model=np.where(routed, s.model, -1).astype(np.int16),
            stage_start_us=start, stage_dur_us=dur, duration_us=cursor,
            documents=s.documents.astype(np.int64), prompt_tokens=s.prompt, output_tokens=s.output,
            max_tokens=s.max_tokens.astype(np.int64), cached_tokens=cached, finish=s.finish,
            temperature=s.temperature.astype(np.int16), top_p=s.top_p.astype(np.int16),
            attempts=attempts, att_model=att_model, att_replica=att_replica, att_outcome=att_outcome,
            att_status=att_status, att_start_us=att_start, att_dur_us=att_dur, success=success,
            v_start_us=served["v_start"], frontend_us=served["frontend"], queue_us=served["queue"],
            prefill_us=served["prefill"], decode_us=served["decode"],
            preemptions=served["preemptions"].astype(np.int8), load=served_load, seed=self.seed,
        )


def generate(seed: int, start: datetime | str | int, *, n_requests: int | None = None,
             duration_s: float | None = None, rate: float | None = None, fleet: Fleet | None = None,
             chunk: int = 65_536, outages: Sequence[Outage] | None = None) -> Iterator[RequestFrame]:
    """Shorthand for `Synthesizer(...).requests(chunk)`."""
    return Synthesizer(seed, start, n_requests=n_requests, duration_s=duration_s, rate=rate, fleet=fleet,
                       outages=outages).requests(chunk)


__all__ = [
    "BLOCK",
    "HTTP_5XX",
    "OK",
    "REFUSED",
    "TIMEOUT",
    "Outage",
    "RequestFrame",
    "Synthesizer",
    "generate",
    "mean_utilisation",
    "to_ns",
    "traffic_shape",
]
