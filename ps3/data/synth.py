"""Synthetic high-resolution pre-training data that needs high resolution to be learnt.

Two kinds, each written as its own source (`{uri}/document`, `{uri}/scene`) because
they are balanced as separate sources and only scenes have global captions:

- *document*: white pages (long side 1K-4K) with lines of small text; a few lines are
  labelled, their box and string being the local (box, caption) pairs (like IDL/PDFA).
  No global caption.
- *scene*: 2K-4K canvases with two large shapes (the global caption names them) and 3-4
  small signs of distinct colours (so a caption names one sign even where only colour is
  visible). A sign is a coloured shape with a black outline over a white plate with a
  word: local captions read "<colour> <shape> sign reading <word>". A sign spans 4.2-5%
  of the long side (scenes are at most 4:3), so in a squash-resized 64 px view it is under
  4.5 px (a colour blob), at 256 px over 10 px (shape clear), and its word needs about
  1.5K to be read. All shapes have the same area and centre of mass, so the blob does not
  give the shape away. Measured (120 scenes, 417 signs, an MLP on 16x16 crops around
  each sign): shape accuracy 0.42 from the 64 px view vs 0.80 from 256 px (chance 0.25);
  colour 0.98 from either. The closed vocabularies below
  let a tiny model learn the captions in minutes on CPU.

Every sample is a pure function of (seed, kind, sample number): generation is
reproducible and can be split across processes.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from .fs import filesystem, join
from .records import Record
from .writer import ShardWriter

COLOURS = {
    "red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 75, 215), "yellow": (240, 205, 20),
    "purple": (130, 45, 170), "orange": (240, 125, 20), "pink": (240, 120, 180), "brown": (120, 75, 35),
}
BACKGROUNDS = {"white": (246, 246, 246), "grey": (170, 170, 170), "beige": (225, 210, 180), "sky blue": (170, 210, 240)}
SIGN_COLOURS = ("red", "green", "blue", "yellow")
SIGN_SHAPES = ("circle", "square", "triangle", "cross")
SIGN_WORDS = ("cat", "dog", "sun", "map", "key", "box")
LARGE_SHAPES = ("circle", "square", "triangle")
DOC_WORDS = ["invoice", "total", "amount", "due", "date", "account", "number", "payment", "received", "order", "item", "price", "quantity", "tax", "shipping", "address", "customer", "report", "summary", "page", "section", "table", "figure", "result", "method", "data", "value", "sample", "model", "test", "annual", "review", "budget", "plan", "meeting", "notes", "approved", "signed"]
KINDS = ("document", "scene")


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and looks; defaults are the 4K setting, tests pass small sizes for speed."""

    scene_size: tuple[int, int] = (2048, 4096)  # long side drawn uniformly in this range
    scene_aspect: float = 4 / 3  # most elongated scene (long / short side)
    doc_long_side: tuple[int, int] = (1024, 4096)
    signs: tuple[int, int] = (3, 4)
    sign_fraction: tuple[float, float] = (0.042, 0.05)  # sign side / long side
    sign_words: bool = True  # False: captions are "<colour> <shape> sign"
    doc_boxes: int = 4  # labelled lines per page
    quality: int = 90
    doc_ext: str = "jpg"  # or "png"
    texture: bool = True  # mild noise, so JPEGs compress (and decode) like photos


def sign_caption(colour: str, shape: str, word: str | None) -> str:
    """The local caption of a sign (the vocabulary a retrieval eval can enumerate)."""
    return f"{colour} {shape} sign" + (f" reading {word}" if word else "")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(1, int(size)))


def _polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, w, h = (x0 + x1) / 2, x1 - x0, y1 - y0
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "cross":
        a, b = w / 3, h / 3
        return [(x0 + a, y0), (x0 + 2 * a, y0), (x0 + 2 * a, y0 + b), (x1, y0 + b), (x1, y0 + 2 * b),
                (x0 + 2 * a, y0 + 2 * b), (x0 + 2 * a, y1), (x0 + a, y1), (x0 + a, y0 + 2 * b), (x0, y0 + 2 * b),
                (x0, y0 + b), (x0 + a, y0 + b)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill, outline=None, width: int = 0) -> None:
    """Draw one of the vocabulary shapes filling `box`."""
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, box), fill=fill, outline=outline, width=width)


_TILE = 256


