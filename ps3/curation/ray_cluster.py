"""One Ray cluster out of a stage's workers: embedded for one process, head + nodes for more.

Inside a PyTorchJob every pod already knows the rendezvous (MASTER_ADDR, RANK): rank 0
starts a Ray head on the fixed ports the pod spec and NetworkPolicy name
(`ps3_platform.ports.RAY_PORTS`), the other ranks start a Ray node that joins it and stay
until rank 0 says how the pipeline ended (a flag file under the output) or the head goes
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
from collections.abc import Callable, Iterator

from ps3_platform.ports import RAY_PORT_STRIDE, RAY_PORTS, RAY_WORKER_PORTS

log = logging.getLogger(__name__)

#: How long a joining node waits for the head's port (rank 0 starts it before any other work).
HEAD_WAIT_S = 600


class RayClusterError(RuntimeError):
    """The Ray cluster could not form, or the driver ended it without success."""


def _ray_start(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats", "--block"]


def node_args(local_rank: int, local_world: int, num_cpus: int | None, num_gpus: int, temp_dir: str) -> list[str]:
    """Ports of this node: fixed ones shifted per local rank, and a share of the worker range,
    so several nodes fit on one host (pods run one; the local backend may run more)."""
    shift = local_rank * RAY_PORT_STRIDE
    low, high = RAY_WORKER_PORTS
    share = (high - low + 1) // max(1, local_world)
    first = low + local_rank * share
    names = {"ray-node-mgr": "node-manager-port", "ray-object-mgr": "object-manager-port",
             "ray-env-agent": "runtime-env-agent-port", "ray-metrics": "metrics-export-port",
             "ray-agent-grpc": "dashboard-agent-grpc-port", "ray-agent-http": "dashboard-agent-listen-port"}
    args = [f"--{flag}={RAY_PORTS[name] + shift}" for name, flag in names.items()]
    args += [f"--min-worker-port={first}", f"--max-worker-port={first + share - 1}", f"--num-gpus={num_gpus}",
             f"--temp-dir={temp_dir}"]
    return args + ([f"--num-cpus={num_cpus}"] if num_cpus else [])  # else Ray reads the container's CPU limit


def _head_address() -> str:
    head = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return "127.0.0.1" if head == "localhost" else head


def _own_ip(head: str) -> str:
    return head if head == "127.0.0.1" else socket.gethostbyname(socket.gethostname())


def _wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RayClusterError(f"`ray start` exited with code {proc.returncode} before opening port {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
            return
        time.sleep(1)
    raise RayClusterError(f"no Ray head at {host}:{port} after {timeout_s:g} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def embedded(num_cpus: int | None, num_gpus: int, temp_dir: str) -> Iterator[None]:
    import ray

    # address="local": always a Ray of our own, even when another one runs on this machine
    # (ray.init() would otherwise join that one and refuse our CPU and GPU counts)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _temp_dir=temp_dir, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def head(world_size: int, local_rank: int, local_world: int, num_cpus: int | None, num_gpus: int,
         temp_dir: str) -> Iterator[None]:
    """Rank 0: start the head, connect this process as the driver, wait for the other nodes."""
    import ray

    ip, port = _own_ip(_head_address()), RAY_PORTS["ray-gcs"]
    proc = subprocess.Popen(_ray_start("--head", f"--port={port}", f"--node-ip-address={ip}",
                                       "--include-dashboard=false",
                                       *node_args(local_rank, local_world, num_cpus, num_gpus, temp_dir)))
    try:
        _wait_port(ip, port, HEAD_WAIT_S, proc)
        ray.init(address=f"{ip}:{port}", configure_logging=False)
        log.info("Ray head at %s:%d; waiting for %d more nodes", ip, port, world_size - 1)
        _wait_nodes(world_size)
        yield
    finally:
        ray.shutdown()
        _stop(proc)


def join(local_rank: int, local_world: int, num_cpus: int | None, num_gpus: int, temp_dir: str,
         outcome: Callable[[], str | None]) -> None:
    """Other ranks: serve as a Ray node until the driver's `outcome()` is "ok" (return) or
    "failed" (raise), or until the node stops because the head went away (raise)."""
    address, port = _head_address(), RAY_PORTS["ray-gcs"]
    _wait_port(address, port, HEAD_WAIT_S)
    proc = subprocess.Popen(_ray_start(f"--address={address}:{port}", f"--node-ip-address={_own_ip(address)}",
                                       *node_args(local_rank, local_world, num_cpus, num_gpus, temp_dir)))
    log.info("joined the Ray cluster at %s:%d; serving until the pipeline is done", address, port)
    try:
        while (state := outcome()) is None:
            if proc.poll() is not None:
                raise RayClusterError(f"this Ray node stopped (code {proc.returncode}) before the driver finished: "
                                      "the head is gone")
            time.sleep(2)
        if state != "ok":
            raise RayClusterError(f"the driver (rank 0) ended the pipeline with {state!r}")
    finally:
        _stop(proc)


def _wait_nodes(world_size: int, timeout_s: float = HEAD_WAIT_S) -> None:
    """Start only when every rank's node has joined, so the first stages are spread out."""
    import ray

    deadline = time.monotonic() + timeout_s
    while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < world_size:
        if time.monotonic() > deadline:
            log.warning("only %d of %d Ray nodes joined; starting anyway", alive, world_size)
            return
        time.sleep(1)


def disable_implicit_auth() -> None:
    """Ray turns token auth on by itself when it finds ~/.ray/auth_token, and then refuses any
    node or driver without that file. A job's pods reach each other only (its NetworkPolicy),
    so the default is no token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from a Secret) in
    the stage's env to have one."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
