"""Ports and loopback addresses Borealis gives out on this machine.

Kept ports (a storage node's, an instance's, an endpoint's) come from below the
kernel's ephemeral range (32768-60999 by default), so a client connection's local port
can never take a stopped cluster's port. A cluster's endpoints share its port P here,
each on a loopback address of its own; a host has one address, so there each endpoint
takes a port of its own from the block P..P+6: the cluster endpoint P, the reader
endpoint P+1, the custom endpoints the next five.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

KEPT_PORTS = range(20000, 32768)
ENDPOINT_PORTS = 7
HOST_PORT_OFFSET = {"WRITER": 0, "READER": 1}


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick), for short-lived servers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_addresses() -> Iterator[str]:
    """127.0.0.1, 127.0.0.2, ...: all of 127.0.0.0/8 reaches this machine."""
    for third in range(256):
        for fourth in range(1, 255):
            yield f"127.0.{third}.{fourth}"
