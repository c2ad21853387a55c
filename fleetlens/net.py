"""Small network helpers shared by FleetLens' servers (kept free of heavy imports: the collector
and the gateway use them without loading the warehouse engine)."""

from __future__ import annotations

import ipaddress
import socket


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests, benches and local tools)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
