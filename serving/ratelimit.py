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

Two implementations of the async `Limiter` protocol the gateway awaits:

* `InMemoryLimiter` — this process only (one gateway, or per-replica limits). Its decisions are
  made by the synchronous `check_sync` / `settle_sync` (lock-held, microseconds, never blocking,
  with an injectable clock for tests); the async `check` / `settle` just call them.
* `RedisLimiter` — one budget shared by every gateway replica pointing at the same Redis. The
  same buckets and integer arithmetic run server-side in ONE Lua script per call (EVALSHA via
  redis-py's `register_script`): refill + check + charge of both buckets is atomic, so two
  replicas can never both spend the last token. Time is Redis' own clock (`TIME` inside the
  script, microseconds), so the replicas' clocks do not matter. State per key is one hash
  `<prefix><key id>` with a TTL equal to the time its buckets need to refill completely: an idle
  key disappears exactly when it has become indistinguishable from a key never seen.

Failure policy of `RedisLimiter` (Redis down, slow beyond `timeout_s`, answering an error, or —
in a burst bigger than the connection pool — no free connection within `queue_timeout_s`):
fail OPEN by default — the request is served without a limit check. Rate limits protect
capacity and fairness; they are not what the customer pays for, and the limiter's store going
down must not take the whole serving tier down with it. Every check or settlement made without
Redis is counted in `RedisLimiter.errors_total` and reported in a warning at most once per
`error_log_interval_s` (the URL is logged without its password). After a failure Redis is left
alone for `backoff_s` (requests do not each wait out a timeout on a dead server), then tried
again. Operators who prefer to stop serving set `gateway.rate_limit_fail_open: false`: such
requests then get a 503 in OpenAI's error shape with `Retry-After`. A failed *settlement* is
counted and dropped under either policy (the response has already been served).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from . import errors

