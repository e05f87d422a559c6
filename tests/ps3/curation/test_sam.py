"""SAM wrapper on a tiny random SAM: the Masks contract, point batching, table-10 defaults, weights."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import segment_anything
import torch

from ps3.curation.models import MaskGenerator, WeightsError
from ps3.curation.models.sam import TABLE_10, SamMaskGenerator, _tiny_sam, shrink_mask, working_size
from ps3.curation.types import mask_bounds

#: Thresholds a random model can pass; it predicts noise with low confidence.
LOOSE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((96, 160, 3)) * 255).astype(np.uint8)


def test_table_10_settings_are_the_constructor_defaults():
    params = inspect.signature(SamMaskGenerator.__init__).parameters
    assert {name: params[name].default for name in TABLE_10} == TABLE_10
    assert TABLE_10 == {"points_per_side": 24, "points_per_batch": 128, "crop_n_layers": 1,
                        "crop_n_points_downscale_factor": 1, "pred_iou_thresh": 0.6,
                        "stability_score_thresh": 0.85, "min_mask_region_area": 0}
    assert SamMaskGenerator.tiny_random(0).provenance | TABLE_10 == SamMaskGenerator.tiny_random(0).provenance


def test_generate_returns_masks_at_the_working_size_in_point_batches(image):
    generator = SamMaskGenerator.tiny_random(0, points_per_side=4, points_per_batch=6, crop_n_layers=0,
                                             work_side=80, **LOOSE)
    assert isinstance(generator, MaskGenerator)
    batches = []
    predict = generator._generator.predictor.predict_torch

    def spy(point_coords, *args, **kwargs):
        batches.append(point_coords.shape[0])
        return predict(point_coords, *args, **kwargs)

    generator._generator.predictor.predict_torch = spy
    masks = generator.generate(image)
    assert batches == [6, 6, 4]  # 16 grid points, at most points_per_batch at a time
    assert masks.image_size == (160, 96)
    assert masks.masks.dtype == np.bool_ and masks.masks.shape[1:] == (48, 80)
    assert masks.count >= 1 and masks.masks.reshape(masks.count, -1).any(axis=1).all()
    np.testing.assert_array_equal(masks.bounds, mask_bounds(masks.masks))
    assert generator.provenance["weights"] == "random:seed=0" and generator.provenance["points_per_batch"] == 6


def test_no_masks_with_crop_layers_is_an_answer(image):
    # Nothing passes these thresholds; upstream SAM raises in its cross-crop NMS then (issue #614).
    none = SamMaskGenerator.tiny_random(0, points_per_side=2, crop_n_layers=1, pred_iou_thresh=1.0).generate(image)
    assert none.count == 0 and none.masks.shape == (0, 96, 160) and none.masks.dtype == np.bool_


def test_sam_sees_at_most_its_input_side_per_crop_layer():
    generator = SamMaskGenerator.tiny_random(0, points_per_side=2, crop_n_layers=0, work_side=100, **LOOSE)
    seen = []
    generate = generator._generator.generate
    generator._generator.generate = lambda image: seen.append(image.shape) or generate(image)
    masks = generator.generate(np.zeros((400, 600, 3), dtype=np.uint8))
    assert seen == [(171, 256, 3)]  # the tiny SAM's encoder takes 256 pixels
    assert masks.image_size == (600, 400) and masks.masks.shape[1:] == (67, 100)


def test_shrink_keeps_area_and_small_masks():
    mask = np.zeros((100, 200), dtype=bool)
    mask[8:48, 20:120] = True
    shrunk = shrink_mask(mask, working_size(200, 100, 50))
    assert shrunk.shape == (25, 50) and shrunk.sum() * 16 == mask.sum()
    disc = np.hypot(*np.mgrid[-50:50, -100:100]) < 37
    assert abs(shrink_mask(disc, (57, 29)).sum() * (200 / 57) * (100 / 29) / disc.sum() - 1) < 0.05
    speck = np.zeros((100, 200), dtype=bool)
    speck[3, 7] = True
    assert shrink_mask(speck, (50, 25)).sum() == 1  # a mask SAM found never vanishes


def test_checkpoint_loads_through_the_constructor(tmp_path, monkeypatch, image):
    torch.manual_seed(1)
    torch.save(_tiny_sam().state_dict(), tmp_path / "tiny.pth")
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: _tiny_sam())
    generator = SamMaskGenerator(str(tmp_path / "tiny.pth"), "vit_b", points_per_side=2, crop_n_layers=0,
                                 device="cpu", **LOOSE)
    assert generator.provenance["weights"].startswith("sha256:") and generator.provenance["model_type"] == "vit_b"
    assert generator.generate(image).image_size == (160, 96)


def test_missing_or_bad_weights_raise_one_line(tmp_path):
    with pytest.raises(WeightsError, match="not found: /no/such/sam.pth$"):
        SamMaskGenerator("/no/such/sam.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as info:
        SamMaskGenerator(str(tmp_path / "bad.pth"))
    assert "bad.pth" in str(info.value) and "\n" not in str(info.value)
