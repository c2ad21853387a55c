"""Run FleetLens' own processes (warehouse, collector, gateway, replicas, Airflow, dashboards) side by side.

Each child runs in its own process group, so stopping it also stops whatever it started; Ctrl-C
or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace period) and leaves no orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> int:
    """SIGTERM the process group `process` leads (started with start_new_session=True), SIGKILL it
    after `grace_s`, then SIGKILL whatever is left in the group or in its session; returns the exit code.

    The session matters for children that put their own children in new process groups, as
    Airflow does with every running task: they stay in the session, so none outlives the stop."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        _signal_session(process.pid, signal.SIGTERM, outside_group_only=True)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    leftovers = _signal_session(process.pid, signal.SIGKILL)
    psutil.wait_procs(leftovers, timeout=5)
    return process.returncode


def session_members(session_id: int) -> list[psutil.Process]:
    """Every live process of session `session_id` (a child started with start_new_session=True
    leads a session whose id is its pid), whatever its process group or parent now."""
    members = []
    for candidate in psutil.process_iter():
        try:
            if candidate.pid != session_id and os.getsid(candidate.pid) == session_id \
                    and candidate.status() != psutil.STATUS_ZOMBIE:
                members.append(candidate)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_session(session_id: int, sig: int, *, outside_group_only: bool = False) -> list[psutil.Process]:
    """Signal the session's processes (those in the leader's group already got it from killpg when
    `outside_group_only`); returns the ones signalled."""
    members = session_members(session_id)
    if outside_group_only:
        members = [m for m in members if _pgid(m.pid) not in (session_id, None)]
    for member in members:
        try:
            member.send_signal(sig)
        except psutil.Error:
            pass
    return members


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    url: str = ""
    grace_s: float = 20.0  # SIGTERM -> SIGKILL; longer for a child that itself stops children gracefully
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, **(env or {})})
        log_file.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, self.grace_s)


@dataclass
class Stack:
    children: list[Child] = field(default_factory=list)

    def add(self, child: Child, env: dict[str, str] | None = None) -> Child:
        child.start(env)
        self.children.append(child)
        return child

    def stop(self) -> None:
        """Stop the children newest first, one after the other: a child may need the ones started
        before it while it stops (replicas drain through the gateway, the gateway flushes its spans
        to the collector, the collector its spool into the warehouse)."""
        for child in reversed(self.children):
            child.stop()

    def wait(self, on_exit: Callable[[Child], None]) -> None:
        """Block until a child exits (reported through `on_exit`) or a signal arrives."""
        while True:
            for child in self.children:
                if not child.alive:
                    on_exit(child)
                    return
            time.sleep(0.5)


def fleetlens_argv(*args: str) -> list[str]:
    """argv that runs the FleetLens CLI of this interpreter."""
    return [sys.executable, "-m", "fleetlens", *args]
