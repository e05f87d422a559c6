"""Fast decoding against the plain method (full decode, full resize), with stated tolerance.

Tolerance, in 8-bit levels of the normalised views (1 level = 1/127.5): mean absolute
difference <= 1.5 levels and 99th percentile <= 8 levels for the low-res view and every
scale's selected patches; the selection view (box-reduced with a rounded-up factor, see
decode.SELECTION_GAP) may reach 32 levels at the 99th percentile on text. The selected
cells (hr_index) and the ground-truth maps must be identical.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ps3.data.decode as decode_module
from ps3.data.decode import Decoded, decode, plain_decode, region_decoding, window_source, window_view
from ps3.data.records import BadSample
from ps3.data.synth import SynthConfig, sample
from ps3.data.views import FastPixels, PlainPixels, ViewConfig, normalize_pixels, sample_tensors

if region_decoding():
    from ps3.data._jpegregion import decode_region

LEVEL = 1 / 127.5
#: A 4K preset shrunk 2.7x (scales 378..3780 -> 140..1400) so 1.4-2K images exercise
#: the same code paths (DCT scale choice, box reduce, windows) in a fraction of the time.
SMALL_4K = ViewConfig((140, 280, 560, 1400), 14, (20, 80, 500), 560, 8, highres="patches")


def within_tolerance(fast: torch.Tensor, plain: torch.Tensor, p99_levels: float = 8) -> bool:
    d = (normalize_pixels(fast) - normalize_pixels(plain)).abs().flatten()  # uint8 in, so no wrap-around
    return d.mean() <= 1.5 * LEVEL and d.quantile(0.99) <= p99_levels * LEVEL


@pytest.mark.parametrize("kind,i", [("scene", 0), ("scene", 1), ("document", 0)])
def test_fast_views_match_plain_method(kind, i):
    data, _, rec = sample(kind, 0, i, SynthConfig(scene_size=(1400, 2000), doc_long_side=(1400, 2000)))
    for box in (rec.boxes[0], None):
        fast = sample_tensors(FastPixels(decode(data, rec.key, SMALL_4K.decode_size), data, rec.key), rec.width, rec.height,
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
    pixels = FastPixels(decode(data, rec.key, SMALL_4K.decode_size), data, rec.key)
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


# ---- region decoding (ps3/data/_jpegregion.c) -----------------------------------------
needs_region = pytest.mark.skipif(not region_decoding(), reason="ps3.data._jpegregion not built (no libjpeg headers)")


def test_region_decoder_is_built_where_required():
    """CI installs libjpeg's headers, so there the native module must exist (else: fallback)."""
    if os.environ.get("PS3_REQUIRE_NATIVE") == "1":
        assert region_decoding(), "ps3.data._jpegregion was not built; install libjpeg62-turbo-dev and reinstall"


@needs_region
@pytest.mark.parametrize("where", ["centre", "top_left", "bottom_right"])
def test_windows_from_region_decode_equal_windows_from_whole_decode(where):
    """Equal up to float rounding (1 level, < 1% of pixels): Pillow's kernel positions move
    with the region's offset. The margin keeps libjpeg's crop-edge columns out of the kernel."""
    data, _, rec = sample("scene", 0, 1, SynthConfig(scene_size=(1400, 2000)))
    whole = decode(data, rec.key)  # full size: what the windows at 1400 need
    coarse = decode(data, rec.key, need=300)
    corner = {"centre": (500, 420), "top_left": (0, 0), "bottom_right": (1400 - 196, 1400 - 168)}[where]
    wanted = [(1400, (corner[0], corner[1], corner[0] + 196, corner[1] + 168)),
              (560, (corner[0] * 2 // 5 // 14 * 14, corner[1] * 2 // 5 // 14 * 14,
                     corner[0] * 2 // 5 // 14 * 14 + 84, corner[1] * 2 // 5 // 14 * 14 + 70))]
    region = window_source(data, rec.key, coarse, wanted)
    assert region.image.width * region.image.height < rec.width * rec.height / 4  # really a region
    for size, box in wanted:
        diff = np.abs(window_view(region, size, box).astype(int) - window_view(whole, size, box))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (size, box, diff.max(), (diff > 0).mean())


@needs_region
def test_region_decode_at_reduced_dct_scale_matches_pillow_draft():
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(1600, 1700)))
    rgb, w, h, left, top = decode_region(data, 100, 60, 180, 140, 2)
    assert left <= 100 and top == 60 and left + w >= 180 and h == 80
    half = decode(data, rec.key, need=rec.width // 2 - 10).image  # Pillow draft at 1/2
    expect = np.asarray(half)[top:top + h, left + 1:left + w - 1]  # edge columns: chroma upsampled alone
    assert np.array_equal(np.frombuffer(rgb, np.uint8).reshape(h, w, 3)[:, 1:-1], expect)


@needs_region
def test_region_decode_reads_only_the_rows_it_needs():
    """Damage below the window is not seen by the region decode (the whole decode sees it)."""
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(1600, 1700)))
    cut = data[: len(data) * 3 // 4]
    rgb, w, h, _, _ = decode_region(cut, 0, 0, 200, 100)
    assert h == 100 and len(rgb) == w * h * 3
    with pytest.raises(ValueError, match="JPEG decode failed"):
        decode_region(cut, 0, rec.height - 100, 200, rec.height)
    dec = Decoded(Image.new("RGB", (10, 10)), rec.width, rec.height, scaled_size=(rec.width // 8, rec.height // 8))
    with pytest.raises(BadSample) as info:
        window_source(cut, rec.key, dec, [(rec.width, (0, rec.height - 56, 56, rec.height))])
    assert info.value.reason == "bad_image"


@needs_region
def test_region_decode_rejects_bad_arguments_and_falls_back_for_cmyk():
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(300, 320)))
    with pytest.raises(ValueError, match="scale_denom"):
        decode_region(data, 0, 0, 10, 10, 3)
    with pytest.raises(ValueError, match="outside the image"):
        decode_region(data, 5000, 0, 5010, 10)
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 255, 0, 0)).save(buf, "JPEG")
    with pytest.raises(NotImplementedError):
        decode_region(buf.getvalue(), 0, 0, 8, 8)
    small = Decoded(Image.new("RGB", (8, 6)), 64, 48)
    src = window_source(buf.getvalue(), "cmyk", small, [(64, (0, 0, 8, 8))])  # whole decode by Pillow
    assert src.image.size == (64, 48) and src.image.mode == "RGB"


def test_without_region_decoding_windows_come_from_the_whole_decode(monkeypatch):
    """The fallback (module not built): one decode at the windows' resolution, same tensors."""
    data, _, rec = sample("scene", 0, 0, SynthConfig(scene_size=(1400, 2000)))
    monkeypatch.setattr(decode_module, "_decode_region", None)
    assert SMALL_4K.decode_size == 1400
    fast = sample_tensors(FastPixels(decode(data, rec.key, SMALL_4K.decode_size), data, rec.key), rec.width,
                          rec.height, rec.boxes[0], SMALL_4K)
    plain = sample_tensors(PlainPixels(plain_decode(data)), rec.width, rec.height, rec.boxes[0], SMALL_4K)
    for a, b in zip(fast["hr_patches"], plain["hr_patches"]):
        assert within_tolerance(a, b)
