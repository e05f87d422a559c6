"""The curation stages, one row (one input) at a time, runnable without Ray.

A row is {"id", "shard", "meta": JSON text, "image": encoded bytes, "masks": packed bytes}:
everything variable lives in `meta`, so Ray Data's Arrow blocks keep one fixed schema, and
pixels travel encoded (a 4K JPEG is ~2 MB, its decoded array 50 MB). A stage that cannot
handle an input sets meta["failed"] to a reason (and meta["error"] to a one-line detail);
later stages pass such rows through untouched and the writer counts them. One bad input
never stops the pipeline.

Natural images:  read -> Segment (actor) -> boxes -> Caption (actor)
Documents:       read -> DocumentText (actor)
"""

from __future__ import annotations

import io
import json
import logging
import zlib

import numpy as np
from PIL import Image

from ps3.data.fs import filesystem

from .config import CurationConfig
from .inputs import InputItem
from .types import Masks

log = logging.getLogger(__name__)

#: Image formats stored as they came; others are re-encoded (the shard format holds jpg/png).
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png"}


def failed(row: dict, reason: str, detail: str) -> dict:
    meta = json.loads(row["meta"])
    meta.update(failed=reason, error=detail.splitlines()[0][:300] if detail else reason)
    return {**row, "meta": json.dumps(meta), "image": b"", "masks": b""}


def is_failed(row: dict) -> bool:
    return json.loads(row["meta"]).get("failed") is not None


def update(row: dict, **fields) -> dict:
    meta = json.loads(row["meta"])
    meta.update(fields)
    return {**row, "meta": json.dumps(meta)}


# ---- read ----------------------------------------------------------------------------------

def read_input(row: dict, config: CurationConfig) -> dict:
    """Fetch an input's bytes (file, PDF page or tar member), check it decodes, keep it encoded."""
    item = InputItem.from_meta(json.loads(row["meta"]))
    try:
        fs, path = filesystem(item.uri)
        if item.member is not None:
            offset, size = item.member
            data = fs.cat_file(path, start=offset, end=offset + size)
        else:
            data = fs.cat_file(path)
    except (OSError, ValueError) as exc:
        return failed(row, "read_error", f"{type(exc).__name__}: {exc}")
    extra = {}
    if item.page is not None:
        from .documents import DocumentError, render_pdf_page

        try:
            image = render_pdf_page(data, item.page, dpi=config.documents.dpi)
        except DocumentError as exc:
            return failed(row, "pdf_error", str(exc))
        data, ext = _encode(image, "png"), "png"
    else:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # a truncated file fails here, not at first use
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return failed(row, "bad_image", f"{type(exc).__name__}: {exc}")
        ext = STORED_FORMATS.get(image.format)
        if ext is None or image.mode not in ("RGB", "L"):
            try:  # webp, tiff, RGBA, 16-bit...: the shard format holds jpg or png
                data, ext = _encode(image.convert("RGB"), "jpg"), "jpg"
            except (OSError, ValueError) as exc:
                return failed(row, "bad_image", f"cannot re-encode {image.format} {image.mode}: {exc}")
    if item.kind == "natural" and min(image.size) * config.boxes.fraction < config.boxes.min_box_px:
        return failed(row, "too_small", f"{image.width}x{image.height}: a box of {config.boxes.fraction:g} of the "
                                        f"short side is under {config.boxes.min_box_px} px")
    if item.kind == "document" and config_ocr_json(config, item.source):
        extra["ocr_json"] = _read_ocr_json(item)
    return {**update(row, width=image.width, height=image.height, ext=ext, **extra), "image": data}


def config_ocr_json(config: CurationConfig, source: str) -> bool:
    return next(s for s in config.sources if s.name == source).ocr == "json"


def _read_ocr_json(item: InputItem) -> str | None:
    """The OCR JSON text beside the input (`<input>.ocr.json`), or None if absent."""
    fs, path = filesystem(item.uri + ".ocr.json")
    try:
        return fs.cat_file(path).decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return None


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        image.save(buf, "PNG", compress_level=3)
    else:
        image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def decode_rgb(row: dict) -> Image.Image:
    return Image.open(io.BytesIO(row["image"])).convert("RGB")


# ---- masks -> boxes ------------------------------------------------------------------------

def pack_masks(masks: Masks) -> tuple[bytes, dict]:
    """Masks as zlib-compressed bits (a few hundred KB for ~100 masks at 1024 px); their
    bounds, when the segmenter gave them, ride along in the metadata."""
    bits = np.packbits(masks.masks.astype(bool), axis=None)
    info = {"mask_shape": list(masks.masks.shape), "image_size": list(masks.image_size)}
    if masks.bounds is not None:
        info["mask_bounds"] = np.asarray(masks.bounds).astype(int).tolist()
    return zlib.compress(bits.tobytes(), 1), info


