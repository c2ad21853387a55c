"""Small network helpers shared by FleetLens' servers (kept free of heavy imports: the collector
and the gateway use them without loading the warehouse engine)."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def client_host(bind: str) -> str:
    """The address a client on this machine uses for a server bound to `bind` (a wildcard bind is
    reached on loopback)."""
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests, benches and local tools)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, *, alive: Callable[[], bool] | None = None,
              interval_s: float = 0.1) -> bool:
    """Poll `url` until it answers 200 (True); False once `timeout_s` has passed or, with `alive`
    (the process we started), as soon as that process has died — no point waiting it out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    return False