@functools.lru_cache(maxsize=1)
def _noise_tile() -> Image.Image:
    """A fixed noise tile (textures need no per-sample randomness; tiling keeps it fast)."""
    small = np.random.default_rng(12345).integers(0, 13, (_TILE // 2, _TILE // 2, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((_TILE, _TILE), Image.NEAREST)


def _canvas(size: tuple[int, int], colour, texture: bool) -> Image.Image:
    image = Image.new("RGB", size, colour)
    if not texture:
        return image
    noise = Image.new("RGB", size)
    tile = _noise_tile()
    for y in range(0, size[1], _TILE):
        for x in range(0, size[0], _TILE):
            noise.paste(tile, (x, y))
    return ImageChops.add(image, noise, scale=1.0, offset=-6)


def make_scene(rng: np.random.Generator, cfg: SynthConfig) -> tuple[Image.Image, list, list, str]:
    """(image, boxes, captions, global caption) of one scene."""
    long_side = int(rng.integers(cfg.scene_size[0], cfg.scene_size[1] + 1))
    short_side = round(long_side / rng.uniform(1.0, cfg.scene_aspect))
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    bg = str(rng.choice(list(BACKGROUNDS)))
    image = _canvas((w, h), BACKGROUNDS[bg], cfg.texture)
    draw = ImageDraw.Draw(image)
    short = min(w, h)
    parts = []
    for _ in range(2):
        shape, colour = str(rng.choice(LARGE_SHAPES)), str(rng.choice(list(COLOURS)))
        side = short * rng.uniform(0.25, 0.45)
        x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
        draw_shape(draw, shape, (x, y, x + side, y + side), COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    boxes, captions = _draw_signs(rng, draw, w, h, cfg)
    return image, boxes, captions, f"{parts[0]} and {parts[1]} on a {bg} background"


def _draw_signs(rng, draw, w: int, h: int, cfg: SynthConfig) -> tuple[list, list]:
    boxes, captions = [], []
    count = int(rng.integers(cfg.signs[0], cfg.signs[1] + 1))
    colours = [str(c) for c in rng.permutation(SIGN_COLOURS)]  # distinct while they last: a colour names one sign
    for n in range(count):
        side = max(w, h) * rng.uniform(*cfg.sign_fraction)
        plate = side * 0.45 if cfg.sign_words else 0.0
        for _attempt in range(20):  # signs never overlap, so each box shows one sign
            x, y = rng.uniform(0, w - side), rng.uniform(0, h - side - plate)
            box = (x, y, x + side, y + side + plate)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        colour, shape = colours[n % len(colours)], str(rng.choice(SIGN_SHAPES))
        line = max(1, int(side * 0.04))
        draw_shape(draw, shape, _equal_area((x, y, x + side, y + side), shape), COLOURS[colour],
                   outline=(0, 0, 0), width=line)
        word = None
        if cfg.sign_words:
            word = str(rng.choice(SIGN_WORDS))
            draw.rectangle((x, y + side, x + side, y + side + plate), fill=(255, 255, 255), outline=(0, 0, 0), width=line)
            draw.text((x + side / 2, y + side + plate / 2), word, fill=(0, 0, 0), font=_font(plate * 0.7), anchor="mm")
        boxes.append(tuple(round(v, 1) for v in box))
        captions.append(sign_caption(colour, shape, word))
    return boxes, captions


#: Every shape covers the same area (3/8 of the sign's box) and has its centre of mass at
#: the box centre, so a few-pixel blob at low resolution carries the same colour mass in
#: the same place whatever the shape: only detail tells the shapes apart.
_AREA = 0.375
_SIDE = {"square": math.sqrt(_AREA), "circle": math.sqrt(4 * _AREA / math.pi), "cross": math.sqrt(_AREA * 9 / 5)}


def _equal_area(box: tuple[float, float, float, float], shape: str) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    side, cx, cy = x1 - x0, (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":  # full width, 3/4 height, centroid (1/3 up from the base) at the centre
        return x0, cy - side / 2, x1, cy + side / 4
    half = side * _SIDE[shape] / 2
    return cx - half, cy - half, cx + half, cy + half


def make_document(rng: np.random.Generator, cfg: SynthConfig) -> tuple[Image.Image, list, list, None]:
    """(image, boxes, captions, None) of one page; the boxes are text lines' bounding boxes."""
    long_side = int(rng.integers(cfg.doc_long_side[0], cfg.doc_long_side[1] + 1))
    w, h = round(long_side / 1.294), long_side
    image = _canvas((w, h), (255, 255, 255), cfg.texture)
    draw = ImageDraw.Draw(image)
    size = max(6, int(w * rng.uniform(1 / 90, 1 / 60)))
    font, margin = _font(size), int(w * 0.08)
    lines = []
    y = margin
    while y + size < h - margin:
        if rng.random() < 0.12:  # paragraph gap
            y += size
            continue
        text = " ".join(rng.choice(DOC_WORDS, int(rng.integers(3, 7))))
        x0, y0, x1, y1 = draw.textbbox((margin, y), text, font=font)
        if x1 < w - margin // 2:
            draw.text((margin, y), text, fill=(20, 20, 20), font=font)
            lines.append(((float(x0), float(y0), float(x1), float(y1)), text))
        y += int(size * 1.6)
    picked = sorted(rng.choice(len(lines), min(cfg.doc_boxes, len(lines)), replace=False)) if lines else []
    return image, [lines[i][0] for i in picked], [lines[i][1] for i in picked], None


def encode(image: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        image.save(buf, "PNG", compress_level=1)
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sample(kind: str, seed: int, i: int, cfg: SynthConfig = SynthConfig()) -> tuple[bytes, str, Record]:
    """Sample `i` of `kind` for `seed`: (image bytes, extension, record)."""
    rng = np.random.default_rng([seed, KINDS.index(kind), i])
    maker = make_scene if kind == "scene" else make_document
    image, boxes, captions, glob = maker(rng, cfg)
    ext = "jpg" if kind == "scene" else cfg.doc_ext
    record = Record(f"{kind}{i:08d}", image.width, image.height, boxes, captions, glob, kind)
    return encode(image, ext, cfg.quality), ext, record


def generate(uri: str, samples: int, seed: int, kinds: Sequence[str] = KINDS, *,
             samples_per_shard: int = 100, config: SynthConfig = SynthConfig()) -> dict[str, str]:
    """Write `samples` samples of each kind to `{uri}/{kind}`; returns {kind: source uri}.

    Each source gets its shards, offset tables and index.json, ready for the loader.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    out = {}
    for kind in kinds:
        source_uri = join(uri, kind)
        with ShardWriter(source_uri, kind, samples_per_shard=samples_per_shard) as writer:
            for i in range(samples):
                data, ext, record = sample(kind, seed, i, config)
                writer.write(record.key, data, ext, record)
        out[kind] = source_uri
    return out


def generate_raw(uri: str, samples: int, seed: int, kinds: Sequence[str] = KINDS, *, pages_per_pdf: int = 0,
                 config: SynthConfig = SynthConfig()) -> dict[str, str]:
    """Write the same samples as `generate`, but as plain files without their boxes: what curation
    takes in. Scenes become `{uri}/scene/*.jpg`, documents `{uri}/document/*.png` (or, with
    `pages_per_pdf`, PDFs of that many pages). The boxes and captions go to `{uri}/truth.jsonl`
    only, so a benchmark can score what curation finds. Returns {kind: directory uri}.
    """
    fs, root = filesystem(uri)
    out, truth = {}, []
    for kind in kinds:
        directory = f"{root}/{kind}"
        fs.makedirs(directory, exist_ok=True)
        pages = []
        for i in range(samples):
            data, ext, record = sample(kind, seed, i, config)
            truth.append({"kind": kind, "key": record.key, "boxes": record.boxes, "captions": record.captions})
            if kind == "document" and pages_per_pdf:
                pages.append(Image.open(io.BytesIO(data)).convert("RGB"))
                if len(pages) == pages_per_pdf or i == samples - 1:
                    buf = io.BytesIO()
                    pages[0].save(buf, "PDF", resolution=150.0, save_all=True, append_images=pages[1:])
                    fs.pipe_file(f"{directory}/{record.key}.pdf", buf.getvalue())
                    pages = []
            else:
                fs.pipe_file(f"{directory}/{record.key}.{ext}", data)
        out[kind] = join(uri, kind)
    fs.pipe_file(f"{root}/truth.jsonl", "".join(json.dumps(t) + "\n" for t in truth).encode())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ps3.data.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="fsspec URL; sources go to OUT/document and OUT/scene")
    parser.add_argument("--samples", type=int, default=100, help="samples per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: document,scene")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--max-side", type=int, default=4096, help="largest image side (smaller = faster)")
    parser.add_argument("--no-words", action="store_true", help="sign captions without the word")
    args = parser.parse_args(argv)
    top = args.max_side
    cfg = SynthConfig(scene_size=(min(2048, top // 2), top), doc_long_side=(min(1024, top // 2), top),
                      sign_words=not args.no_words)
    sources = generate(args.out, args.samples, args.seed, [k for k in args.kinds.split(",") if k],
                       samples_per_shard=args.samples_per_shard, config=cfg)
    print(json.dumps({"sources": sources}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
