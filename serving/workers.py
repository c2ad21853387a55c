"""One gateway, several worker processes: each worker's counters reach /metrics, whichever answers.

A scrape of /metrics lands on one worker (they share the port), yet must show the whole gateway.
Each worker writes its counters to `<directory>/<pid>.json` every `interval_s` (atomically: a
temporary file, then a rename), and the worker that answers a scrape adds the other live workers'
latest files to its own live counters. A worker that died is left out (its counts go with it, as a
restarted process's would: Prometheus reads the drop as a counter reset).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from .metrics import GatewayMetrics, Snapshot

log = logging.getLogger(__name__)


class WorkerStats:
    def __init__(self, directory: Path, metrics: GatewayMetrics, interval_s: float = 1.0) -> None:
        self.directory = directory
        self.metrics = metrics
        self.interval_s = interval_s
        self.pid = os.getpid()
        self.path = directory / f"{self.pid}.json"
        metrics.peers = self.peers

    def publish(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.metrics.snapshot()))
        os.replace(temporary, self.path)

    async def publish_forever(self) -> None:
        while True:
            try:
                self.publish()
            except OSError as error:  # the directory went away (shutdown) or the disk is full: try again later
                log.warning("worker counters not published to %s: %s", self.directory, error)
            await asyncio.sleep(self.interval_s)

    def peers(self) -> list[Snapshot]:
        """The latest counters of every other live worker."""
        snapshots = []
        for path in self.directory.glob("*.json"):
            pid = int(path.stem) if path.stem.isdigit() else None
            if pid is None or pid == self.pid or not _alive(pid):
                continue
            try:
                snapshots.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # being replaced or gone: its next write comes within a second
                continue
        return snapshots

    def retire(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
