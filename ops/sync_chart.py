"""Copy what the Helm chart ships from its single sources into helm/ps3-platform/files/.

    python ops/sync_chart.py          # regenerate dashboards JSON, then copy into the chart
    python ops/sync_chart.py --check  # exit 1 when a chart copy differs from its source

Helm can only read files inside the chart directory, so the chart carries copies; this
script is the only thing that writes them and tests/ops fails when they drift:
  ops/prometheus/ps3-platform.rules.yaml -> files/prometheus/ps3-platform.rules.yaml
  ops/dashboards/*.json                  -> files/dashboards/*.json
  ../shared/schemas/pytorchjob.yaml      -> files/crds/kubeflow.org_pytorchjobs.yaml
The CRD is the training operator's v1.9.0 file byte for byte; its git blob hash is
pinned here so the check works where the shared schemas directory is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHART_FILES = REPO / "helm" / "ps3-platform" / "files"
SCHEMAS = Path(os.environ.get("PS3_SCHEMAS_DIR", REPO.parent / "shared" / "schemas"))
#: `git hash-object` of upstream manifests/base/crds/kubeflow.org_pytorchjobs.yaml at v1.9.0.
PYTORCHJOB_CRD_BLOB = "1f8c8bc8734bc81bc525bd86e8ee8a6423fadba3"
CRD_COPY = CHART_FILES / "crds" / "kubeflow.org_pytorchjobs.yaml"


def git_blob_hash(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def copies() -> dict[Path, Path]:
    """Chart copy -> source, for the rules and every committed dashboard."""
    rules = "ps3-platform.rules.yaml"
    pairs = {CHART_FILES / "prometheus" / rules: REPO / "ops" / "prometheus" / rules}
    for source in sorted((REPO / "ops" / "dashboards").glob("*.json")):
        pairs[CHART_FILES / "dashboards" / source.name] = source
    return pairs


def drift() -> list[str]:
    """One line per chart file that is missing, stale, or not a source anymore."""
    problems = []
    wanted = copies()
    for copy, source in wanted.items():
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            problems.append(f"{copy.relative_to(REPO)} differs from {source.relative_to(REPO)}")
    for extra in sorted((CHART_FILES / "dashboards").glob("*.json")):
        if extra not in wanted:
            problems.append(f"{extra.relative_to(REPO)} has no source in ops/dashboards/")
    if not CRD_COPY.exists() or git_blob_hash(CRD_COPY.read_bytes()) != PYTORCHJOB_CRD_BLOB:
        problems.append(f"{CRD_COPY.relative_to(REPO)} is not the upstream v1.9.0 PyTorchJob CRD")
    return problems


def sync() -> None:
    subprocess.run([sys.executable, str(REPO / "ops" / "dashboards" / "generate.py")], check=True)
    for stale in (CHART_FILES / "dashboards").glob("*.json"):
        stale.unlink()
    for copy, source in copies().items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(source.read_bytes())
    crd = (SCHEMAS / "pytorchjob.yaml").read_bytes()
    if git_blob_hash(crd) != PYTORCHJOB_CRD_BLOB:
        raise SystemExit(f"{SCHEMAS / 'pytorchjob.yaml'} is not the pinned v1.9.0 CRD (blob {PYTORCHJOB_CRD_BLOB})")
    CRD_COPY.parent.mkdir(parents=True, exist_ok=True)
    CRD_COPY.write_bytes(crd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a chart copy drifted")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for line in problems:
            print(f"drift: {line}; run python ops/sync_chart.py", file=sys.stderr)
        return 1 if problems else 0
    sync()
    print(f"synced {len(copies()) + 1} files into {CHART_FILES.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
