"""Every malformed spec in the corpus: exit 2, one `FILE:LINE:COL: path: message` line, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ps3_platform.cli import main

CORPUS = sorted((Path(__file__).parent / "malformed").glob("*.yaml"))


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} needs an '# expect:' header"
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_malformed_spec_gives_one_positioned_line(path, capsys):
    code = main(["validate", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: ", err[0]), err[0]
    assert f"{path}:{_expected(path)}" in err[0]


def test_cli_process_prints_no_traceback():
    path = CORPUS[0]
    proc = subprocess.run([sys.executable, "-m", "ps3_platform.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
