"""The container image recipe: what the compiled pods need of it, checked without building it
(building it takes a container engine and minutes; docs/benchmarks.md records a build)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from ps3_platform.compile.options import default_image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = (ROOT / "Containerfile").read_text()
INSTRUCTIONS = [line.split(None, 1) for line in RECIPE.splitlines() if line and not line.startswith((" ", "#"))]


def test_multi_stage_non_root_without_healthcheck_or_secrets():
    stages = [rest for op, rest in INSTRUCTIONS if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build") and "--from=build" in RECIPE
    assert [rest for op, rest in INSTRUCTIONS if op == "USER"] == ["1000:1000"]
    assert "useradd --uid 1000 --gid 1000" in RECIPE
    assert not any(op == "HEALTHCHECK" for op, _ in INSTRUCTIONS)
    code = "\n".join(line for line in RECIPE.splitlines() if not line.startswith("#"))
    assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", code, re.IGNORECASE)  # credentials come from the Secret


def test_base_image_and_torch_are_build_args_and_the_project_goes_in_as_a_wheel():
    args = {rest.split("=")[0] for op, rest in INSTRUCTIONS if op == "ARG"}
    assert {"BASE_IMAGE", "TORCH"} <= args
    assert "pip wheel" in RECIPE and "/wheels/*.whl" in RECIPE
    assert "ENV PATH=/opt/ps3/bin:" in RECIPE  # the pods run `python -m ps3_platform.runtime.launch`


def test_make_image_tags_with_the_version_the_compiler_writes():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    plan = subprocess.run(["make", "-n", "image", "ENGINE=buildah"], cwd=ROOT, capture_output=True, text=True,
                          check=True, env=env).stdout
    lines = plan.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("buildah") and " bud" in line)
    tag = re.search(r'-t "\$\((.+)\)"', lines[start + 1]).group(1)
    assert "default_image()" in tag and default_image().endswith(":" + __import__("ps3_platform").__version__)
