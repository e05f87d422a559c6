"""Row helpers of the curation stages: masks cross Ray Data blocks packed, bounds included."""

from __future__ import annotations

import numpy as np

from ps3.curation.stages import pack_masks, unpack_masks
from ps3.curation.types import Masks, mask_bounds


def _masks(bounds: bool) -> Masks:
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 29)) < 0.1
    masks[1] = False
    return Masks(masks, (290, 170), mask_bounds(masks) if bounds else None)


def test_masks_and_their_bounds_survive_packing():
    for with_bounds in (True, False):
        masks = _masks(with_bounds)
        data, meta = pack_masks(masks)
        back = unpack_masks(data, meta)
        np.testing.assert_array_equal(back.masks, masks.masks)
        assert back.image_size == masks.image_size
        if with_bounds:
            np.testing.assert_array_equal(back.bounds, masks.bounds)
        else:
            assert back.bounds is None and "mask_bounds" not in meta
