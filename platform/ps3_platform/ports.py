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


#: Fixed ports of a Ray node in a Ray-using stage (curation), so the pod spec and the job's
#: NetworkPolicy can name them. Each pod runs one Ray node; a second node on the same host
#: (several local ranks) shifts them by RAY_PORT_STRIDE.
RAY_PORTS = {
    "ray-gcs": 6379,
    "ray-node-mgr": 6380,
    "ray-object-mgr": 6381,
    "ray-env-agent": 6382,
    "ray-metrics": 6383,
    "ray-agent-grpc": 6384,
    "ray-agent-http": 6385,
}
#: Ray worker processes (one per task/actor process) listen on ports in this range.
RAY_WORKER_PORTS = (10002, 10101)
RAY_PORT_STRIDE = 20
