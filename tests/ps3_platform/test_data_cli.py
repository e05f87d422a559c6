"""`platformctl data index|check` on generator output, and on a missing source."""

from __future__ import annotations

import json

from ps3.data import generate
from ps3_platform.cli import main


def test_index_and_check_commands(tmp_path, capsys):
    sources = generate(f"file://{tmp_path}/synth", samples=3, seed=0, kinds=("scene",))
    uri = sources["scene"]
    assert main(["data", "index", uri, "-o", "json"]) == 0
    index = json.loads(capsys.readouterr().out)
    assert index["samples"] == 3
    assert main(["data", "check", uri]) == 0
    out = capsys.readouterr().out
    assert "shard-000000.tar" in out and "samples 3" in out


def test_missing_source_is_one_line_error(tmp_path, capsys):
    assert main(["data", "check", f"file://{tmp_path}/nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: file://{tmp_path}/nope: no such source directory"]
