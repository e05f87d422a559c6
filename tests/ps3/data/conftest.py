"""Small hand-made shards for the data tests (tiny images, so everything runs in seconds)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ps3.data.records import Record
from ps3.data.writer import ShardWriter


def jpeg_bytes(width: int, height: int, colour=(200, 30, 30), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_source(uri: str, n: int, *, source: str = "toy", per_shard: int = 4, global_caption: bool = True,
                 size: tuple[int, int] = (64, 48)) -> dict:
    """A source of `n` tiny JPEG samples with two boxes each; returns its index."""
    w, h = size
    with ShardWriter(uri, source, samples_per_shard=per_shard) as writer:
        for i in range(n):
            rec = Record(f"s{i:05d}", w, h, [(1, 1, 20, 20), (10, 5, w - 1, h - 1)], [f"box a {i}", f"box b {i}"],
                         f"global {i}" if global_caption else None, source)
            writer.write(rec.key, jpeg_bytes(w, h, (i * 7 % 255, 40, 90)), "jpg", rec)
    from ps3.data.index import read_index

    return read_index(uri)


def corrupt_header(fs, shard_path: str, member: bytes) -> None:
    """Break the tar header checksum of the member named `member`."""
    data = bytearray(fs.cat_file(shard_path))
    header = data.find(member)
    data[header + 148: header + 156] = b"garbage!"
    fs.pipe_file(shard_path, bytes(data))


@pytest.fixture
def toy_source(tmp_path):
    uri = f"file://{tmp_path}/toy"
    write_source(uri, 10)
    return uri


#: One damaged sample per bad-input case, with the reason the loader must count for it.
BAD_CASES = {
    "b_nojson": "missing_json",
    "b_badjson": "bad_json",
    "b_noimage": "missing_image",
    "b_truncimg": "bad_image",
    "b_garbage": "bad_image",
    "b_sizes": "size_mismatch",
    "b_box": "bad_box",
    "b_empty": "empty_caption",
}


def write_bad_source(uri: str, good: int = 6, size=(64, 48)) -> dict:
    """A source whose first shard holds one sample of each BAD_CASES kind among good ones."""
    w, h = size
    img = jpeg_bytes(w, h)

    def rec(key, **kw):
        base = {"key": key, "width": w, "height": h, "boxes": [(1, 1, 20, 20)], "captions": ["a sign"],
                "global_caption": "a scene", "source": "bad"}
        return Record(**(base | kw)).to_json()

    bad_members = {
        "b_nojson": {"jpg": img},
        "b_badjson": {"jpg": img, "json": b"{not json"},
        "b_noimage": {"json": rec("b_noimage")},
        "b_truncimg": {"jpg": img[: len(img) // 2], "json": rec("b_truncimg")},
        "b_garbage": {"jpg": b"\xff\xd8\xff" + b"\x00garbage" * 50, "json": rec("b_garbage")},
        "b_sizes": {"jpg": img, "json": rec("b_sizes", width=w * 2)},
        "b_box": {"jpg": img, "json": rec("b_box", boxes=[(10, 10, w + 50, 20)])},
        "b_empty": {"jpg": img, "json": rec("b_empty", captions=["  "])},
    }
    with ShardWriter(uri, "bad", samples_per_shard=100) as writer:
        for key, members in bad_members.items():
            writer.write_members(key, members)
        for i in range(good):
            writer.write_members(f"g{i:03d}", {"jpg": img, "json": rec(f"g{i:03d}")})
    from ps3.data.index import read_index

    return read_index(uri)


@pytest.fixture(scope="session")
def synth_sources(tmp_path_factory):
    """Small synthetic document + scene sources shared by the loader tests."""
    from ps3.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(scene_size=(200, 320), doc_long_side=(200, 320), texture=False)
    return generate(f"file://{root}", 24, seed=0, samples_per_shard=7, config=cfg)
