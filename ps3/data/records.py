"""One training sample's annotation (the `json` member of a shard) and its validation.

Bad records are common in web-scale data, so validation never raises a bare exception:
it raises `BadSample` with a short machine-readable reason that the loader counts
(`ps3_data_bad_samples_total{reason=...}`) before skipping the sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

#: Reasons a sample is skipped; the label values of `ps3_data_bad_samples_total`.
BAD_REASONS = (
    "missing_json",  # the sample has no json member
    "bad_json",  # json does not parse or misses/mistypes a field
    "missing_image",  # no jpg/jpeg/png member
    "bad_image",  # image bytes do not decode (corrupt or truncated)
    "size_mismatch",  # decoded size differs from json width/height
    "bad_box",  # a box is degenerate or outside the image
    "empty_caption",  # a local caption (or the global caption used) is blank
    "no_boxes",  # drawn for a local pair but has no boxes
    "no_global_caption",  # drawn for a global pair but has no global caption
    "read_error",  # shard missing, truncated or unreadable at this member
)

#: Boxes may overhang the image by this many pixels (rounding in annotation tools).
BOX_SLACK_PX = 1.0

IMAGE_EXTS = ("jpg", "jpeg", "png")


class BadSample(ValueError):
    """A sample that must be skipped; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, key: str, detail: str = ""):
        assert reason in BAD_REASONS, reason
        self.reason, self.key, self.detail = reason, key, detail
        super().__init__(f"{reason}: {key}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Record:
    """Validated annotation of one image: boxes in stored-image pixels, one caption each."""

    key: str
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # [x0, y0, x1, y1]
    captions: list[str] = field(default_factory=list)
    global_caption: str | None = None
    source: str = ""

    def to_json(self) -> bytes:
        """The shard member bytes for this record (DESIGN.md "Dataset shards")."""
        obj = {"width": self.width, "height": self.height, "boxes": [list(b) for b in self.boxes],
               "captions": list(self.captions), "source": self.source}
        if self.global_caption is not None:
            obj["global_caption"] = self.global_caption
        return json.dumps(obj, separators=(",", ":")).encode()


def parse_record(key: str, raw: bytes | None) -> Record:
    """Parse and validate a json member; raises BadSample naming the reason."""
    if raw is None:
        raise BadSample("missing_json", key)
    try:
        obj = json.loads(raw)
        width, height = int(obj["width"]), int(obj["height"])
        boxes = [tuple(float(v) for v in box) for box in obj.get("boxes", [])]
        captions = [str(c) for c in obj.get("captions", [])]
        glob = obj.get("global_caption")
        glob = None if glob is None else str(glob)
        source = str(obj.get("source", ""))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadSample("bad_json", key, type(exc).__name__) from None
    if width <= 0 or height <= 0 or len(boxes) != len(captions) or any(len(b) != 4 for b in boxes):
        raise BadSample("bad_json", key, "size, or boxes/captions mismatch")
    for box in boxes:
        _check_box(key, box, width, height)
    if any(not c.strip() for c in captions):
        raise BadSample("empty_caption", key)
    return Record(key, width, height, boxes, captions, glob, source)  # type: ignore[arg-type]


def _check_box(key: str, box: tuple[float, ...], width: int, height: int) -> None:
    x0, y0, x1, y1 = box
    inside = -BOX_SLACK_PX <= x0 < x1 <= width + BOX_SLACK_PX and -BOX_SLACK_PX <= y0 < y1 <= height + BOX_SLACK_PX
    if not inside:
        raise BadSample("bad_box", key, f"{list(box)} outside {width}x{height}")


def clip_box(box: tuple[float, ...], width: int, height: int) -> tuple[float, float, float, float]:
    """The box clipped to the image (only the tolerated slack is ever clipped)."""
    x0, y0, x1, y1 = box
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
