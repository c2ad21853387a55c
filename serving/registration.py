"""How launched replicas find the gateway: a directory of small JSON records, one per running replica.

`fleetlens serve replica` writes `<data_dir>/replicas/<replica>.json` once its vLLM answers health
checks, and removes it when it stops. The gateway's reload loop reads the directory and adds or
removes `registered` replicas in its pools; the collector's scraper can read the same records for
`/metrics` targets. Why files and not an HTTP admin endpoint: nothing new listens on a port (no
admin API to secure), registration survives a gateway restart, and it is the same pattern as
Prometheus' file-based service discovery. For replicas on other hosts, list them in models.yaml
`replica_urls` or share the directory.

A record whose launcher died without cleaning up (SIGKILL, OOM) is ignored when its process is gone
on this host; the pool's health checks catch the rest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .pool import Pools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaRecord:
    """One running replica, as its launcher announces it."""

    name: str  # replica name, unique per directory: "demo-small-0"
    model: str  # registry key of the model it serves
    url: str  # base URL without /v1
    pid: int = field(default_factory=os.getpid)  # the launcher's pid (it owns the vLLM process)
    host: str = field(default_factory=socket.gethostname)
    launched_at: float = 0.0  # unix seconds
    ready_at: float = 0.0
    variant: str = ""

    @property
    def load_seconds(self) -> float:
        return max(0.0, self.ready_at - self.launched_at)

    def is_stale(self) -> bool:
        """True when the launcher was on this host and its process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by someone else
            return False
        return False


class ReplicaDirectory:
    """The registration directory: atomic writes, tolerant reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.json"

    def register(self, record: ReplicaRecord) -> Path:
        """Write (or replace) `record` atomically, so a reader never sees half a file."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self._file(record.name)
        tmp = target.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        os.replace(tmp, target)
        return target

    def deregister(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    def records(self) -> list[ReplicaRecord]:
        """Every live record; unreadable files are logged and skipped, stale ones skipped."""
        if not self.path.is_dir():
            return []
        found = []
        for file in sorted(self.path.glob("*.json")):
            try:
                record = ReplicaRecord(**json.loads(file.read_text()))
            except (OSError, ValueError, TypeError) as error:
                log.warning("ignoring replica record %s: %s", file, error)
                continue
            if record.is_stale():
                log.info("ignoring replica record %s: its launcher (pid %d) is gone", file.name, record.pid)
                continue
            found.append(record)
        return found

    def names_in_use(self) -> set[str]:
        return {record.name for record in self.records()}

    def next_name(self, model: str) -> str:
        """`{model}-{n}` with the lowest n not registered yet."""
        used = self.names_in_use()
        n = 0
        while f"{model}-{n}" in used:
            n += 1
        return f"{model}-{n}"


def sync_pools(pools: Pools, records: list[ReplicaRecord]) -> tuple[int, int]:
    """Make the pools' `registered` replicas match `records`; returns (added, removed).

    Replicas that stay keep their state (health, in-flight counts). A record for a model the
    registry does not know is skipped with a warning (the registry decides what may be served).
    """
    wanted = {(r.model, r.url.rstrip("/")): r for r in records}
    removed = 0
    for pool in pools:
        for replica in list(pool):
            if replica.source == "registered" and (pool.model, replica.url) not in wanted:
                pool.remove(replica.url)
                removed += 1
                log.info("replica %s of %s deregistered", replica.name, pool.model)
    added = 0
    for (model, url), record in wanted.items():
        pool = pools.get(model)
        if pool is None:
            log.warning("replica %s serves %r, which is not in the model registry: not routed to", record.name, model)
            continue
        if any(r.url == url for r in pool):
            continue
        pools.add_replica(model, url, record.name)
        added += 1
        log.info("replica %s of %s registered at %s (ready after %.1f s)", record.name, model, url,
                 record.load_seconds)
    return added, removed


def wait_registered(directory: ReplicaDirectory, names: set[str], timeout_s: float,
                    check: Callable[[], None] | None = None) -> list[ReplicaRecord]:
    """Block until every replica in `names` is registered; `check` runs between polls (it may raise,
    e.g. when a launcher died, or report progress). TimeoutError names the missing replicas."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in directory.records() if r.name in names]
        if {r.name for r in records} == names:
            return records
        if check is not None:
            check()
        if time.monotonic() > deadline:
            missing = sorted(names - {r.name for r in records})
            raise TimeoutError(f"replicas not registered after {timeout_s:.0f} s: {', '.join(missing)}")
        time.sleep(0.2)
