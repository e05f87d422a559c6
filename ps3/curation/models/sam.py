"""SAM in "segment everything" mode, with the settings of the PS3 paper (appendix A, table 10).

The paper ran EfficientViT-SAM XL1; this wrapper runs the original segment-anything models
(ViT-H/L/B) through the same automatic mask generator and the same arguments. Masks leave
at a working resolution (long side <= `work_side`): the box stage needs mask areas and
positions, not SAM's full-resolution edges, and a few hundred 4K masks would not fit in a
Ray Data block.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ps3.curation.models import WeightsError
from ps3.curation.models.weights import file_digest, local_weights
from ps3.curation.types import Masks, mask_bounds

#: Appendix A, table 10 (the paper's arguments for mask generation).
TABLE_10: dict[str, Any] = {
    "points_per_side": 24,
    "points_per_batch": 128,
    "crop_n_layers": 1,
    "crop_n_points_downscale_factor": 1,
    "pred_iou_thresh": 0.6,
    "stability_score_thresh": 0.85,
    "min_mask_region_area": 0,
}


def _sam_version() -> str:
    try:
        return importlib.metadata.version("segment-anything")
    except importlib.metadata.PackageNotFoundError:
        return "1.0"


def _resolve_device(device: str) -> str:
    """"auto" is resolved here, on the actor that owns the model, never on the driver."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class SamMaskGenerator:
    """All masks of an image from a point grid, filtered and de-duplicated by SAM's own rules.

    `min_mask_region_area > 0` makes segment-anything clean up small regions with OpenCV,
    which is then needed too; the paper's value, 0, does not.
    """

    def __init__(self, checkpoint_uri: str, model_type: str = "vit_h", *,
                 points_per_side: int = 24, points_per_batch: int = 128, crop_n_layers: int = 1,
                 crop_n_points_downscale_factor: int = 1, pred_iou_thresh: float = 0.6,
                 stability_score_thresh: float = 0.85, min_mask_region_area: int = 0,
                 work_side: int = 1024, device: str = "auto"):
        model, path = _load_sam(checkpoint_uri, model_type)
        settings = dict(points_per_side=points_per_side, points_per_batch=points_per_batch,
                        crop_n_layers=crop_n_layers, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
                        pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                        min_mask_region_area=min_mask_region_area)
        provenance = {"name": "sam", "model_type": model_type, "weights": file_digest(path)}
        self._setup(model, settings, work_side, device, provenance)

    @classmethod
    def tiny_random(cls, seed: int = 0, *, work_side: int = 1024, device: str = "cpu",
                    **settings: Any) -> SamMaskGenerator:
        """A randomly initialised, scaled-down SAM for tests: a 2-block, 64-wide encoder on
        256-pixel inputs and a 32-wide mask decoder.

        Its masks are noise, and at table 10's thresholds it may find none; tests lower the
        thresholds. It is built from segment-anything's own modules, so everything around
        them (point grid, batching, crops, filtering, resizing) is the real path.
        """
        torch.manual_seed(seed)
        model = _tiny_sam()
        generator = cls.__new__(cls)
        provenance = {"name": "sam", "model_type": "tiny", "weights": f"random:seed={seed}"}
        generator._setup(model, {**TABLE_10, **settings}, work_side, device, provenance)
        return generator

    def _setup(self, model: torch.nn.Module, settings: dict, work_side: int, device: str,
               provenance: dict) -> None:
        self.device = _resolve_device(device)
        self.work_side = work_side
        model = model.to(self.device).eval()
        # RLE output: masks stay run-length encoded until each is shrunk, so no stack of
        # full-resolution masks is ever built here.
        self._generator = _crop_safe_generator(model, output_mode="uncompressed_rle", **settings)
        self.provenance = {**provenance, "version": _sam_version(), **settings, "work_side": work_side}

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> Masks:
        """All masks of an RGB uint8 image [H, W, 3], as bool [N, h, w] at the working size."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        size = working_size(width, height, self.work_side)
        records = self._generator.generate(self._seen(image))
        masks = np.zeros((len(records), size[1], size[0]), dtype=bool)
        for i, record in enumerate(records):
            masks[i] = shrink_mask(_decode_rle(record["segmentation"]), size)
        return Masks(masks=masks, image_size=(width, height), bounds=mask_bounds(masks))

    def _seen(self, image: np.ndarray) -> np.ndarray:
        """`image` shrunk to what SAM can see of it, so its full-size mask upsampling stays bounded.

        SAM resizes every crop to its encoder's input side (1024), and a layer-L crop spans a
        little over 1/2**L of the image, so pixels beyond input_side * 2**crop_n_layers never
        reach the model. Shrinking to that first loses nothing, and a 4K image's batches of
        full-resolution mask logits (points_per_batch x 3 x H x W floats) become a quarter.
        """
        sam = self._generator.predictor.model
        side = sam.image_encoder.img_size * 2 ** self._generator.crop_n_layers
        height, width = image.shape[:2]
        if max(height, width) <= side:
            return image
        return np.asarray(Image.fromarray(image).resize(working_size(width, height, side), Image.Resampling.BILINEAR))


def _crop_safe_generator(model: torch.nn.Module, **kwargs: Any):
    """SamAutomaticMaskGenerator that survives an image where no crop finds a mask.

    Upstream, such a crop's `crop_boxes` is a 1-D empty tensor, and with crop_n_layers >= 1
    the cross-crop NMS then fails in `box_area` (facebookresearch/segment-anything#614).
    A blank page or a flat image at table 10's thresholds hits it; keeping the (N, 4) shape
    makes "no masks" the answer instead of an exception.
    """
    from segment_anything import SamAutomaticMaskGenerator

    class CropSafe(SamAutomaticMaskGenerator):
        def _process_crop(self, *args, **kw):
            data = super()._process_crop(*args, **kw)
            data["crop_boxes"] = data["crop_boxes"].reshape(-1, 4)
            return data

    return CropSafe(model, **kwargs)


def _tiny_sam() -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    side, patch, dim = 256, 16, 32
    encoder = ImageEncoderViT(img_size=side, patch_size=patch, embed_dim=64, depth=2, num_heads=2,
                              out_chans=dim, qkv_bias=True, use_rel_pos=True, window_size=8,
                              global_attn_indexes=(1,))
    prompts = PromptEncoder(embed_dim=dim, image_embedding_size=(side // patch, side // patch),
                            input_image_size=(side, side), mask_in_chans=4)
    decoder = MaskDecoder(transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=2, mlp_dim=64))
    return Sam(image_encoder=encoder, prompt_encoder=prompts, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def _load_sam(uri: str, model_type: str) -> tuple[torch.nn.Module, Path]:
    """SAM of `model_type` with the weights at `uri`, on the CPU.

    The file is read before the model is built, so a bad file fails in seconds rather than
    after ViT-H's initialisation, and with map_location="cpu" so checkpoints saved from a GPU
    load on hosts without one.
    """
    from segment_anything import sam_model_registry

    if model_type not in ("vit_h", "vit_l", "vit_b"):
        raise ValueError(f"model_type must be vit_h, vit_l or vit_b, got {model_type!r}")
    path = local_weights(uri)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = sam_model_registry[model_type](checkpoint=None)
        model.load_state_dict(state)
    except Exception as exc:  # pickle, zip, torch and key/shape errors alike: unusable weights
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"not a SAM {model_type} checkpoint: {uri}: {reason}") from exc
    return model, path


def working_size(width: int, height: int, work_side: int) -> tuple[int, int]:
    """(w, h) with the long side at most `work_side`, the aspect ratio kept; never upscaled."""
    scale = min(1.0, work_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`mask` [H, W] at `size` (w, h), preserving its area as nearly as the grid allows.

    A working pixel is set when at least half of the original pixels under it are (box
    average, then threshold), so areas stay unbiased and the box stage's area weights hold.
    A mask smaller than half a working pixel would vanish under that rule; it keeps its
    best-covered pixel instead, so every mask SAM found still counts.
    """
    if mask.shape[::-1] == tuple(size):
        return mask
    coverage = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BOX))
    shrunk = coverage >= 0.5
    if not shrunk.any() and coverage.any():
        shrunk[np.unravel_index(np.argmax(coverage), coverage.shape)] = True
    return shrunk


def _decode_rle(rle: dict) -> np.ndarray:
    """segment-anything's uncompressed RLE (column-major runs, starting with zeros) -> bool [H, W]."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T