log = logging.getLogger("fleetlens.gateway.ratelimit")

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
    the least left; both None for a key without limits. `unavailable` marks a refusal because
    the limiter's store could not be reached under the fail-closed policy (a 503, not a 429).
    """

    allowed: bool
    retry_after_s: float | None
    limit_name: str | None
    remaining: int | None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    unavailable: bool = False

    def error_response(self) -> errors.ErrorResponse:
        """The OpenAI-shaped answer for a refused decision: 429, or 503 when the store is down."""
        if self.allowed:
            raise ValueError("the request was allowed; there is no error to send")
        if self.unavailable:
            return errors.error_response(
                503, "The rate limiter is unavailable, so the request was not served. Please retry.",
                "server_error", code="rate_limiter_unavailable",
                headers={"Retry-After": errors.retry_after_header(self.retry_after_s or 1.0)},
            )
        return errors.rate_limit_exceeded(self.limit_name or REQUESTS, self.retry_after_s)


ALLOWED_UNLIMITED = Decision(True, 0.0, None, None)
"""The decision for a key without limits (and for fail-open when the store is down)."""


class Limiter(Protocol):
    """What the gateway awaits from a limiter (`InMemoryLimiter`, `RedisLimiter`)."""

    async def check(self, key_id: str, tokens_estimate: int = 0) -> Decision:
        """Decide, and if allowed reserve 1 request and `tokens_estimate` tokens."""
        ...

    async def settle(self, key_id: str, reserved: int, actual: int) -> None:
        """Correct a reservation once usage is known (refund or charge the difference)."""
        ...


def _decide(waits: dict[str, float | None], remaining: dict[str, int], capacity: dict[str, int]) -> Decision:
    """The decision from each bucket's wait (0.0 fits, None never fits) and what it has left.

    Refused: the bucket with the longest wait (ties: `tokens`), charging nothing. Allowed: the
    bucket with the smallest fraction left. Both limiters build their decisions here.
    """
    refused = [(math.inf if wait is None else wait, name) for name, wait in waits.items() if wait != 0]
    if refused:
        wait, name = max(refused)
        return Decision(False, None if wait == math.inf else wait, name, remaining[name],
                        remaining.get(REQUESTS), remaining.get(TOKENS))
    name = min(remaining, key=lambda n: remaining[n] / capacity[n])
    return Decision(True, 0.0, name, remaining[name], remaining.get(REQUESTS), remaining.get(TOKENS))


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
    effect at once. `clock` is a monotonic seconds clock, injectable for tests. `check_sync` /
    `settle_sync` take an explicit `now` as well; the async `check` / `settle` (the `Limiter`
    protocol) call them with the clock's time — they never block, so there is nothing to await.
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

    async def check(self, key_id: str, tokens_estimate: int = 0) -> Decision:
        return self.check_sync(key_id, tokens_estimate=tokens_estimate)

    async def settle(self, key_id: str, reserved: int, actual: int) -> None:
        self.settle_sync(key_id, reserved, actual)

    def check_sync(self, key_id: str, now: float | None = None, tokens_estimate: int = 0) -> Decision:
        """`check` at time `now` (default: the clock)."""
        if tokens_estimate < 0:
            raise ValueError("tokens_estimate must not be negative")
        limits = self._limits_for(key_id)
        if limits.requests is None and limits.tokens is None:
            return ALLOWED_UNLIMITED
        with self._lock:
            now_ns = self._now_ns(now)
            self._maybe_sweep(now_ns)
            state = self._state(key_id, limits, now_ns)
            state.refill(now_ns)
            costs = {REQUESTS: 1, TOKENS: tokens_estimate}
            waits = {name: bucket.wait_s(costs[name]) for name, bucket in state.buckets.items()}
            if all(wait == 0 for wait in waits.values()):
                for name, bucket in state.buckets.items():
                    bucket.adjust(costs[name])
            remaining = {name: bucket.remaining for name, bucket in state.buckets.items()}
            capacity = {name: bucket.limit.capacity for name, bucket in state.buckets.items()}
            return _decide(waits, remaining, capacity)

    def settle_sync(self, key_id: str, reserved: int, actual: int, now: float | None = None) -> None:
        """`settle` at time `now` (default: the clock)."""
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



# --- Redis ----------------------------------------------------------------------------------

_UNIT_US = 60 * 10**6
"""Units per token in Redis: time there is integer microseconds (`TIME`), so a bucket with limit
L/min gains exactly L units per microsecond. Lua numbers are doubles, exact below 2**53: capacities
up to 150 million tokens stay exact (levels never exceed one capacity either side of zero); larger
capacities are clamped to that, which is as good as unlimited."""

_MAX_EXACT_CAPACITY = 2**53 // _UNIT_US

_SCRIPT = """
-- KEYS[1]: the key's hash {r, rs, t, ts} = level and stamp (microseconds) of the requests and
-- tokens buckets. ARGV: unit, op ('check' | 'settle'), amount (check: the tokens estimate;
-- settle: actual - reserved), requests per_minute, requests capacity, tokens per_minute, tokens
-- capacity (per_minute 0 = no bucket on that axis).
-- Returns {allowed, wait_r, wait_t, remaining_r, remaining_t}: waits in microseconds (0 fits,
-- -1 never fits), remaining in whole tokens (-1 = no bucket).
local unit = tonumber(ARGV[1])
local op = ARGV[2]
local amount = tonumber(ARGV[3])
local pm = {tonumber(ARGV[4]), tonumber(ARGV[6])}
local cap = {tonumber(ARGV[5]) * unit, tonumber(ARGV[7]) * unit}
local fields = {{'r', 'rs'}, {'t', 'ts'}}

local function ceil_div(a, b)  -- exact for integers a >= 0, b >= 1 below 2^53
  local q = math.floor(a / b)
  if q * b < a then q = q + 1 end
  if q > 0 and (q - 1) * b >= a then q = q - 1 end
  return q
end

local stored = redis.call('HMGET', KEYS[1], 'r', 'rs', 't', 'ts')
if op == 'settle' and amount < 0 and not stored[3] then
  return {1, 0, 0, -1, -1}  -- a refund to a full (absent) bucket changes nothing
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local level, stamp = {}, {}
for i = 1, 2 do
  if pm[i] > 0 then
    local l, s = tonumber(stored[2 * i - 1]), tonumber(stored[2 * i])
    if l == nil or s == nil then
      l, s = cap[i], now
    end
    if l >= cap[i] then
      l = cap[i]  -- full, or above a lowered capacity (keys.yaml reload): clamp
    elseif now > s then
      -- an older clock reading (Redis failover) adds nothing; compare before multiplying so a
      -- long idle time cannot leave the exact range
      if now - s > (cap[i] - l) / pm[i] then
        l = cap[i]
      else
        l = math.min(cap[i], l + (now - s) * pm[i])
      end
    end
    if now > s then s = now end
    level[i], stamp[i] = l, s
  end
end

