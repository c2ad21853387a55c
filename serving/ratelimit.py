"""Per-key rate limits for the gateway: requests/min and tokens/min token buckets, in memory.

Each key has up to two buckets. A bucket holds at most `capacity` tokens (the burst, by
default one minute's worth) and refills continuously at `per_minute / 60` tokens a second.
A request costs 1 from the requests bucket and its token *estimate* from the tokens bucket;
it is allowed only if both can pay, and then both are charged (never one without the other).

Reserve-then-settle, for tokens/min: usage is only known after the response, but the
decision is needed before it. So `check` reserves `prompt_tokens + max_tokens` (an upper
bound for vLLM, whose completion never exceeds max_tokens) and, once usage is known,
`settle(key_id, reserved, actual)` corrects the bucket:
  * actual < reserved: the difference is refunded (never above capacity);
  * actual > reserved (the prompt estimate was low): the difference is charged even if the
    bucket goes negative. The debt makes later requests wait until refill pays it off; it is
    floored at minus one capacity so one bad estimate cannot lock a key out for long.

Bound: in any 60 s window a key gets at most `capacity + per_minute` requests (a full bucket
at the start plus one minute of refill), i.e. `2 * rpm` with the default burst.

Arithmetic is exact: time is integer nanoseconds and a token is `_UNIT` integer units, so a
bucket refills exactly `per_minute` units per nanosecond and no float rounding can let an
extra request through. Memory is bounded: a key whose buckets are full is indistinguishable
from a key never seen, so such keys are dropped by a periodic sweep (invisible to behaviour);
above `max_keys` the least recently used key is dropped as well (it restarts full).

Several gateway replicas need a shared limiter: a Redis-backed class (one Lua script doing
refill+check+charge atomically per key, the same integer state) can implement the `Limiter`
protocol below later; nothing here depends on the in-memory class.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import errors

_NS_PER_S = 10**9
_UNIT = 60 * _NS_PER_S
"""Units per token: a bucket with limit L/min gains exactly L units per nanosecond."""

REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(frozen=True)
class RateLimit:
    """One bucket's configuration: `per_minute` refill, `burst` capacity (default per_minute)."""

    per_minute: int
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.per_minute <= 0 or (self.burst is not None and self.burst <= 0):
            raise ValueError("rate limits must be positive")

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else self.per_minute


@dataclass(frozen=True)
class Limits:
    """A key's limits; None means unlimited on that axis."""

    requests: RateLimit | None = None
    tokens: RateLimit | None = None

    @classmethod
    def per_minute(cls, rpm: int | None = None, tpm: int | None = None) -> Limits:
        """From `keys.yaml`'s `rpm` / `tpm` fields."""
        return cls(RateLimit(rpm) if rpm else None, RateLimit(tpm) if tpm else None)


UNLIMITED = Limits()


@dataclass(frozen=True)
class Decision:
    """The outcome of `check`.

    `retry_after_s` is 0.0 when allowed, the wait until the request would fit when refused,
    or None when it can never fit (token estimate above the bucket's capacity).
    `limit_name` / `remaining` describe the refusing bucket, or when allowed the bucket with
    the least left; both None for a key without limits.
    """

    allowed: bool
    retry_after_s: float | None
    limit_name: str | None
    remaining: int | None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None

    def error_response(self) -> errors.ErrorResponse:
        """The OpenAI-shaped 429 for a refused decision."""
        if self.allowed:
            raise ValueError("the request was allowed; there is no error to send")
        return errors.rate_limit_exceeded(self.limit_name or REQUESTS, self.retry_after_s)


class Limiter(Protocol):
    """What the gateway needs from a limiter (in-memory now, Redis-backed later)."""

    def check(self, key_id: str, now: float | None = None, tokens_estimate: int = 0) -> Decision:
        """Decide, and if allowed reserve 1 request and `tokens_estimate` tokens."""
        ...

    def settle(self, key_id: str, reserved: int, actual: int, now: float | None = None) -> None:
        """Correct a reservation once usage is known (refund or charge the difference)."""
        ...


