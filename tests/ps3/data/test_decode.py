"""Fast decoding against the plain method (full decode, full resize), with stated tolerance.

Tolerance, in 8-bit levels of the normalised views (1 level = 1/127.5): mean absolute
difference <= 1.5 levels and 99th percentile <= 8 levels for the low-res view and every
scale's selected patches; the selection view (box-reduced with a rounded-up factor, see
decode.SELECTION_GAP) may reach 32 levels at the 99th percentile on text. The selected
cells (hr_index) and the ground-truth maps must be identical.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from ps3.data.decode import decode, plain_decode
from ps3.data.records import BadSample
from ps3.data.synth import SynthConfig, sample
from ps3.data.views import FastPixels, PlainPixels, ViewConfig, sample_tensors

LEVEL = 1 / 127.5
#: A 4K preset shrunk 2.7x (scales 378..3780 -> 140..1400) so 1.4-2K images exercise
#: the same code paths (DCT scale choice, box reduce, windows) in a fraction of the time.
SMALL_4K = ViewConfig((140, 280, 560, 1400), 14, (20, 80, 500), 560, 8, highres="patches")


def within_tolerance(fast: torch.Tensor, plain: torch.Tensor, p99_levels: float = 8) -> bool:
    d = (fast - plain).abs().flatten()
    return d.mean() <= 1.5 * LEVEL and d.quantile(0.99) <= p99_levels * LEVEL


@pytest.mark.parametrize("kind,i", [("scene", 0), ("scene", 1), ("document", 0)])
def test_fast_views_match_plain_method(kind, i):
    data, _, rec = sample(kind, 0, i, SynthConfig(scene_size=(1400, 2000), doc_long_side=(1400, 2000)))
    for box in (rec.boxes[0], None):
        fast = sample_tensors(FastPixels(decode(data, rec.key, SMALL_4K.decode_size)), rec.width, rec.height,
                              box, SMALL_4K)
        plain = sample_tensors(PlainPixels(plain_decode(data)), rec.width, rec.height, box, SMALL_4K)
        assert within_tolerance(fast["lowres"], plain["lowres"])
        assert within_tolerance(fast["selection_view"], plain["selection_view"], p99_levels=32)
        for a, b in zip(fast["hr_patches"], plain["hr_patches"]):
            assert within_tolerance(a, b)
        assert all(torch.equal(a, b) for a, b in zip(fast["hr_index"], plain["hr_index"]))
        assert all(torch.equal(a, b) for a, b in zip(fast["gt_maps"], plain["gt_maps"]))


def test_saliency_maps_cover_every_box_and_gt_maps_only_the_captioned_one():
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(1400, 2000)))
    assert len(rec.boxes) >= 3
    pixels = FastPixels(decode(data, rec.key, SMALL_4K.decode_size))
    local = sample_tensors(pixels, rec.width, rec.height, rec.boxes[0], SMALL_4K, rec.boxes)
    alone = [sample_tensors(pixels, rec.width, rec.height, b, SMALL_4K)["gt_maps"] for b in rec.boxes]
    for s, (gt, salient) in enumerate(zip(local["gt_maps"], local["saliency_maps"])):
        assert torch.equal(gt, alone[0][s])
        assert torch.equal(salient, torch.stack([maps[s] for maps in alone]).amax(0))
        assert salient.sum() > gt.sum()
    whole = sample_tensors(pixels, rec.width, rec.height, None, SMALL_4K, rec.boxes)  # a global pair
    assert all(torch.equal(a, b) for a, b in zip(whole["gt_maps"], whole["saliency_maps"]))


def test_jpeg_is_decoded_at_reduced_dct_scale():
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(1600, 1700)))
    small = decode(data, rec.key, need=150)  # 1/8 keeps >= 150 px on both sides
    assert small.image.width <= rec.width / 8 + 1 and min(small.image.size) >= 150
    quarter = decode(data, rec.key, need=rec.width // 8 + 10)  # 1/8 would be too small: 1/4
    assert quarter.image.width <= rec.width / 4 + 1
    assert (small.width, small.height) == (rec.width, rec.height)
    assert decode(data, rec.key).image.size == (rec.width, rec.height)


def test_png_decodes_fully():
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (1, 2, 3)).save(buf, "PNG")
    dec = decode(buf.getvalue(), "k", need=10)
    assert dec.image.size == (50, 40) and dec.image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_images_are_bad_samples(damage):
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(300, 320)))
    data = data[: len(data) // 2] if damage == "truncate" else data[:20] + b"\x00" * 200
    with pytest.raises(BadSample) as info:
        decode(data, rec.key, need=64)
    assert info.value.reason == "bad_image" and rec.key in str(info.value)