def unpack_masks(data: bytes, meta: dict) -> Masks:
    shape = tuple(meta["mask_shape"])
    count = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(zlib.decompress(data), np.uint8), count=count).astype(bool)
    bounds = meta.get("mask_bounds")
    return Masks(bits.reshape(shape), tuple(meta["image_size"]),
                 None if bounds is None else np.asarray(bounds, dtype=np.int64).reshape(-1, 4))


def segment(row: dict, generator) -> dict:
    """Masks of one image; no masks at all is a counted skip."""
    if is_failed(row):
        return row
    try:
        masks = generator.generate(np.asarray(decode_rgb(row)))
    except (OSError, ValueError, RuntimeError) as exc:
        return failed(row, "mask_error", f"{type(exc).__name__}: {exc}")
    if masks.count == 0:
        return failed(row, "no_masks", "the mask generator found no masks")
    packed, info = pack_masks(masks)
    return {**update(row, mask_count=masks.count, masks_by=generator.provenance, **info), "masks": packed}


def select_boxes(row: dict, config: CurationConfig) -> dict:
    """Appendix A's salient boxes from the row's masks (then the masks are dropped)."""
    from .boxes import ImageTooSmall, salient_boxes

    if is_failed(row):
        return row
    meta = json.loads(row["meta"])
    box = config.boxes
    try:
        boxes, scores = salient_boxes(unpack_masks(row["masks"], meta), fraction=box.fraction, top_k=box.top_k,
                                      min_box_px=box.min_box_px)
    except ImageTooSmall as exc:
        return failed(row, "too_small", str(exc))
    if len(boxes) == 0:
        return failed(row, "no_boxes", f"{meta['mask_count']} masks but no box with a positive score")
    row = update(row, boxes=[[round(float(v), 1) for v in b] for b in boxes],
                 scores=[round(float(s), 4) for s in scores], mask_bounds=None)
    return {**row, "masks": b""}


# ---- captions ------------------------------------------------------------------------------

def caption_requests(row: dict, config: CurationConfig, *, global_ok: bool) -> list:
    """The requests of one image: one per box, then the whole image (natural images only)."""
    from .types import CaptionRequest

    meta = json.loads(row["meta"])
    image = decode_rgb(row)
    requests = [CaptionRequest(image, tuple(b)) for b in meta["boxes"]]
    if global_ok and config.captions.global_captions and meta["kind"] == "natural":
        requests.append(CaptionRequest(image, None))
    return requests


def attach_captions(row: dict, captions: list[str | None], provenance: dict) -> dict:
    """Keep the boxes whose caption came back; a box without one is dropped and counted."""
    meta = json.loads(row["meta"])
    n = len(meta["boxes"])
    local, glob = captions[:n], (captions[n] if len(captions) > n else None)
    keep = [i for i, c in enumerate(local) if c and c.strip()]
    dropped = n - len(keep)
    if not keep and not (glob and glob.strip()):
        return failed(row, "no_captions", f"no caption for any of {n} boxes")
    return update(row, boxes=[meta["boxes"][i] for i in keep], scores=[meta["scores"][i] for i in keep],
                  captions=[local[i].strip() for i in keep], global_caption=glob.strip() if glob else None,
                  dropped_boxes=dropped, captioner=provenance)


# ---- documents -----------------------------------------------------------------------------

def document_text(row: dict, config: CurationConfig, ocr) -> dict:
    """Boxes and captions of a page from its OCR words (Tesseract, or the source's OCR JSON)."""
    from .documents import DocumentError, parse_ocr_json, sample_document_boxes

    if is_failed(row):
        return row
    meta = json.loads(row["meta"])
    source = next(s for s in config.sources if s.name == meta["source"])
    try:
        if source.ocr == "json":
            if meta.get("ocr_json") is None:
                return failed(row, "missing_ocr_json", f"no {meta['uri']}.ocr.json beside the input")
            words = parse_ocr_json(meta["ocr_json"].encode(), page=meta.get("page"))
        else:
            words = ocr.words(decode_rgb(row))
    except DocumentError as exc:
        return failed(row, "bad_ocr_json", str(exc))
    except (OSError, RuntimeError) as exc:
        return failed(row, "ocr_error", f"{type(exc).__name__}: {exc}")
    docs = config.documents
    rng = np.random.default_rng([config.seed, int(row["id"][:8], 16)])
    boxes, captions = sample_document_boxes(words, source.document_mode, docs.boxes_per_page,
                                            run_length=docs.run_length, rng=rng)
    if not boxes:
        return failed(row, "no_text", f"OCR found {len(words)} words, too few for a {source.document_mode} box")
    meta.pop("ocr_json", None)
    meta.update(boxes=[[round(float(v), 1) for v in b] for b in boxes], captions=list(captions),
                global_caption=None, captioner=ocr.provenance if source.ocr == "tesseract" else {"name": "ocr-json"})
    return {**row, "meta": json.dumps(meta)}