class _Bucket:
    __slots__ = ("limit", "level", "stamp")

    def __init__(self, limit: RateLimit, now_ns: int) -> None:
        self.limit = limit
        self.level = limit.capacity * _UNIT
        self.stamp = now_ns

    @property
    def cap_units(self) -> int:
        return self.limit.capacity * _UNIT

    def refill(self, now_ns: int) -> None:
        # A clock reading older than the last one (out-of-order callers) adds nothing.
        if now_ns > self.stamp:
            self.level = min(self.cap_units, self.level + (now_ns - self.stamp) * self.limit.per_minute)
            self.stamp = now_ns

    def wait_s(self, cost: int) -> float | None:
        """Seconds until `cost` fits (0.0 now), rounded up to the microsecond; None if never."""
        if cost > self.limit.capacity:
            return None
        need = cost * _UNIT - self.level
        if need <= 0:
            return 0.0
        wait_ns = -(-need // self.limit.per_minute)
        return math.ceil(wait_ns / 1000) / 1e6

    def adjust(self, tokens: int) -> None:
        """Charge (positive) or refund (negative) tokens, within [-capacity, capacity]."""
        self.level = max(-self.cap_units, min(self.cap_units, self.level - tokens * _UNIT))

    @property
    def remaining(self) -> int:
        return max(0, self.level // _UNIT)

    @property
    def full(self) -> bool:
        return self.level >= self.cap_units


class _KeyState:
    __slots__ = ("limits", "buckets")

    def __init__(self, limits: Limits, now_ns: int) -> None:
        self.limits = limits
        self.buckets: dict[str, _Bucket] = {}
        self.reconfigure(limits, now_ns)

    def reconfigure(self, limits: Limits, now_ns: int) -> None:
        """Apply changed limits (keys.yaml reload), keeping what is left, clamped to the new capacity."""
        self.limits = limits
        for name, limit in ((REQUESTS, limits.requests), (TOKENS, limits.tokens)):
            old = self.buckets.pop(name, None)
            if limit is None:
                continue
            bucket = _Bucket(limit, now_ns)
            if old is not None:
                old.refill(now_ns)
                bucket.level = min(old.level, bucket.cap_units)
                bucket.stamp = max(old.stamp, now_ns)
            self.buckets[name] = bucket

    def refill(self, now_ns: int) -> None:
        for bucket in self.buckets.values():
            bucket.refill(now_ns)

    @property
    def full(self) -> bool:
        return all(bucket.full for bucket in self.buckets.values())


class InMemoryLimiter:
    """Token buckets per key in this process. Thread-safe; every call is short and lock-held.

    `limits_for(key_id)` supplies a key's limits on each call, so a reloaded keys.yaml takes
    effect at once. `clock` is a monotonic seconds clock, injectable for tests.
    """

    def __init__(
        self,
        limits_for: Callable[[str], Limits],
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
        sweep_interval_s: float = 60.0,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._limits_for = limits_for
        self._clock = clock
        self._max_keys = max_keys
        self._sweep_interval_ns = int(sweep_interval_s * _NS_PER_S)
        self._states: OrderedDict[str, _KeyState] = OrderedDict()
        self._lock = threading.Lock()
        self._last_sweep_ns: int | None = None
        self.evicted_active = 0
        """Keys dropped while their buckets were not full (only above max_keys); each got a fresh burst."""

    def __len__(self) -> int:
        return len(self._states)

    def _now_ns(self, now: float | None) -> int:
        return round((self._clock() if now is None else now) * _NS_PER_S)

    def _state(self, key_id: str, limits: Limits, now_ns: int) -> _KeyState:
        state = self._states.get(key_id)
        if state is None:
            state = _KeyState(limits, now_ns)
            self._states[key_id] = state
            while len(self._states) > self._max_keys:
                _, dropped = self._states.popitem(last=False)
                dropped.refill(now_ns)
                if not dropped.full:
                    self.evicted_active += 1
        else:
            self._states.move_to_end(key_id)
            if state.limits != limits:
                state.reconfigure(limits, now_ns)
        return state

    def _maybe_sweep(self, now_ns: int) -> None:
        if self._last_sweep_ns is None:
            self._last_sweep_ns = now_ns
        elif now_ns - self._last_sweep_ns >= self._sweep_interval_ns:
            self._last_sweep_ns = now_ns
            self._sweep(now_ns)

    def _sweep(self, now_ns: int) -> int:
        idle = []
        for key_id, state in self._states.items():
            state.refill(now_ns)
            if state.full:
                idle.append(key_id)
        for key_id in idle:
            del self._states[key_id]
        return len(idle)

    def sweep(self, now: float | None = None) -> int:
        """Drop keys whose buckets are full at `now` (no behaviour change); returns how many."""
        with self._lock:
            return self._sweep(self._now_ns(now))

    def check(self, key_id: str, now: float | None = None, tokens_estimate: int = 0) -> Decision:
        if tokens_estimate < 0:
            raise ValueError("tokens_estimate must not be negative")
        limits = self._limits_for(key_id)
        if limits.requests is None and limits.tokens is None:
            return Decision(True, 0.0, None, None)
        with self._lock:
            now_ns = self._now_ns(now)
            self._maybe_sweep(now_ns)
            state = self._state(key_id, limits, now_ns)
            state.refill(now_ns)
            costs = {REQUESTS: 1, TOKENS: tokens_estimate}
            refused: list[tuple[float, str]] = []
            for name, bucket in state.buckets.items():
                wait = bucket.wait_s(costs[name])
                if wait is None:
                    refused.append((math.inf, name))
                elif wait > 0:
                    refused.append((wait, name))
            if not refused:
                for name, bucket in state.buckets.items():
                    bucket.adjust(costs[name])
            remaining = {name: bucket.remaining for name, bucket in state.buckets.items()}
            if refused:
                wait, name = max(refused)
                retry = None if wait == math.inf else wait
                return Decision(
                    False, retry, name, remaining[name], remaining.get(REQUESTS), remaining.get(TOKENS)
                )
            name = min(remaining, key=lambda n: remaining[n] / state.buckets[n].limit.capacity)
            return Decision(True, 0.0, name, remaining[name], remaining.get(REQUESTS), remaining.get(TOKENS))

    def settle(self, key_id: str, reserved: int, actual: int, now: float | None = None) -> None:
        delta = actual - reserved
        if delta == 0:
            return
        limits = self._limits_for(key_id)
        if limits.tokens is None:
            return
        with self._lock:
            now_ns = self._now_ns(now)
            if key_id not in self._states and delta < 0:
                return  # dropped because full; a refund to a full bucket changes nothing
            state = self._state(key_id, limits, now_ns)
            state.refill(now_ns)
            bucket = state.buckets.get(TOKENS)
            if bucket is not None:
                bucket.adjust(delta)

