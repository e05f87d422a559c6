"""Model wrappers curation stages call: mask generators and captioners.

A wrapper owns weights and the forward pass; the stage that calls it owns batching,
retries and resources (Curator's model/stage split). Each wrapper says what it is in
`provenance`, which every curated sample records (name, version, weights digest).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ps3.curation.types import CaptionRequest, Masks


class WeightsError(ValueError):
    """Weights (or a model directory) missing or unreadable at the URI the spec gives."""


@runtime_checkable
class MaskGenerator(Protocol):
    """Segments everything in an image ("segment everything" mode)."""

    provenance: dict

    def generate(self, image: np.ndarray) -> Masks:
        """All masks of an RGB uint8 image [H, W, 3]; zero masks is a valid answer."""
        ...


@runtime_checkable
class Captioner(Protocol):
    """Writes local captions (region of an image) and global captions (whole image)."""

    provenance: dict

    def caption(self, requests: list[CaptionRequest]) -> list[str]:
        """One caption per request, in order; raises on failure (the caller retries)."""
        ...
