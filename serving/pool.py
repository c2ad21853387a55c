"""Replica pools: which vLLM replica of a model takes the next request, and which replicas are up.

One `ReplicaPool` per model (registry key). `pick()` takes the healthy replica with the fewest
requests in flight ("least outstanding"): with LLM requests lasting from 50 ms to minutes,
counting in-flight work balances far better than round-robin, which piles new requests onto a
replica still busy with long generations. Ties (e.g. an idle pool) go round-robin, so light
traffic still spreads over every replica and a cold replica gets warmed.

Health has two sources:
* passive -- the gateway calls `report(replica, ok)` after each upstream attempt; `unhealthy_after`
  consecutive failures take the replica out at once, without waiting for the next probe;
* active -- `HealthChecker` probes `GET {url}{path}` every `interval_s`; `unhealthy_after`
  consecutive failed probes take a replica out, `healthy_after` consecutive good ones put it back.
  Only the checker brings a replica back (an unhealthy replica gets no traffic to report on), so
  run one wherever pools serve traffic.

Replicas start healthy: a gateway that restarts must serve at once, and a dead replica is found by
the first request or probe. Everything runs on one event loop; `pick()` and the counter updates
never await, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal
from urllib.parse import urlsplit

import httpx

from fleetlens.serving.registry import HealthCheck, ModelRegistry, PoolSettings

log = logging.getLogger(__name__)

Source = Literal["static", "registered"]


@dataclass(eq=False)
class Replica:
    """One upstream server of one model; compared by identity (two entries are two replicas)."""

    url: str  # base URL, without /v1: "http://10.0.4.17:8000"
    model: str  # registry key of the model it serves
    name: str = ""  # metric label; default: host:port
    source: Source = "static"  # from models.yaml replica_urls, or registered at run time
    outstanding: int = 0
    healthy: bool = True
    failures: int = 0  # consecutive failed requests (passive)
    probe_failures: int = 0  # consecutive failed health probes (active)
    probe_successes: int = 0  # consecutive good probes while unhealthy
    failures_total: int = 0
    requests_total: int = 0
    last_error: str | None = None
    changed_at: float = field(default_factory=time.time)  # last healthy <-> unhealthy change

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.name:
            self.name = urlsplit(self.url).netloc or self.url

    def set_healthy(self, healthy: bool, reason: str | None = None) -> None:
        """Flip the health state (logged: replicas coming and going is what operators look for)."""
        if healthy == self.healthy:
            return
        self.healthy = healthy
        self.changed_at = time.time()
        # Streaks restart; the one that ejected a replica stays visible until it comes back.
        self.probe_successes = 0
        if healthy:
            self.failures = self.probe_failures = 0
            log.info("replica %s of %s is healthy again", self.name, self.model)
        else:
            log.warning("replica %s of %s is unhealthy: %s", self.name, self.model, reason)

    def snapshot(self) -> dict[str, Any]:
        """What /metrics shows for this replica."""
        return {
            "model": self.model, "name": self.name, "url": self.url, "source": self.source,
            "healthy": self.healthy, "outstanding": self.outstanding, "failures": self.failures,
            "probe_failures": self.probe_failures, "failures_total": self.failures_total,
            "requests_total": self.requests_total, "last_error": self.last_error,
        }


class NoReplicaAvailable(Exception):
    """`lease()` found no replica; `reason` is "no_healthy_replica" or "overloaded".

    The two differ for the gateway: "overloaded" is the routes.yaml `fallback_on: overload`
    trigger (answer 503 + Retry-After if nothing else can take it), the other is "error".
    """

    def __init__(self, model: str, reason: Literal["no_healthy_replica", "overloaded"]) -> None:
        super().__init__(f"model {model!r}: {reason.replace('_', ' ')}")
        self.model = model
        self.reason = reason


class ReplicaPool:
    """The replicas of one model and the least-outstanding choice among them."""

    def __init__(self, model: str, replicas: list[Replica] | None = None,
                 settings: PoolSettings | None = None) -> None:
        self.model = model
        self.replicas: list[Replica] = list(replicas or [])
        self.settings = settings or PoolSettings()
        self._last = -1  # index of the last pick: ties go to the next one round-robin

    def __len__(self) -> int:
        return len(self.replicas)

    def __iter__(self) -> Iterator[Replica]:
        return iter(list(self.replicas))

    def _available(self, replica: Replica) -> bool:
        limit = self.settings.max_outstanding_per_replica
        return replica.healthy and (limit is None or replica.outstanding < limit)

    def pick(self) -> Replica | None:
        """The healthy replica with the fewest in flight, below the per-replica cap; None if none.

        Scans from just after the last pick, so among equally loaded replicas the choice rotates.
        Does not count the request: use `lease()` (or increment `outstanding` yourself).
        """
        count = len(self.replicas)
        best: Replica | None = None
        best_index = -1
        for step in range(1, count + 1):
            index = (self._last + step) % count
            replica = self.replicas[index]
            if self._available(replica) and (best is None or replica.outstanding < best.outstanding):
                best, best_index = replica, index
        if best is not None:
            self._last = best_index
        return best

    @property
    def healthy_count(self) -> int:
        return sum(1 for r in self.replicas if r.healthy)

    @property
    def overloaded(self) -> bool:
        """Healthy replicas exist but every one is at max_outstanding_per_replica."""
        return self.healthy_count > 0 and not any(self._available(r) for r in self.replicas)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Replica]:
        """`async with pool.lease() as replica:` -- counts the request in flight for its duration.

        Raises NoReplicaAvailable when `pick()` finds nothing. Reporting success or failure stays
        with the caller (`report()`): only it knows whether a 4xx was the client's fault.
        """
        replica = self.pick()
        if replica is None:
            raise NoReplicaAvailable(self.model, "overloaded" if self.overloaded else "no_healthy_replica")
        replica.outstanding += 1
        replica.requests_total += 1
        try:
            yield replica
        finally:
            replica.outstanding -= 1

    def report(self, replica: Replica, ok: bool, error: str | None = None) -> None:
        """Passive health: the outcome of one request; `unhealthy_after` failures in a row eject it."""
        if ok:
            replica.failures = 0
            return
        replica.failures += 1
        replica.failures_total += 1
        replica.last_error = error
        if replica.failures >= self.settings.health_check.unhealthy_after:
            replica.set_healthy(False, f"{replica.failures} failed requests in a row ({error})")

    def probe_result(self, replica: Replica, ok: bool, error: str | None = None) -> None:
        """Active health: the outcome of one probe (called by `HealthChecker`)."""
        check = self.settings.health_check
        if ok:
            replica.probe_failures = 0
            if not replica.healthy:
                replica.probe_successes += 1
                if replica.probe_successes >= check.healthy_after:
                    replica.set_healthy(True)
            return
        replica.probe_successes = 0
        replica.probe_failures += 1
        replica.last_error = error
        if replica.healthy and replica.probe_failures >= check.unhealthy_after:
            replica.set_healthy(False, f"{replica.probe_failures} failed health checks ({error})")

    def add(self, replica: Replica) -> Replica:
        """Add a replica (replacing one with the same URL, whose state is then lost)."""
        self.replicas = [r for r in self.replicas if r.url != replica.url] + [replica]
        return replica

    def remove(self, url_or_name: str) -> Replica | None:
        """Remove the replica with this URL or name; requests it has in flight finish normally."""
        url = url_or_name.rstrip("/")
        for replica in self.replicas:
            if url_or_name in (replica.url, replica.name) or replica.url == url:
                self.replicas = [r for r in self.replicas if r is not replica]
                return replica
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        return [r.snapshot() for r in self.replicas]


class Pools:
    """Every model's pool, keyed by registry key, built from models.yaml and kept in step with it.

    Static replicas come from `replica_urls`; the replica launcher adds the replicas it starts with
    `add_replica()`. `update()` applies a reloaded configuration and keeps the state (health,
    in-flight counts) of replicas that stay.
    """

    def __init__(self, registry: ModelRegistry, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self._pools: dict[str, ReplicaPool] = {}
        self.update(registry, self.settings)

    def update(self, registry: ModelRegistry, settings: PoolSettings | None = None) -> None:
        """Apply a (re)loaded registry: new models get pools, dropped models lose theirs, static
        replica lists follow `replica_urls`; registered replicas of models that stay are kept."""
        if settings is not None:
            self.settings = settings
        pools: dict[str, ReplicaPool] = {}
        for model, spec in registry.models.items():
            pool = self._pools.get(model) or ReplicaPool(model, settings=self.settings)
            pool.settings = self.settings
            wanted = [url.rstrip("/") for url in spec.replica_urls]
            kept = [r for r in pool.replicas if r.source == "registered" or r.url in wanted]
            have = {r.url for r in kept}
            kept += [Replica(url, model, source="static") for url in wanted if url not in have]
            pool.replicas = kept
            pools[model] = pool
        self._pools = pools

    def __getitem__(self, model: str) -> ReplicaPool:
        return self._pools[model]

    def __contains__(self, model: object) -> bool:
        return model in self._pools

    def get(self, model: str) -> ReplicaPool | None:
        return self._pools.get(model)

    def __iter__(self) -> Iterator[ReplicaPool]:
        return iter(list(self._pools.values()))

    def add_replica(self, model: str, url: str, name: str = "") -> Replica:
        """Register a replica started at run time; KeyError if `model` is not in the registry."""
        if model not in self._pools:
            raise KeyError(f"model {model!r} is not in the model registry")
        return self._pools[model].add(Replica(url, model, name, source="registered"))

    def remove_replica(self, model: str, url_or_name: str) -> Replica | None:
        """Unregister a replica (by URL or name); None if it was not there."""
        pool = self._pools.get(model)
        return pool.remove(url_or_name) if pool is not None else None

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per replica, all models (for /metrics and the admin page)."""
        return [row for pool in self._pools.values() for row in pool.snapshot()]


