"""Fixtures for the ops tests: Prometheus binaries, training workers, cluster exporters.

- `prometheus_bins`: Debian's promtool/prometheus. Missing binaries skip the tests here
  and fail them where $PS3_REQUIRE_PROMETHEUS is set (CI installs the package).
- `training_metrics_targets`: the workers whose /metrics Prometheus scrapes.
- `cluster_exporters`: an HTTP server with what a cluster adds next to the workers: DCGM
  exporter text per node and kube-state-metrics series, consistent with the workers.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ps3_platform.ports import free_port

HERE = Path(__file__).resolve().parent
NAMESPACE = "ps3"
NODES = ("gpu-node-a", "gpu-node-b")
#: Node -> GPU product label, matching the chart's default h100/a100 pool nodeSelectors.
NODE_PRODUCTS = {"gpu-node-a": "NVIDIA-H100-80GB-HBM3", "gpu-node-b": "NVIDIA-A100-SXM4-80GB"}
GPUS_PER_NODE = 4
GPUS_PER_POD = 2


@dataclass(frozen=True)
class TrainingTarget:
    """One worker's metrics endpoint and who it is; pod/node are what a cluster would add."""

    address: str  # host:port
    job: str
    stage: str
    rank: int

    @property
    def pod(self) -> str:
        return f"{self.job}-{self.stage}-worker-{self.rank}"

    @property
    def node(self) -> str:
        return NODES[self.rank % len(NODES)]


@dataclass(frozen=True)
class PrometheusBins:
    promtool: str
    prometheus: str


@pytest.fixture(scope="session")
def prometheus_bins() -> PrometheusBins:
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if promtool and prometheus:
        return PrometheusBins(promtool, prometheus)
    message = "promtool/prometheus not on PATH (apt-get install --no-install-recommends prometheus)"
    if os.environ.get("PS3_REQUIRE_PROMETHEUS"):
        pytest.fail(f"PS3_REQUIRE_PROMETHEUS is set but {message}")
    pytest.skip(message)


LIVE_JOB = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: live}
spec:
  task: ps3_pretrain
  resources: {pool: cpu, procsPerNode: 2}
  model: {preset: ps3-tiny}
  data:
    sources: [{name: scene, uri: "DATA/scene"}]
    numWorkers: 0
    tokenizer: DATA/tokenizer.json
  train: {globalBatch: 4, steps: 100000, optimizer: {lr: 1.0e-3}}
  checkpoint: {intervalSteps: 5, keep: 1}
  monitoring: {logEverySteps: 1}
