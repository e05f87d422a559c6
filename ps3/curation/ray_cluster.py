"""One Ray cluster out of a stage's workers: embedded for one process, head + nodes for more.

Inside a PyTorchJob every pod already knows the rendezvous (MASTER_ADDR, RANK): rank 0
starts a Ray head on the fixed ports the pod spec and NetworkPolicy name
(`ps3_platform.ports.RAY_PORTS`), the other ranks start a Ray node that joins it and stay
until rank 0 says the pipeline is done (a flag file under the output) or the head goes
away. With a single worker (the local backend's default) Ray runs embedded in the
process. Each `ray start` runs in the foreground (`--block`) as our child, so stopping
the child stops exactly that node, never another node on the same host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from ps3_platform.ports import RAY_PORT_STRIDE, RAY_PORTS, RAY_WORKER_PORTS

log = logging.getLogger(__name__)

HEAD_WAIT_S = 180


def _ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "start", *args]


def node_args(local_rank: int, num_cpus: int, num_gpus: int, temp_dir: str) -> list[str]:
    """Ports of this node (shifted per local rank so several nodes fit on one host)."""
    shift = local_rank * RAY_PORT_STRIDE
    low, high = RAY_WORKER_PORTS
    span = (high - low + 1) // 2 if local_rank else high - low + 1  # a second node on the host gets the top half
    low = low + (span if local_rank else 0)
    return [
        f"--node-manager-port={RAY_PORTS['ray-node-mgr'] + shift}",
        f"--object-manager-port={RAY_PORTS['ray-object-mgr'] + shift}",
        f"--runtime-env-agent-port={RAY_PORTS['ray-env-agent'] + shift}",
        f"--metrics-export-port={RAY_PORTS['ray-metrics'] + shift}",
        f"--dashboard-agent-grpc-port={RAY_PORTS['ray-agent-grpc'] + shift}",
        f"--dashboard-agent-listen-port={RAY_PORTS['ray-agent-http'] + shift}",
        f"--min-worker-port={low}", f"--max-worker-port={low + span - 1}",
        f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", "--block",
    ]


def _wait_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
            return True
        time.sleep(1)
    return False


@contextlib.contextmanager
def ray_cluster(*, rank: int, world_size: int, local_rank: int, num_cpus: int, num_gpus: int,
                temp_dir: str, done: callable) -> Iterator[bool]:
    """Yields True on the process that drives the pipeline (rank 0), False on the others,
    which return only once `done()` is true or their Ray node has stopped."""
    import ray

    # Ray enables token auth by itself when it finds ~/.ray/auth_token, and then a node or driver
    # without that file is refused. Pods of one job reach each other only (the job's
    # NetworkPolicy), so the default is no token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
    # (from a Secret) in the stage's env to have one.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if world_size == 1:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=temp_dir,
                 configure_logging=False, log_to_driver=True)
        try:
            yield True
        finally:
            ray.shutdown()
        return
    head = os.environ.get("MASTER_ADDR", "127.0.0.1")
    head = "127.0.0.1" if head == "localhost" else head
    port = RAY_PORTS["ray-gcs"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if rank == 0:
        node_ip = head if head == "127.0.0.1" else socket.gethostbyname(socket.gethostname())
        args = node_args(local_rank, num_cpus, num_gpus, temp_dir)
        proc = subprocess.Popen(_ray_cli("--head", f"--port={port}", f"--node-ip-address={node_ip}",
                                         "--include-dashboard=false", *args), env=env)
        try:
            if not _wait_port(node_ip, port, HEAD_WAIT_S):
                raise RuntimeError(f"the Ray head did not open port {port} within {HEAD_WAIT_S} s")
            ray.init(address=f"{node_ip}:{port}", configure_logging=False)
            log.info("Ray head at %s:%d; waiting for %d more nodes", node_ip, port, world_size - 1)
            _wait_nodes(world_size)
            yield True
        finally:
            ray.shutdown()
            _stop(proc)
        return
    if not _wait_port(head, port, HEAD_WAIT_S):
        raise RuntimeError(f"no Ray head at {head}:{port} after {HEAD_WAIT_S} s")
    node_ip = head if head == "127.0.0.1" else socket.gethostbyname(socket.gethostname())
    proc = subprocess.Popen(_ray_cli(f"--address={head}:{port}", f"--node-ip-address={node_ip}",
                                     *node_args(local_rank, num_cpus, num_gpus, temp_dir)), env=env)
    log.info("joined the Ray cluster at %s:%d; serving until the pipeline is done", head, port)
    try:
        while proc.poll() is None and not done():
            time.sleep(2)
        yield False
    finally:
        _stop(proc)


def _wait_nodes(world_size: int, timeout_s: float = HEAD_WAIT_S) -> None:
    """Start only when every rank's node has joined, so the first stages are spread out."""
    import ray

    deadline = time.monotonic() + timeout_s
    while sum(1 for n in ray.nodes() if n["Alive"]) < world_size:
        if time.monotonic() > deadline:
            log.warning("only %d of %d Ray nodes joined; starting anyway",
                        sum(1 for n in ray.nodes() if n["Alive"]), world_size)
            return
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