class HealthChecker:
    """Probes every replica of every pool each `interval_s`; run as `checker.start()` / `stop()`.

    A probe is good when `GET {url}{path}` answers 2xx within `timeout_s`. All replicas are probed
    concurrently, so one hanging replica does not delay the verdict on the others. The settings
    are read each round, so a reloaded routes.yaml takes effect without restarting the checker.
    """

    def __init__(self, pools: Pools | ReplicaPool, client: httpx.AsyncClient | None = None) -> None:
        self.pools = pools
        self._client = client
        self._own_client = client is None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def _check(self) -> HealthCheck:
        settings = self.pools.settings
        return settings.health_check

    def _targets(self) -> list[tuple[ReplicaPool, Replica]]:
        pools = [self.pools] if isinstance(self.pools, ReplicaPool) else list(self.pools)
        return [(pool, replica) for pool in pools for replica in pool]

    async def _probe(self, client: httpx.AsyncClient, pool: ReplicaPool, replica: Replica,
                     check: HealthCheck) -> None:
        try:
            response = await client.get(replica.url + check.path, timeout=check.timeout_s)
        except httpx.HTTPError as error:
            pool.probe_result(replica, False, f"{type(error).__name__}: {error}".rstrip(": "))
            return
        ok = 200 <= response.status_code < 300
        pool.probe_result(replica, ok, None if ok else f"health check answered {response.status_code}")

    async def check_once(self) -> None:
        """One round: probe every replica now (tests call this directly)."""
        client = self._client or httpx.AsyncClient()
        self._client = client
        check = self._check()
        await asyncio.gather(*(self._probe(client, pool, r, check) for pool, r in self._targets()))
        self.rounds += 1

    async def run(self) -> None:
        """Probe forever, one round per interval (cancel to stop)."""
        try:
            while True:
                started = time.monotonic()
                await self.check_once()
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self._check().interval_s - elapsed))
        finally:
            if self._own_client and self._client is not None:
                await self._client.aclose()
                self._client = None

    def start(self) -> asyncio.Task[None]:
        """Start `run()` as a task on the running loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="fleetlens-health-checker")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


__all__ = ["HealthChecker", "NoReplicaAvailable", "Pools", "Replica", "ReplicaPool"]
