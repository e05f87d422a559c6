"""Image decoding that does only the work a PS3 step needs.

A 4K JPEG is 8-16 megapixels, but a step needs a 378 view, a 1512 view and small windows
around one box. So: (1) the whole image is decoded once, at the smallest power-of-two DCT
scale (1/8, 1/4, 1/2, 1; libjpeg-turbo through Pillow's `draft`) that still has as many
pixels as its largest whole view; (2) both whole views (low-res, selection) are made from
that one decode, shrunk first by an integer box `reduce` when the decode is much larger than
the view (what Pillow's `reducing_gap` does), then resized by torch's antialiased bicubic;
(3) high-res scales are never built whole: the windows of their views that hold the selected
patches are resampled alone (Pillow's `resize(box=...)` computes the pixels the full resize
would have there), (4) from one *region* decode that covers every window at the resolution
the largest scale needs: only those rows and columns of the JPEG go through the inverse DCT,
the rows above are only entropy-decoded and the rows below are not read (`_jpegregion.c`,
libjpeg-turbo's `jpeg_crop_scanline` / `jpeg_skip_scanlines`; no Python package exposes them).

Without the native module (built when libjpeg's headers are present), or for PNGs, the
windows come from the whole decode, which is then made at the windows' resolution.

`plain_*` functions are the straightforward method (full decode, full resizes) that tests
and `bench/data_4k.py` compare against.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .records import BadSample

try:
    from ._jpegregion import decode_region as _decode_region
except ImportError:  # built without libjpeg's headers: windows come from the whole decode
    _decode_region = None

#: Pillow guards against decompression bombs at ~179 MP; 4K-and-beyond data is legitimate.
Image.MAX_IMAGE_PIXELS = 400_000_000
DCT_SCALES = (0.125, 0.25, 0.5, 1.0)
#: A view is made from a source at least this many times its size (cf. Pillow reducing_gap):
#: larger sources are box-reduced first. 3.0 keeps results within the tested tolerance
#: (Pillow: "almost identical" to a direct resize).
REDUCING_GAP = 3.0
#: The selection view (only scored coarsely by the selection branch) may come from a source
#: down to 0.9x its size: the box reduction rounds up (a 2.9K decode is halved, then
#: bicubic-upsampled 4% to 1512, 2x cheaper), and a 3840x2880 image is decoded at 1/2.
SELECTION_GAP = 0.9
#: Pixels kept around a window beyond the bicubic kernel's reach, so that the region decode's
#: edge columns (libjpeg upsamples chroma there without the neighbours) are never sampled.
WINDOW_MARGIN = 2

Window = tuple[int, tuple[int, int, int, int]]  # (view size, (x0, y0, x1, y1) in that view)


def region_decoding() -> bool:
    """True when JPEG windows are decoded alone (the native module is built)."""
    return _decode_region is not None


@dataclass
class Decoded:
    """A decoded RGB image: the whole stored image or a rectangle of it, at one DCT scale."""

    image: Image.Image
    width: int  # stored (original) size, what boxes refer to
    height: int
    left: int = 0  # where `image` starts in the whole image at this scale
    top: int = 0
    scaled_size: tuple[int, int] | None = None  # the whole image at this scale; None: `image` is whole

    @property
    def scaled(self) -> tuple[int, int]:
        return self.scaled_size or self.image.size

    @property
    def scale(self) -> float:
        return self.scaled[0] / self.width


def decode(data: bytes, key: str, need: int = 0) -> Decoded:
    """Decode so that both sides keep >= `need` pixels (0: full size); BadSample if corrupt.

    JPEGs are decoded by libjpeg-turbo at a reduced DCT scale through Pillow's `draft`
    (no copy afterwards, unlike decoders that return numpy arrays); other formats fully.
    """
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        if im.format == "JPEG" and need:
            scale = dct_scale(width, height, need)
            im.draft("RGB", (int(width * scale), int(height * scale)))  # floor: Pillow divides
        im.load()
        return Decoded(im if im.mode == "RGB" else im.convert("RGB"), width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSample("bad_image", key, f"{type(exc).__name__}: {exc}") from None


def dct_scale(width: int, height: int, need: int) -> float:
    """Smallest power-of-two JPEG scale keeping both sides >= need (1.0 if none does)."""
    if need <= 0:
        return 1.0
    return next((s for s in DCT_SCALES if width * s >= need and height * s >= need), 1.0)


def full_view(dec: Decoded, size: int, gap: float = REDUCING_GAP) -> np.ndarray:
    """The squash-resized size x size view (bicubic), uint8 [size, size, 3].

    The decode is first box-reduced by k = floor(short side / (size * gap)). gap < 1 lets
    k round up, trading a slight upsample for a much cheaper resize (selection view). The
    resize is torch's antialiased bicubic on uint8 (Pillow's filter, a = -0.5, within one
    level of Pillow's result, 3-4x faster on one core).
    """
    src = dec.image
    k = _reduce_factor(src, size, gap)
    if k > 1:
        src = src.reduce(k)
    view = F.interpolate(_as_tensor(src), size=(size, size), mode="bicubic", antialias=True)
    return view[0].permute(1, 2, 0).numpy()


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [1, 3, H, W] (channels-last memory) sharing the image's pixels; read only."""
    with warnings.catch_warnings():  # Pillow's buffer is read-only; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]


