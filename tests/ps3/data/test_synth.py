"""Synthetic data: deterministic, well-formed, and sized so high resolution matters."""

from __future__ import annotations

import io
import json

from PIL import Image

from ps3.data.check import check_source
from ps3.data.index import read_index
from ps3.data.synth import (
    SIGN_COLOURS,
    SIGN_SHAPES,
    SIGN_WORDS,
    SynthConfig,
    generate,
    main,
    sample,
)

SMALL = SynthConfig(scene_size=(320, 480), doc_long_side=(300, 500))


def test_same_seed_same_bytes_other_seed_differs():
    a, _, ra = sample("scene", 7, 3, SMALL)
    b, _, rb = sample("scene", 7, 3, SMALL)
    c, _, _ = sample("scene", 8, 3, SMALL)
    assert a == b and ra == rb and a != c


def test_generate_writes_one_checked_source_per_kind(tmp_path):
    sources = generate(f"file://{tmp_path}/syn", 6, seed=1, samples_per_shard=4, config=SMALL)
    assert set(sources) == {"document", "scene"}
    scene, doc = check_source(sources["scene"]), check_source(sources["document"])
    assert scene["ok"] == 6 and scene["bad"] == {} and scene["global_captions"] == 6
    assert doc["ok"] == 6 and doc["bad"] == {} and doc["global_captions"] == 0 and doc["boxes"] > 0
    assert read_index(sources["scene"])["source"] == "scene"


def test_scene_captions_use_closed_vocabulary_and_boxes_fit():
    for i in range(5):
        data, ext, rec = sample("scene", 0, i, SMALL)
        assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (rec.width, rec.height)
        assert 2048 > max(rec.width, rec.height) >= 320 and rec.global_caption.startswith("a ")
        for (x0, y0, x1, y1), cap in zip(rec.boxes, rec.captions):
            colour, shape, _, _, word = cap.split()
            assert colour in SIGN_COLOURS and shape in SIGN_SHAPES and word in SIGN_WORDS
            assert 0 <= x0 < x1 <= rec.width and 0 <= y0 < y1 <= rec.height


def test_signs_are_small_blobs_at_64px_and_visible_at_256px():
    """A sign must be under 4.5 px across in a 64 px view but over 10 px at 256 px."""
    for i in range(20):
        _, _, rec = sample("scene", 0, i, SynthConfig())
        for x0, _, x1, _ in rec.boxes:
            side = x1 - x0
            assert side * 64 / min(rec.width, rec.height) < 4.5 and side * 256 / max(rec.width, rec.height) > 10


def test_documents_label_text_lines_without_global_caption():
    _, ext, rec = sample("document", 0, 1, SMALL)
    assert ext == "jpg" and rec.global_caption is None and 1 <= len(rec.boxes) <= SMALL.doc_boxes
    assert all(c.split() for c in rec.captions)


def test_cli_writes_sources(tmp_path, capsys):
    assert main(["--out", f"file://{tmp_path}/cli", "--samples", "2", "--kinds", "scene", "--max-side", "400"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["sources"]) == ["scene"] and read_index(out["sources"]["scene"])["samples"] == 2


def test_sign_shapes_have_equal_area_and_centred_mass():
    """At low resolution a sign is a blob; equal mass in the same place hides its shape."""
    import numpy as np
    from PIL import ImageDraw

    from ps3.data.synth import _equal_area, draw_shape

    areas, centres = [], []
    for shape in SIGN_SHAPES:
        mask = Image.new("L", (400, 400))
        draw_shape(ImageDraw.Draw(mask), shape, _equal_area((0, 0, 400, 400), shape), 255)
        ys, xs = np.nonzero(np.asarray(mask))
        areas.append(len(xs))
        centres.append((xs.mean(), ys.mean()))
    assert max(areas) / min(areas) < 1.05
    assert all(abs(cx - 200) < 8 and abs(cy - 200) < 8 for cx, cy in centres)
