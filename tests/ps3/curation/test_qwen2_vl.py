"""Qwen2-VL captioner on a tiny random checkpoint written here: batching, two images per local request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ps3.curation.models import Captioner, WeightsError
from ps3.curation.models.qwen2_vl import Qwen2VLCaptioner, build_tiny_qwen2_vl
from ps3.curation.types import CaptionError, CaptionRequest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl") / "tiny")


@pytest.fixture(scope="module")
def captioner(model_dir) -> Qwen2VLCaptioner:
    return Qwen2VLCaptioner(str(model_dir), max_new_tokens=6, device="cpu")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((420, 560, 3)) * 255).astype(np.uint8))


def _image_tokens(captioner: Qwen2VLCaptioner, batch) -> list[int]:
    return (batch["input_ids"] == captioner.model.config.image_token_id).sum(dim=1).tolist()


def test_mixed_batch_gives_one_caption_per_request(captioner, image):
    assert isinstance(captioner, Captioner)
    requests = [CaptionRequest(image, (10.5, 20, 200, 180)), CaptionRequest(image),
                CaptionRequest(image, (300, 200, 560, 420)), CaptionRequest(image)]
    captions = captioner.caption(requests)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert captioner.caption([]) == []
    assert captioner.caption(requests) == captions  # greedy


def test_local_requests_show_the_whole_image_then_the_crop(captioner, image):
    local, whole = CaptionRequest(image, (0, 0, 140, 140)), CaptionRequest(image)
    batch = captioner.inputs([local, whole])
    grids = batch["image_grid_thw"]  # one row per image, in request order: [whole, crop], [whole]
    assert grids.shape[0] == 3 and torch.equal(grids[0], grids[2])
    per_image = (grids.prod(dim=1) // 4).tolist()  # merged tokens: 2x2 patches each
    assert _image_tokens(captioner, batch) == [per_image[0] + per_image[1], per_image[2]]
    assert batch["pixel_values"].shape[0] == grids.prod(dim=1).sum()
    assert batch["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last position


def test_max_pixels_bounds_each_image(model_dir, image):
    small = Qwen2VLCaptioner(str(model_dir), max_pixels=64 * 28 * 28, device="cpu")
    grids = small.inputs([CaptionRequest(image)])["image_grid_thw"]
    assert grids.prod() * 14 * 14 <= 64 * 28 * 28
    assert small.provenance["prompts"] == Qwen2VLCaptioner(str(model_dir), device="cpu").provenance["prompts"]


def test_provenance_names_model_weights_and_prompts(captioner, model_dir):
    provenance = captioner.provenance
    assert provenance["name"] == "qwen2-vl" and provenance["weights"].startswith("sha256:")
    assert provenance["max_pixels"] == 256 * 28 * 28
    other = Qwen2VLCaptioner(str(model_dir), global_prompt="Say what you see.", device="cpu")
    assert other.provenance["prompts"] != provenance["prompts"]


def test_empty_box_is_a_caption_error(captioner, image):
    with pytest.raises(CaptionError, match="empty"):
        captioner.caption([CaptionRequest(image, (600, 10, 700, 50))])


def test_missing_model_raises_one_line(tmp_path):
    with pytest.raises(WeightsError, match="not found: /no/such/qwen2-vl$"):
        Qwen2VLCaptioner("/no/such/qwen2-vl")
    with pytest.raises(WeightsError, match="no config.json"):
        Qwen2VLCaptioner(str(tmp_path))
