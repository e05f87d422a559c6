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
    """

    masks: np.ndarray
    image_size: tuple[int, int]

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])


@dataclass(frozen=True)
class CaptionRequest:
    """One caption to write: of the region `box` of `image` (a local caption), or of the
    whole image when `box` is None (a global caption). `image` is a PIL RGB image."""

    image: object
    box: Box | None = None


class CaptionError(RuntimeError):
    """A captioner could not caption one request (the caller retries, then drops the box)."""
