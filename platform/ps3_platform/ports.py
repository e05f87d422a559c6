"""Free loopback ports for local runs and test servers."""

from __future__ import annotations

import socket


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(grpc_room: bool = False) -> int:
    """A free loopback port; with grpc_room, port + 10000 is free too (SeaweedFS needs it)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not grpc_room or (port + 10000 < 65535 and port_free(port + 10000)):
            return port
    raise RuntimeError("no free port found")
