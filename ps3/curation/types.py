"""Values that cross curation stages: masks of one image, and boxes with captions.

Stages pass compact values (masks at a working resolution, float boxes in original
pixels, strings), never full-resolution pixel arrays, so Ray Data blocks stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: A box as [x0, y0, x1, y1] in pixels of the original (stored) image.
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Masks:
    """Every mask of one image, at a working resolution (h, w) <= the original's.

    `masks` is bool [N, h, w]; `image_size` is the original (width, height), so areas and
    boxes can be converted between the two: one mask pixel covers (W/w) x (H/h) original pixels.

    `bounds`, when given, is int [N, 4]: each mask's bounding box (x0, y0, x1, y1) in mask
    pixels, end exclusive, with the mask all False outside it. Segmenters know it for free
    (SAM's records, labelled regions), and with it per-mask work costs in proportion to the
    mask, not to the image: most masks are small.
    """

    masks: np.ndarray
    image_size: tuple[int, int]
    bounds: np.ndarray | None = None

    def __post_init__(self):
        if self.bounds is not None and np.shape(self.bounds) != (self.count, 4):
            raise ValueError(f"bounds must be [{self.count}, 4], got {np.shape(self.bounds)}")

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])

    def crops(self):
        """(mask cropped to its bounds, its bounds) per mask; whole masks without bounds."""
        _, h, w = self.masks.shape
        bounds = self.bounds if self.bounds is not None else np.tile([0, 0, w, h], (self.count, 1))
        for mask, (x0, y0, x1, y1) in zip(self.masks, np.asarray(bounds, dtype=np.int64)):
            yield mask[y0:y1, x0:x1], (int(x0), int(y0), int(x1), int(y1))


def mask_bounds(masks: np.ndarray) -> np.ndarray:
    """int32 [N, 4] bounds (x0, y0, x1, y1, end exclusive) of bool masks [N, h, w]; an empty
    mask gets an empty box (0, 0, 0, 0). One pass over the masks, for segmenters that
    produce dense masks without knowing where they lie."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    out = np.zeros((masks.shape[0], 4), dtype=np.int32)
    for i, (r, c) in enumerate(zip(rows, cols)):
        ys, xs = np.flatnonzero(r), np.flatnonzero(c)
        if len(ys):
            out[i] = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
    return out


@dataclass(frozen=True)
class CaptionRequest:
    """One caption to write: of the region `box` of `image` (a local caption), or of the
    whole image when `box` is None (a global caption). `image` is a PIL RGB image."""

    image: object
    box: Box | None = None


class CaptionError(RuntimeError):
    """A captioner could not caption one request (the caller retries, then drops the box)."""
