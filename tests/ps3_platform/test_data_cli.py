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


def test_import_llava_command_writes_shards_and_counts_bad_items(tmp_path, capsys):
    import io

    from PIL import Image

    from ps3.data.index import read_index

    (tmp_path / "img").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(buf, "JPEG")
    (tmp_path / "img" / "a.jpg").write_bytes(buf.getvalue())
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    items = [{"id": "a", "image": "a.jpg", "conversations": turns},
             {"id": "gone", "image": "missing.jpg", "conversations": turns}]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    out = f"file://{tmp_path}/shards"
    args = ["data", "import-llava", str(tmp_path / "llava.json"), str(tmp_path / "img"), out]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"wrote 1 conversations to {out} (with index.json); skipped: missing_image=1")
    assert read_index(out)["samples"] == 1
    assert main([*args, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"written": 1, "skipped": {"missing_image": 1}}


def test_import_llava_command_bad_json_is_one_line_error(tmp_path, capsys):
    (tmp_path / "llava.json").write_text(json.dumps({"not": "a list"}))
    assert main(["data", "import-llava", str(tmp_path / "llava.json"), str(tmp_path), f"file://{tmp_path}/o"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a LLaVA list" in err[0]
