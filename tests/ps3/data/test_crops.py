"""Low-res contrastive batches (`ViewConfig.local_crop`): whole images for global pairs,
crops around the caption's box for local ones, reproducible and resumable like any batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ps3.data.views import PlainPixels, ViewConfig, crop_window, lowres_tensors

from .test_loader import TINY, make

CROPS = dataclasses.replace(TINY, local_crop=(1.5, 4.0))


def test_crop_window_is_centred_on_the_box_and_factor_sides_wide():
    view, (x0, y0, x1, y1) = crop_window(1000, 500, (450, 200, 550, 250), size=32, factor=2.0)
    # the box is 0.1 of the view's width (0.1 of its height): 2 box sides = 32 px in a 160 px view
    assert view == 160 and (x1 - x0, y1 - y0) == (32, 32)
    assert (x0 + x1) / 2 == pytest.approx(80, abs=1) and (y0 + y1) / 2 == pytest.approx(72, abs=1)


def test_crop_window_stays_inside_the_view_and_never_zooms_out_past_it():
    view, (x0, y0, x1, y1) = crop_window(1000, 1000, (0, 0, 100, 100), size=32, factor=2.0)
    assert (x0, y0) == (0, 0) and x1 <= view and y1 <= view  # a corner box: the window shifts in
    assert crop_window(1000, 1000, (0, 0, 900, 900), size=32, factor=4.0) == (32, (0, 0, 32, 32))  # whole view


def test_a_crop_shows_the_box_large_where_the_whole_view_shows_it_small():
    image = np.full((400, 400, 3), 255, np.uint8)
    image[180:220, 180:220] = (255, 0, 0)  # a red square of a tenth of the side
    from PIL import Image

    pixels, box = PlainPixels(Image.fromarray(image)), (180.0, 180.0, 220.0, 220.0)
    whole = lowres_tensors(pixels, 400, 400, None, CROPS)["lowres"]
    crop = lowres_tensors(pixels, 400, 400, box, CROPS, factor=2.0)["lowres"]
    red = lambda t: float(((t[0] > 200) & (t[1] < 60)).float().mean())
    assert whole.shape == crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    assert red(whole) == pytest.approx(0.01, abs=0.01) and red(crop) == pytest.approx(0.25, abs=0.06)


def test_loader_gives_low_res_pairs_only_and_resumes_exactly(synth_sources):
    loader = make(synth_sources, views=CROPS, frac=0.5)
    first = next(loader)
    assert set(first) == {"lowres", "is_global", "sample_id", "source", "tokens", "rank_sizes"}
    assert first["lowres"].shape == (4, 3, 32, 32) and first["lowres"].dtype == torch.uint8
    state = loader.state_dict()
    following = [next(loader)["lowres"] for _ in range(3)]
    again = make(synth_sources, views=CROPS, frac=0.5)
    again.load_state_dict(state)
    assert all(torch.equal(a, next(again)["lowres"]) for a in following)  # crops are a function of the position


def test_crop_range_is_checked():
    with pytest.raises(ValueError, match="local_crop"):
        dataclasses.replace(TINY, local_crop=(0.5, 2.0))
