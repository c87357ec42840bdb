"""Listening addresses of the node's HTTP endpoints, as the config writes them."""

from __future__ import annotations

import ipaddress

LOOPBACK = "127.0.0.1"


def parse_web_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080' or '0.0.0.0:8080' into host and port. Without a host
    (':8080' or '8080') the status page listens on loopback, never on every interface."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or LOOPBACK, int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost is not
    resolved here: it counts as reachable from the network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
