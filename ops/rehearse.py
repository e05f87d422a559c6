"""Pod rehearsal (issue 17, item 2): the compiled Master and Worker pods, run as two containers.

    make rehearse                     reuse the image if buildah has it, else build it
    REHEARSE_BUILD=1 make rehearse    rebuild the image first (`make image`, ~8 minutes)
    REHEARSE_KEEP=1 make rehearse     keep the two containers for the next run (and reuse kept ones)

Not part of CI: building the 7.4 GB image (torch with its CUDA libraries) takes about 8 minutes
and needs buildah and, where no registry can be pulled from, mmdebstrap for the Debian base;
docs/benchmarks.md ("Container image") records the build and a rehearsal. Run it as root (buildah's
vfs storage and chroot isolation), on a machine with ~20 GB free for the two containers.

What it does, with nothing the pods would not have:
1. The image `default_image()` names, built with `make image` unless buildah already has it.
2. SeaweedFS S3 on loopback; `platformctl render` of a 2-node `noop` job (1 process per node)
   that checkpoints to `s3://rehearsal/ckpt` through it.
3. From the PyTorchJob's Master and Worker pod templates: the container's command, args and env
   (secretKeyRef values from a stand-in Secret, the only place credentials appear), its volume
   mounts (the spec ConfigMap's content read-only, emptyDirs as fresh host directories), its
   user and group, plus the variables the training operator adds to a fixed-size PyTorchJob
   (`operator_env`). The containers share the host network, as chroot isolation must, so
   MASTER_ADDR is 127.0.0.1 and MASTER_PORT and each pod's metrics port are free host ports.
4. Each container (`buildah run --isolation chroot`) starts as root only to remount its root
   filesystem read-only, then `setpriv` drops to the pod's uid/gid with no capabilities and
   no_new_privs (the container securityContext) and execs the pod's command. A probe first
   shows that writing to / fails and the mounted emptyDirs are writable.
5. Both train until a checkpoint at step `KILL_AFTER` or later is committed and two more steps
   are done (work the restart must redo), are killed with SIGKILL,
   and start again with the same command and env on fresh emptyDirs (a recreated pod); the
   second attempt must resume from a committed step > 0 and finish.
The last line of output is one JSON object: steps, resumed_step, seconds, ...
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ps3_platform.compile.options import default_image
from ps3_platform.ports import free_port
from ps3_platform.testing import SeaweedS3
from ps3_platform.testing.seaweedfs import ACCESS_KEY, SECRET_KEY

ROOT = Path(__file__).resolve().parents[1]
BUILDAH = ["buildah", "--storage-driver", "vfs"]
BUCKET = "rehearsal"
SECRET = "rehearsal-s3"
STEPS = 30
INTERVAL = 5
KILL_AFTER = 10  # kill once a step at or past this one is committed and two more steps are done
TIMEOUT_S = 600.0  # per attempt; a cold start of torch on 2 shared cores takes ~30 s
BASE_IMAGE = "localhost/ps3-base:bookworm"
BASE_PACKAGES = "python3.11,python3.11-venv,python3-pip,ca-certificates,libjpeg62-turbo,libgomp1"
#: This machine's package mirrors and its proxy's CA, lent to the build where they exist.
BUILD_MOUNTS = ("/opt/wheels", "/opt/pypi", "/opt/pypi-more", "/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt")
#: Run first in each container: make / read-only, then become the pod's user with no privileges.
ENTRY = ('mount -o remount,bind,ro / && uid=$0 gid=$1 && shift && exec setpriv --reuid="$uid" --regid="$gid" '
         '--groups="$gid" --no-new-privs --bounding-set=-all --inh-caps=-all -- "$@"')
PROBE = ('if touch /probe 2>/dev/null; then exit 3; fi; for d in "$@"; do touch "$d/probe" || exit 4; done; '
         'grep -q "^CapEff:[[:space:]]*0*$" /proc/self/status || exit 5; echo "$(id -u):$(id -g)"')

JOB = f"""\
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: rehearsal}}
spec:
  task: noop
  resources: {{pool: cpu, nodes: 2, procsPerNode: 1}}
  storage: {{endpoint: "{{endpoint}}", region: us-east-1, credentialsSecret: {SECRET}}}
  train: {{globalBatch: 8, steps: {STEPS}}}
  checkpoint: {{uri: "s3://{BUCKET}/ckpt", intervalSteps: {INTERVAL}}}
  monitoring: {{logEverySteps: 1}}
  params: {{stepSeconds: 0.5}}   # slow enough that the kill lands mid-run