def window_view(dec: Decoded, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels box=(x0, y0, x1, y1) of the size x size view, without building the view.

    uint8 [y1 - y0, x1 - x0, 3]. `dec` may be a region decode holding the window (see
    `window_source`). No box reduce: windows are small, and their pixels are what is learnt.
    """
    x0, y0, x1, y1 = box
    (sx, sy), (left, top) = _view_to_decode(dec.scaled, size), (dec.left, dec.top)
    region = (x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top)
    return np.asarray(dec.image.resize((x1 - x0, y1 - y0), Image.BICUBIC, box=region))


def window_source(data: bytes, key: str, dec: Decoded, windows: Sequence[Window]) -> Decoded:
    """A decode holding every window at the resolution of the largest view among them.

    `dec` (the whole decode) serves when it is fine enough; otherwise a JPEG is decoded
    only in the windows' bounding rectangle (plus the bicubic kernel's reach), anything else
    whole at full size. BadSample if that decode fails.
    """
    scale = dct_scale(dec.width, dec.height, max(size for size, _ in windows))
    if dec.scale >= scale:
        return dec
    if _decode_region is None or not data.startswith(b"\xff\xd8"):
        return decode(data, key)
    denom = round(1 / scale)
    scaled = (math.ceil(dec.width / denom), math.ceil(dec.height / denom))  # libjpeg rounds up
    rect = [math.inf, math.inf, -math.inf, -math.inf]
    for size, (x0, y0, x1, y1) in windows:
        (sx, sy) = _view_to_decode(scaled, size)
        mx, my = math.ceil(2 * max(sx, 1)) + WINDOW_MARGIN, math.ceil(2 * max(sy, 1)) + WINDOW_MARGIN
        rect = [min(rect[0], math.floor(x0 * sx) - mx), min(rect[1], math.floor(y0 * sy) - my),
                max(rect[2], math.ceil(x1 * sx) + mx), max(rect[3], math.ceil(y1 * sy) + my)]
    x0, y0 = max(rect[0], 0), max(rect[1], 0)
    x1, y1 = min(rect[2], scaled[0]), min(rect[3], scaled[1])
    try:
        rgb, w, h, left, top = _decode_region(data, x0, y0, x1, y1, denom)
    except NotImplementedError:  # CMYK: Pillow converts it
        return decode(data, key)
    except ValueError as exc:
        raise BadSample("bad_image", key, str(exc)) from None
    return Decoded(Image.frombuffer("RGB", (w, h), rgb, "raw", "RGB", 0, 1), dec.width, dec.height, left, top, scaled)


def _view_to_decode(scaled: tuple[int, int], size: int) -> tuple[float, float]:
    """Pixels of a decode of size `scaled` per view pixel, per axis (a view squashes the whole image)."""
    return scaled[0] / size, scaled[1] / size


def _reduce_factor(src: Image.Image, size: int, gap: float) -> int:
    return max(1, int(min(src.width, src.height) / (size * gap) + 1e-9))


# ---- the plain method (reference for tests and the benchmark) --------------------------
def plain_decode(data: bytes) -> Image.Image:
    """Full-resolution decode with Pillow."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def plain_view(image: Image.Image, size: int) -> np.ndarray:
    """Direct bicubic squash resize of the full image, uint8 [size, size, 3]."""
    return np.asarray(image.resize((size, size), Image.BICUBIC))


def decode_sample(key: str, image: bytes, raw_json: bytes | None, need: int = 0):
    """Validate a sample's json, decode its image, check they agree: (Record, Decoded).

    Raises BadSample with the first problem found (json problems before image ones, so a
    sample with both is counted once, under the cheaper check).
    """
    from .records import parse_record

    record = parse_record(key, raw_json)
    dec = decode(image, key, need)
    if (dec.width, dec.height) != (record.width, record.height):
        raise BadSample("size_mismatch", key, f"image {dec.width}x{dec.height}, json {record.width}x{record.height}")
    return record, dec
