"""Image decoding that does only the work a PS3 step needs.

A 4K JPEG is 8-16 megapixels, but a step needs a 378 view, a 1512 view and small windows
around one box. So: (1) JPEGs are decoded once, at the smallest power-of-two DCT scale
(1/8, 1/4, 1/2, 1; libjpeg-turbo through Pillow's `draft`) that still has at least as many pixels
as the largest view asked for; (2) every view is made from that one decode; whole views (low-res, selection)
are shrunk first by an integer box `reduce` when the decode is much larger than the view
(what Pillow's `reducing_gap` does); (3) high-res scales are never built whole: only the window of the
view that holds the selected patches is resampled (Pillow's `resize(box=...)` computes
exactly the pixels the full resize would have there).

Not done: decoding only the JPEG region around the box. Nothing installable here does it
for less than a full decode: Pillow, simplejpeg, imagecodecs and torchvision have no crop;
libjpeg-turbo 3's cropping decode (tj3SetCroppingRegion) is reached through PyTurboJPEG 2,
which needs a system libturbojpeg >= 3.0 (Debian 12 ships 2.1.5); libvips' sequential crop
decodes every row above the region (measured on a 2299x1882 scene: 5.6 ms for a 400 px
window at the top, 20.6 ms at the bottom, 17.9 ms for the whole image).

`plain_*` functions are the straightforward method (full decode, full resizes) that tests
and `bench/data_4k.py` compare against.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .records import BadSample

#: Pillow guards against decompression bombs at ~179 MP; 4K-and-beyond data is legitimate.
Image.MAX_IMAGE_PIXELS = 400_000_000
DCT_SCALES = (0.125, 0.25, 0.5, 1.0)
#: A view is made from a source at least this many times its size (cf. Pillow reducing_gap):
#: larger sources are box-reduced first. 3.0 keeps results within the tested tolerance
#: (Pillow: "almost identical" to a direct resize).
REDUCING_GAP = 3.0
#: The selection view (only scored coarsely by the selection branch) may round the box
#: reduction up: a 2.9K decode is halved then bicubic-upsampled 4% to 1512, 2x cheaper.
SELECTION_GAP = 0.9


@dataclass
class Decoded:
    """A decoded RGB image and its scale relative to the stored image."""

    image: Image.Image
    width: int  # stored (original) size, what boxes refer to
    height: int

    @property
    def scale(self) -> float:
        return self.image.width / self.width


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
    k round up, trading a slight upsample for a much cheaper resize (selection view).
    """
    src = dec.image
    k = _reduce_factor(src, size, gap)
    if k > 1:
        src = src.reduce(k)
    return np.asarray(src.resize((size, size), Image.BICUBIC))


def window_view(dec: Decoded, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels box=(x0, y0, x1, y1) of the size x size view, without building the view.

    uint8 [y1 - y0, x1 - x0, 3].
    """
    x0, y0, x1, y1 = box
    src = dec.image  # no box reduce: windows are small, and their pixels are what is learnt
    sx, sy = src.width / size, src.height / size
    region = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    return np.asarray(src.resize((x1 - x0, y1 - y0), Image.BICUBIC, box=region))


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