"""


def say(text: str) -> None:
    print(f"rehearse: {text}", flush=True)


# ---- the image ----------------------------------------------------------------------------
def image_present(ref: str) -> bool:
    return subprocess.run([*BUILDAH, "inspect", "--type", "image", ref], capture_output=True, check=False).returncode == 0


def build_base(work: Path) -> None:
    """A Debian bookworm base made offline (no registry needed), as docs/benchmarks.md records."""
    tar = work / "base" / "base.tar"  # in a folder, so the cleanup removes it
    tar.parent.mkdir()
    subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tar)],
                   check=True)
    ctr = subprocess.run([*BUILDAH, "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run([*BUILDAH, "add", ctr, str(tar), "/"], check=True)
        subprocess.run([*BUILDAH, "commit", ctr, BASE_IMAGE], check=True)
    finally:
        subprocess.run([*BUILDAH, "rm", ctr], capture_output=True, check=False)


def ensure_image(image: str, work: Path) -> str:
    """Reuse the image unless REHEARSE_BUILD=1 or it is missing; returns what was done."""
    if os.environ.get("REHEARSE_BUILD", "0") != "1" and image_present(image):
        return "reused"
    if not image_present(BASE_IMAGE):
        build_base(work)
    args = ["--isolation chroot", f"--build-arg BASE_IMAGE={BASE_IMAGE}",
            f"--build-arg 'TORCH={os.environ['REHEARSE_TORCH']}'",  # the Makefile's TORCH (make rehearse)
            *(f"--volume {p}:{p}:ro" for p in BUILD_MOUNTS if os.path.exists(p))]
    subprocess.run(["make", "-C", str(ROOT), "image", "ENGINE=buildah", "BUILDAH_FLAGS=--storage-driver vfs",
                    f"BUILD_ARGS={os.environ.get('REHEARSE_BUILD_ARGS', ' '.join(args))}"], check=True)
    return "built"


# ---- the pods, from the rendered objects ----------------------------------------------------
def render(job_text: str, work: Path) -> list[dict]:
    """`platformctl render -o json`, as a user would run it."""
    spec = work / "job.yaml"
    spec.write_text(job_text)
    platformctl = Path(sys.executable).with_name("platformctl")
    out = subprocess.run([str(platformctl), "render", "-o", "json", str(spec)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def operator_env(job: dict, replica: str, index: int, master_port: int) -> dict[str, str]:
    """What the Kubeflow training operator (v1.9) adds to a fixed-size PyTorchJob's containers.

    envvar.go/master.go: the rendezvous variables torchrun reads; MASTER_ADDR names the Master
    pod's Service in a cluster, 127.0.0.1 here. Elastic jobs (no Master) get PET_RDZV_* instead.
    """
    spec = job["spec"]
    if "elasticPolicy" in spec:
        raise SystemExit("rehearse: the rehearsal runs a fixed-size job (Master + Worker), not an elastic one")
    replicas = sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())
    nproc = spec.get("nprocPerNode", "auto")
    rank = 0 if replica == "Master" else index + 1
    env = {"PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(master_port), "PET_MASTER_PORT": str(master_port),
           "WORLD_SIZE": str(replicas * (int(nproc) if nproc.isdigit() else 1)),
           "RANK": str(rank), "PET_NODE_RANK": str(rank), "PET_NNODES": str(replicas)}
    if nproc:
        env["PET_NPROC_PER_NODE"] = nproc
    return env


def container_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env with secretKeyRef resolved from `secrets`, as the kubelet does."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@dataclass
class Pod:
    """One replica of the PyTorchJob, as this rehearsal runs it."""

    name: str  # also the buildah container's name
    template: dict
    configmaps: dict[str, dict]
    env: dict[str, str]
    logs: list[Path] = field(default_factory=list)
    volumes: dict[str, Path] = field(default_factory=dict)  # mount path -> host dir (this attempt)

    @property
    def container(self) -> dict:
        return self.template["spec"]["containers"][0]

    @property
    def user(self) -> tuple[int, int]:
        context = {**self.template["spec"].get("securityContext", {}), **self.container.get("securityContext", {})}
        return int(context["runAsUser"]), int(context["runAsGroup"])

    def command(self) -> list[str]:
        return [*self.container["command"], *self.container.get("args", [])]

    def prepare_volumes(self, work: Path) -> list[str]:
        """Host directories for this attempt's volumes (fresh: a recreated pod); buildah -v flags."""
        volumes = {v["name"]: v for v in self.template["spec"]["volumes"]}
        gid = self.user[1]
        flags = []
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            host = Path(tempfile.mkdtemp(prefix=f"{self.name}-{mount['name']}-", dir=work))
            if "configMap" in volume:
                data = self.configmaps[volume["configMap"]["name"]]["data"]
                for item in volume["configMap"]["items"]:
                    (host / item["path"]).write_text(data[item["key"]])
                host.chmod(0o755)
            else:  # emptyDir: writable by the pod's group (fsGroup), like the kubelet's 0777 + setgid
                os.chown(host, 0, gid)
                host.chmod(0o2777)
            self.volumes[mount["mountPath"]] = host
            flags += ["-v", f"{host}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
        return flags

    def run_args(self, work: Path, argv: list[str]) -> list[str]:
        """`buildah run` of `argv` as the pod's user, on a read-only root with the pod's mounts."""
        uid, gid = self.user
        env = [arg for k, v in self.env.items() for arg in ("-e", f"{k}={v}")]
        return [*BUILDAH, "run", "--isolation", "chroot", "--network", "host", "--cap-add", "CAP_SYS_ADMIN",
                "--user", "0:0", *self.prepare_volumes(work), *env, self.name, "--",
                "sh", "-c", ENTRY, str(uid), str(gid), *argv]


def pods_from(objects: list[dict], secrets: dict, master_port: int) -> list[Pod]:
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    job = next(o for o in objects if o["kind"] == "PyTorchJob")
    pods = []
    for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
        for index in range(spec["replicas"]):
            template = spec["template"]
            env = {**container_env(template["spec"]["containers"][0], secrets),
                   **operator_env(job, replica, index, master_port),
                   "PS3_METRICS_PORT": str(free_port())}  # one network namespace for both pods here
            pods.append(Pod(f"ps3-rehearse-{replica.lower()}-{index}", template, configmaps, env))
    return pods


# ---- running them ---------------------------------------------------------------------------
def create_containers(pods: list[Pod], image: str) -> None:
    """Fresh containers (~30 s each: vfs copies the image), or with REHEARSE_KEEP=1 the kept ones."""
    for pod in pods:
        kept = subprocess.run([*BUILDAH, "inspect", "--type", "container", pod.name], capture_output=True, check=False)
        if os.environ.get("REHEARSE_KEEP") == "1" and kept.returncode == 0:
            continue  # the root is read-only in every run, so a kept container is as good as new
        subprocess.run([*BUILDAH, "rm", pod.name], capture_output=True, check=False)  # a stale one from an earlier run
        subprocess.run([*BUILDAH, "from", "--name", pod.name, image], check=True, capture_output=True)


def remove_containers(pods: list[Pod]) -> None:
    for pod in pods:
        subprocess.run([*BUILDAH, "rm", pod.name], capture_output=True, check=False)


def probe_read_only(pod: Pod, work: Path) -> list[str]:
    """Writing to / fails, every writable mount takes a file, no capabilities, the pod's uid:gid; returns the mounts."""
    writable = [m["mountPath"] for m in pod.container["volumeMounts"] if not m.get("readOnly")]
    done = subprocess.run(pod.run_args(work, ["sh", "-c", PROBE, "probe", *writable]), capture_output=True,
                          text=True, check=False)
    if done.returncode != 0 or done.stdout.strip() != "{}:{}".format(*pod.user):
        raise SystemExit(f"rehearse: probe in {pod.name} failed ({done.returncode}: 3 / is writable, 4 a mount is "
                         f"not, 5 capabilities left; ran as {done.stdout.strip()!r}): {done.stderr.strip()}")
    return writable


def start(pod: Pod, work: Path, attempt: int) -> subprocess.Popen:
    log = work / f"{pod.name}.attempt{attempt}.log"
    pod.logs.append(log)
    with log.open("wb") as out:
        return subprocess.Popen(pod.run_args(work, pod.command()), stdout=out, stderr=subprocess.STDOUT)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a buildah run and everything under it (the container's processes), as a node loss would."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def committed_steps(server: SeaweedS3) -> list[int]:
    """Steps with a manifest in the store (the checkpointer writes it last, after every rank's files)."""
    fs = server.filesystem(skip_instance_cache=True)
    found = fs.glob(f"{BUCKET}/ckpt/rehearsal/train/step-*/manifest.json")
    return sorted(int(re.search(r"step-(\d+)", path).group(1)) for path in found)


def wait_for(predicate, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.time() + TIMEOUT_S
    while not predicate():
        if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
            raise SystemExit(f"rehearse: gave up waiting for {what} (exit codes {[p.poll() for p in procs]})")
        time.sleep(1.0)


def last_match(pattern: str, log: Path) -> int | None:
    found = re.findall(pattern, log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def step_of(pod: Pod) -> int:
    """The last step its current attempt logged (rank 0 logs every step in this job)."""
    return last_match(rf"step (\d+)/{STEPS}", pod.logs[-1]) or 0


# ---- the rehearsal --------------------------------------------------------------------------
def rehearse(work: Path) -> dict:
    t0 = time.time()
    image = default_image()
    built = ensure_image(image, work)
    say(f"image {image} ({built}, {time.time() - t0:.0f} s)")
    server = SeaweedS3(work / "s3").start()
    pods: list[Pod] = []
    try:
        server.make_bucket(BUCKET)
        objects = render(JOB.replace("{endpoint}", server.endpoint), work)
        pods = pods_from(objects, {SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}},
                         master_port=free_port())
        t = time.time()
        create_containers(pods, image)
        say(f"containers {', '.join(p.name for p in pods)} created ({time.time() - t:.0f} s)")
        for pod in pods:
            writable = probe_read_only(pod, work)
        say(f"root filesystem read-only as uid/gid {pods[0].user}; writable: {', '.join(writable)}")
        return {"image": image, "image_step": built, **run_attempts(pods, server, work)}
    finally:
        server.stop()
        if os.environ.get("REHEARSE_KEEP") != "1":
            remove_containers(pods)
        for path in work.iterdir():  # the volumes and the store; the logs stay
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def run_attempts(pods: list[Pod], server: SeaweedS3, work: Path) -> dict:
    """Attempt 1 until a commit past KILL_AFTER, SIGKILL both, attempt 2 to the end."""
    t = time.time()
    procs = [start(pod, work, 1) for pod in pods]
    def mid_interval() -> bool:
        committed = committed_steps(server)
        return bool(committed) and max(committed) >= KILL_AFTER and step_of(pods[0]) >= max(committed) + 2

    try:
        wait_for(mid_interval, procs, f"a commit at step {KILL_AFTER}+ and two steps more")
    finally:
        for proc in procs:
            kill_tree(proc)
    first_s, committed = time.time() - t, committed_steps(server)
    reached = step_of(pods[0])
    say(f"attempt 1: step {reached} reached, steps {committed} committed, both killed (SIGKILL) at {first_s:.0f} s")

    t = time.time()
    procs = [start(pod, work, 2) for pod in pods]
    wait_for(lambda: all(p.poll() is not None for p in procs), procs, "attempt 2 to finish")
    second_s = time.time() - t
    codes = [p.returncode for p in procs]
    resumed = [last_match(r"resumed from step (\d+)", pod.logs[-1]) for pod in pods]
    final = step_of(pods[0])
    first_step_s = re.findall(r"first step after the restart: ([\d.]+) s", pods[0].logs[-1].read_text())
    ok = codes == [0, 0] and resumed[0] and resumed[0] == max(committed) and len(set(resumed)) == 1 \
        and final == STEPS and max(committed_steps(server)) == STEPS
    say(f"attempt 2: exit codes {codes}, resumed from step {resumed[0]} on every rank ({reached - resumed[0]} steps "
        f"redone), finished at step {final} ({second_s:.0f} s); logs in {work}")
    if not ok:
        raise SystemExit(f"rehearse: FAILED; see {', '.join(str(p.logs[-1]) for p in pods)}")
    return {"nodes": len(pods), "steps": STEPS, "committed_before_kill": max(committed), "killed_at_step": reached,
            "resumed_step": resumed[0], "lost_steps": reached - resumed[0], "final_step": final,
            "restart_to_first_step_s": float(first_step_s[-1]) if first_step_s else None,
            "attempt1_s": round(first_s, 1), "attempt2_s": round(second_s, 1)}


def main() -> int:
    if shutil.which("buildah") is None:
        raise SystemExit("rehearse: needs buildah (and mmdebstrap to build the base image offline)")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="ps3-rehearse-"))
    os.chmod(work, 0o755)
    result = rehearse(work)
    result["seconds"] = round(time.time() - started, 1)
    say("passed: two pods trained, were killed, and resumed from the committed checkpoint")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