"""


def _live_data(root: Path) -> str:
    """A few small synthetic scenes plus an undecodable image and an image without json (bad samples)."""
    from ps3.data import ShardWriter, build_index, synth
    from ps3.model import train_tiny_tokenizer
    from ps3.tasks.synth import vocabulary_captions

    data = f"file://{root}/data"
    config = synth.SynthConfig(scene_size=(384, 512), texture=False)
    with ShardWriter(f"{data}/scene", "scene", samples_per_shard=50) as writer:
        for i in range(12):
            image, ext, record = synth.sample("scene", 0, i, config)
            writer.write(record.key, image, ext, record)
        writer.write_members("corrupt00000001", {"jpg": b"not a jpeg", "json": record.to_json()})
        writer.write_members("nojson00000002", {"jpg": image})
    build_index(f"{data}/scene")
    train_tiny_tokenizer(vocabulary_captions(), f"{data}/tokenizer.json")
    return data


@pytest.fixture(scope="module")  # module: the run must not keep two cores busy for the rest of the suite
def training_metrics_targets(tmp_path_factory):
    """A real local training run: `ps3_pretrain` of the tiny preset on 2 torchrun workers.

    The data hold two bad samples, so the bad-sample counter has series; checkpoints
    every 5 steps give the checkpoint panels data. The run is cancelled at the end.
    """
    from ps3_platform.backends.local import LocalBackend
    from ps3_platform.spec import load_text

    root = tmp_path_factory.mktemp("live-run")
    data = _live_data(root)
    backend = LocalBackend(home=root / "home")
    job = load_text(LIVE_JOB.replace("DATA", data)).job
    backend.submit(job, [])
    state_file = backend.run_dir("live") / "state.json"
    metrics_log = backend.run_dir("live") / "train" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics_log.exists() and metrics_log.read_text().count("\n") >= 6):
        if time.time() > deadline or backend.status("live").done:
            pytest.fail(f"live training run did not start: {backend.status('live')}")
        time.sleep(0.5)
    ports = json.loads(state_file.read_text())["stages"]["train"]["metrics_ports"]
    try:
        yield [TrainingTarget(f"127.0.0.1:{port}", "live", "train", rank) for rank, port in enumerate(ports)]
    finally:
        backend.cancel("live")


def _series(name: str, labels: dict[str, str], value: float) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{body}}} {value}"


DCGM_FIELDS = {  # name -> (help, value for a busy GPU, value for an idle one)
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", 87, 3),
    "DCGM_FI_PROF_SM_ACTIVE": ("Ratio of cycles an SM has at least 1 warp assigned.", 0.81, 0.02),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("Ratio of cycles the tensor (HMMA) pipe is active.", 0.55, 0.0),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", 61234, 512),
    "DCGM_FI_DEV_FB_FREE": ("Framebuffer memory free (in MiB).", 18000, 78722),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", 612.5, 71.0),
}


def dcgm_text(node: str, targets: list[TrainingTarget]) -> str:
    """DCGM exporter 4.x output of one node in kubernetes mode.

    The first GPUS_PER_POD GPUs of each pod on the node are attributed to it (the second
    one idles, so 'allocated but idle' has something to find); the rest are unassigned.
    """
    pods = [t for t in targets if t.node == node]
    lines = []
    for name, (doc, busy, idle) in DCGM_FIELDS.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
        for gpu in range(GPUS_PER_NODE):
            labels = {"gpu": str(gpu), "UUID": f"GPU-{node}-{gpu}", "pci_bus_id": f"00000000:{gpu + 7:02X}:00.0",
                      "device": f"nvidia{gpu}", "modelName": NODE_PRODUCTS[node].replace("-", " "),
                      "Hostname": node, "DCGM_FI_DRIVER_VERSION": "550.54.15"}
            owner = pods[gpu // GPUS_PER_POD] if gpu // GPUS_PER_POD < len(pods) else None
            if owner:
                labels |= {"container": "pytorch", "namespace": NAMESPACE, "pod": owner.pod}
            lines.append(_series(name, labels, busy if owner and gpu % GPUS_PER_POD == 0 else idle))
    return "\n".join(lines) + "\n"


def ksm_text(targets: list[TrainingTarget]) -> str:
    """kube-state-metrics series for the training pods and GPU nodes (labels allowlisted)."""
    lines = []
    for t in targets:
        pod = {"namespace": NAMESPACE, "pod": t.pod, "uid": f"uid-{t.pod}"}
        lines.append(_series("kube_pod_labels", pod | {"label_app_kubernetes_io_part_of": "ps3-platform",
                                                       "label_ps3_platform_job": t.job,
                                                       "label_ps3_platform_stage": t.stage}, 1))
        for phase in ("Pending", "Running", "Succeeded", "Failed", "Unknown"):
            lines.append(_series("kube_pod_status_phase", pod | {"phase": phase}, int(phase == "Running")))
        lines.append(_series("kube_pod_container_resource_requests", pod | {
            "container": "pytorch", "node": t.node, "resource": "nvidia_com_gpu", "unit": "integer"}, GPUS_PER_POD))
    for node, product in NODE_PRODUCTS.items():
        lines.append(_series("kube_node_labels", {"node": node, "label_nvidia_com_gpu_product": product}, 1))
        lines.append(_series("kube_node_status_allocatable",
                             {"node": node, "resource": "nvidia_com_gpu", "unit": "integer"}, GPUS_PER_NODE))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Exporters:
    """Where the cluster-side fixture series are served, and the names they use."""

    address: str  # host:port
    namespace: str = NAMESPACE
    nodes: tuple[str, ...] = NODES

    def dcgm_path(self, node: str) -> str:
        return f"/dcgm/{node}/metrics"

    ksm_path = "/ksm/metrics"


@pytest.fixture(scope="module")
def cluster_exporters(training_metrics_targets):
    """Serves /dcgm/<node>/metrics and /ksm/metrics on loopback; yields an Exporters."""
    pages = {f"/dcgm/{node}/metrics": dcgm_text(node, training_metrics_targets) for node in NODES}
    pages["/ksm/metrics"] = ksm_text(training_metrics_targets)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Exporters(f"127.0.0.1:{server.server_address[1]}")
    server.shutdown()


def _chart_engine():
    import importlib.util

    path = HERE.parents[1] / "manifests" / "render.py"
    spec = importlib.util.spec_from_file_location("ps3_manifests_render_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def chart_rule_groups():
    """render(values) -> the `groups` of the chart's PrometheusRule (what the operator loads)."""
    engine = _chart_engine()

    def render(values: dict | None = None) -> list[dict]:
        objs = engine.objects(engine.render(values or {}))
        return next(o for _, o in objs if o["kind"] == "PrometheusRule")["spec"]["groups"]

    return render


@pytest.fixture(scope="session")
def chart_pod_monitor() -> dict:
    """The chart's rendered PodMonitor for training pods (default values)."""
    engine = _chart_engine()
    return next(o for _, o in engine.objects(engine.render({})) if o["kind"] == "PodMonitor")
