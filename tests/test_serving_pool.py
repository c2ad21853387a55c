"""Replica pools: least-outstanding choice, round-robin ties, caps, passive and active health."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from fleetlens.serving.pool import HealthChecker, NoReplicaAvailable, Pools, Replica, ReplicaPool
from fleetlens.serving.registry import ModelRegistry, PoolSettings
from fleetlens.serving.stub_upstream import StubConfig, StubServer


def settings(**health: Any) -> PoolSettings:
    cap = health.pop("max_outstanding_per_replica", None)
    return PoolSettings.model_validate({"max_outstanding_per_replica": cap, "health_check": health})


def pool_of(n: int, **health: Any) -> ReplicaPool:
    replicas = [Replica(f"http://10.0.0.{i}:8000", "m") for i in range(1, n + 1)]
    return ReplicaPool("m", replicas, settings(**health))


def names(replicas: list[Replica | None]) -> list[str | None]:
    return [r.name.split(".")[-1].split(":")[0] if r else None for r in replicas]


def test_replica_defaults():
    replica = Replica("http://10.0.0.1:8000/", "m")
    assert replica.url == "http://10.0.0.1:8000"
    assert replica.name == "10.0.0.1:8000"
    assert replica.healthy and replica.outstanding == 0


def test_round_robin_among_idle_replicas():
    pool = pool_of(3)

    async def go() -> list[Replica]:
        chosen = []
        for _ in range(6):
            async with pool.lease() as replica:
                chosen.append(replica)
        return chosen

    assert names(asyncio.run(go())) == ["1", "2", "3", "1", "2", "3"]
    assert all(r.outstanding == 0 and r.requests_total == 2 for r in pool)


def test_least_outstanding_under_concurrent_leases():
    pool = pool_of(3)

    async def go() -> None:
        async with AsyncExitStack() as stack:
            held = [await stack.enter_async_context(pool.lease()) for _ in range(3)]
            assert sorted(names(held)) == ["1", "2", "3"]  # one each before anyone gets two
            assert [r.outstanding for r in pool] == [1, 1, 1]
            release = asyncio.Event()
            done = asyncio.Event()

            async def short_request() -> None:
                async with pool.lease() as replica:
                    assert replica.outstanding == 2
                    await release.wait()
                done.set()

            task = asyncio.create_task(short_request())
            await asyncio.sleep(0)
            busy = [r for r in pool if r.outstanding == 2]
            assert len(busy) == 1
            # The next two go to the others (fewest in flight), not to the busy one.
            more = [await stack.enter_async_context(pool.lease()) for _ in range(2)]
            assert busy[0] not in more and len(set(map(id, more))) == 2
            assert [r.outstanding for r in pool] == [2, 2, 2]
            release.set()
            await done.wait()
            await task
            # Now the replica whose request finished is the least loaded: it gets the next one.
            assert pool.pick() is busy[0]
        assert [r.outstanding for r in pool] == [0, 0, 0]

    asyncio.run(go())


def test_lease_releases_on_error():
    pool = pool_of(1)

    async def go() -> None:
        with pytest.raises(RuntimeError):
            async with pool.lease():
                raise RuntimeError("upstream broke")

    asyncio.run(go())
    assert pool.replicas[0].outstanding == 0


def test_max_outstanding_per_replica():
    pool = pool_of(2, max_outstanding_per_replica=2)

    async def go() -> None:
        async with AsyncExitStack() as stack:
            for _ in range(4):
                await stack.enter_async_context(pool.lease())
            assert [r.outstanding for r in pool] == [2, 2]
            assert pool.pick() is None and pool.overloaded
            with pytest.raises(NoReplicaAvailable) as caught:
                await stack.enter_async_context(pool.lease())
            assert caught.value.reason == "overloaded"
        assert not pool.overloaded and pool.pick() is not None

    asyncio.run(go())


def test_passive_failures_eject_after_unhealthy_after_in_a_row():
    pool = pool_of(2, unhealthy_after=3)
    first, second = pool.replicas
    pool.report(first, False, "502")
    pool.report(first, False, "502")
    pool.report(first, True)  # a success breaks the streak
    pool.report(first, False, "502")
    pool.report(first, False, "502")
    assert first.healthy and first.failures == 2 and first.failures_total == 4
    pool.report(first, False, "connect error")
    assert not first.healthy and first.last_error == "connect error"
    assert [pool.pick() for _ in range(3)] == [second] * 3
    for _ in range(3):
        pool.report(second, False, "timeout")
    assert pool.pick() is None and not pool.overloaded

    async def go() -> None:
        async with pool.lease():
            pass

    with pytest.raises(NoReplicaAvailable) as caught:
        asyncio.run(go())
    assert caught.value.reason == "no_healthy_replica"


def test_probe_results_need_healthy_after_successes_to_return():
    pool = pool_of(1, unhealthy_after=2, healthy_after=2)
    replica = pool.replicas[0]
    pool.probe_result(replica, False, "refused")
    assert replica.healthy
    pool.probe_result(replica, False, "refused")
    assert not replica.healthy
    pool.probe_result(replica, True)
    assert not replica.healthy
    pool.probe_result(replica, False, "refused")
    pool.probe_result(replica, True)
    assert not replica.healthy  # the streak restarted
    pool.probe_result(replica, True)
    assert replica.healthy and replica.failures == 0


async def wait_for(condition, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_active_health_checker_with_real_stub_servers():
    interval, unhealthy_after = 0.1, 2
    up = StubServer(StubConfig(model="m")).start()
    down = StubServer(StubConfig(model="m")).start()
    pool = ReplicaPool("m", [Replica(up.url, "m", "up"), Replica(down.url, "m", "down")], settings(
        interval_s=interval, timeout_s=interval, unhealthy_after=unhealthy_after, healthy_after=1))
    a, b = pool.replicas
    checker = HealthChecker(pool)
    restarted: list[StubServer] = []

    async def go() -> None:
        checker.start()
        await wait_for(lambda: checker.rounds >= 2, 2.0)
        assert a.healthy and b.healthy
        await asyncio.to_thread(down.stop)
        # A stopped replica is out within interval x unhealthy_after (+ one round of slack).
        took = await wait_for(lambda: not b.healthy, interval * (unhealthy_after + 1) + 0.5)
        assert took <= interval * (unhealthy_after + 1) + 0.5
        assert b.probe_failures >= unhealthy_after and "Connect" in (b.last_error or "")
        assert a.healthy and pool.pick() is a
        restarted.append(await asyncio.to_thread(StubServer(StubConfig(model="m"), port=down.port).start))
        await wait_for(lambda: b.healthy, interval * 2 + 0.5)
        # A replica that answers /health with 503 is taken out as well.
        up.state.behaviour.health_status = 503
        await wait_for(lambda: not a.healthy, interval * (unhealthy_after + 1) + 0.5)
        assert a.last_error == "health check answered 503"
        up.state.behaviour.health_status = 200
        await wait_for(lambda: a.healthy, interval * 2 + 0.5)
        await checker.stop()

    try:
        asyncio.run(go())
    finally:
        for server in (up, down, *restarted):
            server.stop()


def registry(**urls: list[str]) -> ModelRegistry:
    gpu = {"type": "L4", "count": 1}
    return ModelRegistry.model_validate({"models": {
        name: {"path": f"org/{name}", "variant": "bf16", "gpu": gpu, "replicas": 1, "replica_urls": u}
        for name, u in urls.items()
    }})


def test_pools_from_registry_and_runtime_replicas():
    pools = Pools(registry(small=["http://10.0.0.1:8000"], large=[]), settings(unhealthy_after=1))
    assert "small" in pools and "large" in pools and "nope" not in pools
    assert [r.url for r in pools["small"]] == ["http://10.0.0.1:8000"]
    assert len(pools["large"]) == 0 and pools["large"].pick() is None

    added = pools.add_replica("large", "http://127.0.0.1:9001/", "large-0")
    assert added.source == "registered" and added.name == "large-0"
    assert pools["large"].pick() is added
    with pytest.raises(KeyError):
        pools.add_replica("nope", "http://127.0.0.1:9002")
    pools["small"].report(pools["small"].replicas[0], False, "boom")

    rows = {row["name"]: row for row in pools.snapshot()}
    assert rows["large-0"] == {**rows["large-0"], "model": "large", "healthy": True, "outstanding": 0}
    assert rows["10.0.0.1:8000"]["healthy"] is False and rows["10.0.0.1:8000"]["failures"] == 1

    # A reload keeps the state of replicas that stay, follows replica_urls, keeps registered ones.
    pools.update(registry(small=["http://10.0.0.1:8000", "http://10.0.0.2:8000"], large=[]))
    small = pools["small"].replicas
    assert [r.url for r in small] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert small[0].healthy is False
    assert [r.name for r in pools["large"]] == ["large-0"]
    pools.update(registry(large=[]))
    assert "small" not in pools

    assert pools.remove_replica("large", "large-0") is added
    assert pools.remove_replica("large", "large-0") is None
    assert pools.remove_replica("nope", "x") is None
    assert len(pools["large"]) == 0


def test_remove_replica_with_requests_in_flight():
    pools = Pools(registry(m=[]))
    replica = pools.add_replica("m", "http://127.0.0.1:9001")

    async def go() -> None:
        async with pools["m"].lease() as leased:
            assert leased is replica
            pools.remove_replica("m", "http://127.0.0.1:9001")
            assert pools["m"].pick() is None
        assert replica.outstanding == 0

    asyncio.run(go())