local result = {1, 0, 0, -1, -1}
if op == 'check' then
  local cost = {unit, amount * unit}
  for i = 1, 2 do
    if pm[i] > 0 then
      local wait = 0
      if cost[i] > cap[i] then
        wait = -1
      elseif cost[i] > level[i] then
        wait = ceil_div(cost[i] - level[i], pm[i])
      end
      result[1 + i] = wait
      if wait ~= 0 then result[1] = 0 end
    end
  end
  if result[1] == 1 then
    for i = 1, 2 do
      if pm[i] > 0 then level[i] = level[i] - cost[i] end
    end
  end
elseif pm[2] > 0 then
  -- settle: charge (debt floored at -capacity) or refund (never above capacity)
  level[2] = math.max(-cap[2], math.min(cap[2], level[2] - amount * unit))
end

local full_in = 0
local hset = {}
for i = 1, 2 do
  if pm[i] > 0 then
    result[3 + i] = math.floor(math.max(0, level[i]) / unit)
    if level[i] < cap[i] then
      full_in = math.max(full_in, ceil_div(cap[i] - level[i], pm[i]))
    end
    hset[#hset + 1] = fields[i][1]
    hset[#hset + 1] = string.format('%.0f', level[i])
    hset[#hset + 1] = fields[i][2]
    hset[#hset + 1] = string.format('%.0f', stamp[i])
  elseif stored[2 * i - 1] then
    redis.call('HDEL', KEYS[1], fields[i][1], fields[i][2])  -- that limit was removed
  end
end
if full_in == 0 then
  -- every bucket full: the same as a key never seen
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], unpack(hset))
  redis.call('PEXPIRE', KEYS[1], math.floor(full_in / 1000) + 1)
end
return result
"""


def redact_url(url: str) -> str:
    """A Redis URL as it may be logged: any password replaced by `***`."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()
    except ValueError:
        return "<unparseable redis url>"


class RedisLimiter:
    """Token buckets per key in Redis, shared by every gateway replica using the same URL and prefix.

    Same semantics as `InMemoryLimiter` (see the module docstring for the atomic Lua script, the
    server clock, TTLs and the failure policy). Nothing connects until the first check. Use it from
    one event loop at a time: redis-py's asyncio connections belong to the loop that opened them, so
    when the loop changes (`asyncio.run` per test) a new client is opened and the old one abandoned.

    `timeout_s` bounds connecting and each round trip to Redis (beyond it Redis counts as down, for
    `backoff_s`). At most `max_connections` calls run at once per event loop; more wait for a free
    connection up to `queue_timeout_s` (a busy gateway, not a Redis failure: no backoff), then the
    failure policy applies to them. `errors_total` counts the checks and settlements made without
    Redis, whatever the reason.
    """

    def __init__(
        self,
        url: str,
        limits_for: Callable[[str], Limits],
        *,
        key_prefix: str = "fleetlens:ratelimit:",
        fail_open: bool = True,
        timeout_s: float = 0.2,
        max_connections: int = 16,
        queue_timeout_s: float = 1.0,
        backoff_s: float = 1.0,
        error_log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            parse_url(url)
        except ValueError as error:
            raise ValueError(f"bad Redis URL {redact_url(url)}: {error}") from None
        if timeout_s <= 0 or queue_timeout_s <= 0 or max_connections < 1 or backoff_s < 0:
            raise ValueError("timeouts and max_connections must be positive, backoff_s not negative")
        self._url = url
        self.url = redact_url(url)
        """The URL without its password (for logs and reprs)."""
        self._limits_for = limits_for
        self.key_prefix = key_prefix
        self.fail_open = fail_open
        self._timeout_s = timeout_s
        self._queue_timeout_s = queue_timeout_s
        self._max_connections = max_connections
        self._backoff_s = backoff_s
        self._log_interval_s = error_log_interval_s
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: Any = None
        self._script: Any = None
        self._slots: Any = None
        self._down_until = -math.inf
        self._failing = False
        self._last_log: float | None = None
        self._last_recovery_log: float | None = None
        self._unlogged = 0
        self._last_error = ""
        self.errors_total = 0
        """Checks and settlements made without Redis (it failed, timed out, or was backing off)."""

    def __repr__(self) -> str:
        return f"RedisLimiter({self.url!r}, key_prefix={self.key_prefix!r}, fail_open={self.fail_open})"

    def key(self, key_id: str) -> str:
        """The Redis key holding `key_id`'s buckets."""
        return self.key_prefix + key_id

    async def check(self, key_id: str, tokens_estimate: int = 0) -> Decision:
        if tokens_estimate < 0:
            raise ValueError("tokens_estimate must not be negative")
        limits = self._limits_for(key_id)
        if limits.requests is None and limits.tokens is None:
            return ALLOWED_UNLIMITED
        reply = await self._call(key_id, limits, "check", tokens_estimate)
        if reply is None:
            if self.fail_open:
                return ALLOWED_UNLIMITED
            return Decision(False, max(self._backoff_s, 1.0), None, None, unavailable=True)
        _, wait_r, wait_t, left_r, left_t = (int(value) for value in reply)
        waits: dict[str, float | None] = {}
        remaining: dict[str, int] = {}
        capacity: dict[str, int] = {}
        for name, limit, wait_us, left in ((REQUESTS, limits.requests, wait_r, left_r),
                                           (TOKENS, limits.tokens, wait_t, left_t)):
            if limit is not None:
                waits[name] = None if wait_us < 0 else wait_us / 1e6
                remaining[name] = left
                capacity[name] = limit.capacity
        return _decide(waits, remaining, capacity)

    async def settle(self, key_id: str, reserved: int, actual: int) -> None:
        delta = actual - reserved
        if delta == 0:
            return
        limits = self._limits_for(key_id)
        if limits.tokens is None:
            return
        await self._call(key_id, limits, "settle", delta)

    async def _call(self, key_id: str, limits: Limits, op: str, amount: int) -> list[Any] | None:
        """Run the script for one key; None (counted, logged) when Redis cannot answer in time."""
        if self._clock() < self._down_until:
            self._failed(None)
            return None
        args = [_UNIT_US, op, amount]
        for limit in (limits.requests, limits.tokens):
            # Capacities beyond the exact range (150M/min) are clamped to it: as good as unlimited.
            if limit is None:
                args += [0, 0]
            else:
                args += [limit.per_minute, min(limit.capacity, _MAX_EXACT_CAPACITY)]
        script, slots = self._client()
        try:
            # Waiting for a free connection is this process being busy, not Redis being down: it
            # has its own bound and does not trip the backoff.
            async with asyncio.timeout(self._queue_timeout_s):
                await slots.acquire()
        except TimeoutError:
            self._failed(None, "all connections busy")
            return None
        try:
            # connect (when needed) + one round trip; redis-py's socket timeouts bound each part too
            async with asyncio.timeout(2 * self._timeout_s):
                reply = await script(keys=[self.key(key_id)], args=args)
        except (TimeoutError, OSError, RedisError) as error:
            self._failed(error)
            return None
        finally:
            slots.release()
        if self._failing:
            self._failing = False
            now = self._clock()
            if self._last_recovery_log is None or now - self._last_recovery_log >= self._log_interval_s:
                self._last_recovery_log = now
                log.warning("rate limiter store %s reachable again (%d checks made without it so far)",
                            self.url, self.errors_total)
        return reply

    def _client(self) -> tuple[Any, asyncio.Semaphore]:
        """The script bound to this event loop's client, and the slots bounding its connections."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            pool = BlockingConnectionPool.from_url(
                self._url, max_connections=self._max_connections, timeout=self._queue_timeout_s,
                socket_timeout=self._timeout_s, socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 0), client_name="fleetlens-gateway")
            self._redis = Redis.from_pool(pool)  # closing the client closes its pool
            self._script = self._redis.register_script(_SCRIPT)
            self._slots = asyncio.Semaphore(self._max_connections)
            self._loop = loop
        return self._script, self._slots

    def _failed(self, error: BaseException | None, reason: str | None = None) -> None:
        """Count a check or settlement made without Redis; an `error` from Redis starts the backoff."""
        self.errors_total += 1
        self._unlogged += 1
        now = self._clock()
        if error is not None:
            self._down_until = now + self._backoff_s
            self._failing = True
            message = str(error) or "timed out"
            password = urlsplit(self._url).password
            if password:
                message = message.replace(password, "***")
            self._last_error = f"{type(error).__name__}: {message}"
        elif reason is not None:
            self._last_error = reason
        if self._last_log is None or now - self._last_log >= self._log_interval_s:
            policy = ("failing open: requests are served without rate limits" if self.fail_open
                      else "failing closed: requests are answered 503")
            log.warning("rate limiter store %s unavailable (%s); %s (%d checks without it since the last "
                        "message, %d in all)", self.url, self._last_error, policy, self._unlogged,
                        self.errors_total)
            self._last_log = now
            self._unlogged = 0

    async def aclose(self) -> None:
        """Close the connection pool (of the running loop's client)."""
        if self._redis is not None and self._loop is asyncio.get_running_loop():
            await self._redis.aclose()
        self._redis = self._script = self._slots = self._loop = None
