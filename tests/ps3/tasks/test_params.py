"""Every task's params are a typed model checked at `validate`: a misspelt or mistyped key is a
FILE:LINE error with a did-you-mean, before anything starts, without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ps3.tasks import PARAM_CHECKS, TASKS
from ps3.tasks.params import PARAM_MODELS, check_params
from ps3_platform.cli import main

ROOT = Path(__file__).resolve().parents[3]


def test_every_task_declares_its_params():
    assert set(TASKS) == set(PARAM_MODELS) | set(PARAM_CHECKS)


@pytest.mark.parametrize("override, where, message", [
    ("spec.stages[2].params.canvasSise=[1,2]", "spec.stages[2].params.canvasSise",
     "unknown param (did you mean 'canvasSize'?)"),
    ("spec.stages[6].params.modes=[sideways]", "spec.stages[6].params.modes[0]", "Input should be 'after_prompt'"),
    ("spec.stages[0].params.trainSamples=many", "spec.stages[0].params.trainSamples", "valid integer"),
    ("spec.stages[1].params.inputs=[]", "spec.stages[1].params.inputs", "at least 1 item"),
])
def test_bad_params_are_file_line_errors_at_validate(capsys, override, where, message):
    spec = ROOT / "jobs" / "vila_hd_quickstart.yaml"
    assert main(["validate", str(spec), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{spec}:") and f": {where}: " in err and message in err
    assert len(err.splitlines()) == 1


def test_unknown_params_name_the_known_ones_when_nothing_is_close():
    (path, message), = check_params("ps3_eval", {"zzz": 1})
    assert path == ("zzz",) and message == "unknown param (known: batches, batchSize, pictures)"


def test_validate_checks_params_without_importing_torch():
    code = ("import sys; from ps3_platform.cli import main; "
            f"assert main(['validate', {str(ROOT / 'jobs' / 'vila_hd_quickstart.yaml')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'validate imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
