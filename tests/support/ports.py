"""Ports for the servers tests start on 127.0.0.1 (moto, Ray, HTTP stand-ins), and for ones known to be closed."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
