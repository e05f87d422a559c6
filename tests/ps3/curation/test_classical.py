"""The weight-free segmenter: contract, noise handling, and boxes that find synthetic signs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage
from PIL import Image

from ps3.curation.boxes import centres_inside, salient_boxes
from ps3.curation.models import MaskGenerator
from ps3.curation.models.classical import ClassicalSegmenter
from ps3.curation.types import mask_bounds
from ps3.data.synth import SynthConfig, sample


def test_is_a_mask_generator_with_provenance():
    segmenter = ClassicalSegmenter(work_side=512)
    assert isinstance(segmenter, MaskGenerator)
    assert segmenter.provenance["name"] == "classical"
    assert segmenter.provenance["version"] == skimage.__version__
    assert segmenter.provenance["work_side"] == 512 and segmenter.provenance["method"]


def test_masks_come_at_the_working_resolution_with_the_original_size():
    image = np.full((600, 900, 3), 200, dtype=np.uint8)
    image[100:160, 300:380] = (200, 30, 30)  # one red patch
    masks = ClassicalSegmenter(work_side=300).generate(image)
    assert masks.image_size == (900, 600)
    assert masks.masks.shape[1:] == (200, 300) and masks.masks.dtype == bool
    assert masks.count == 1  # the patch; the background is dropped as too large
    ys, xs = np.nonzero(masks.masks[0])
    assert 33 <= ys.min() and ys.max() <= 54 and 100 <= xs.min() and xs.max() <= 127  # inside the patch / 3
    np.testing.assert_array_equal(masks.bounds, mask_bounds(masks.masks))  # where each mask lies
    small = ClassicalSegmenter(work_side=1024).generate(image)  # never upscaled
    assert small.masks.shape[1:] == (600, 900)


def test_flat_and_noisy_backgrounds_give_no_masks():
    rng = np.random.default_rng(0)
    noisy = np.clip(150 + rng.normal(0, 4, (480, 640, 3)), 0, 255).astype(np.uint8)
    for image in (np.zeros((480, 640, 3), dtype=np.uint8), noisy):
        masks = ClassicalSegmenter().generate(image)
        assert masks.count == 0 and masks.masks.shape == (0, 480, 640)
        assert len(salient_boxes(masks)[0]) == 0


def test_grey_images_are_accepted():
    image = np.full((200, 300), 40, dtype=np.uint8)
    image[50:90, 100:150] = 220
    assert ClassicalSegmenter().generate(image).count == 1


@pytest.mark.timeout(60)
def test_curated_boxes_find_most_synthetic_signs():
    """Measured 0.90 on these 8 scenes (0.93 / 0.91 on 60 scenes of seeds 0 / 1)."""
    segmenter, cfg = ClassicalSegmenter(), SynthConfig(scene_size=(1024, 1280))
    found = []
    for i in range(8):
        data, _, record = sample("scene", 7, i, cfg)
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        boxes, _ = salient_boxes(segmenter.generate(image))
        assert len(boxes) == 4
        found.extend(centres_inside(boxes, np.asarray(record.boxes)))
    assert len(found) >= 24 and np.mean(found) >= 0.7
