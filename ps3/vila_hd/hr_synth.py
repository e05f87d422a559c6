"""High-res SFT data synthesised from low-res VQA (PS3 paper, figure 8 right).

VILA-HD needs instruction data whose answers live in a small part of a 4K image, and
such data is scarce. The paper makes it from ordinary low-res VQA: each image is resized
to a random 1K-1.5K side and pasted at a random spot of a large solid-colour canvas. The
question and answer stay true, but the model must now find the pasted region to answer,
and the region is known exactly: it becomes the sample's box, the ground truth of the
top-down selection loss (finer still where the input already had a box, mapped inside).

Output is a pure function of (seed, input): sample i draws from `default_rng([seed, i])`,
i its position in the input. Shards are planned by position and committed whole
(`ps3.curation.writer`), so a killed run rewrites only the shards it had not committed.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
from PIL import Image

from ps3.curation.writer import committed_shards, finish_source, write_shard
from ps3.data.fs import filesystem
from ps3.data.index import DataSourceError, read_index

from .conversations import BadSample, _ImageRoot, _llava_sample, iter_conversations

log = logging.getLogger(__name__)

#: The settings a run's shards were made with, kept beside them: a rerun with other
#: settings must not silently resume into shards drawn differently.
SETTINGS_NAME = "_hr_synth.json"
SKIP_KINDS = ("not_one_image", "image_decode")
_canvases = threading.local()  # one reusable canvas per thread (`_blank_canvas`)


class SettingsMismatch(ValueError):
    """The output holds shards drawn with other settings: resuming would mix two draws."""


def paste_on_canvas(image_bytes: bytes, rng: np.random.Generator, canvas_size: tuple[int, int] = (4096, 4096),
                    paste_side: tuple[int, int] = (1024, 1536), quality: int = 90,
                    ) -> tuple[bytes, list[float], tuple[int, int]]:
    """Paste one image at a random size and spot of a solid-colour canvas.

    Returns (canvas JPEG, [x0, y0, x1, y1] of the pasted region in canvas pixels, (W, H)
    of the image before resizing). The image's long side becomes a side drawn uniformly
    from `paste_side` (aspect kept, never beyond the canvas). Raises on undecodable bytes
    (PIL's errors: the caller counts them).
    """
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    canvas_w, canvas_h = canvas_size
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    side = int(rng.integers(paste_side[0], paste_side[1] + 1))
    scale = min(side / max(width, height), canvas_w / width, canvas_h / height)
    new_w, new_h = max(1, min(canvas_w, round(width * scale))), max(1, min(canvas_h, round(height * scale)))
    x0 = int(rng.integers(0, canvas_w - new_w + 1))
    y0 = int(rng.integers(0, canvas_h - new_h + 1))
    canvas = _blank_canvas(canvas_size, colour)
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), (x0, y0))
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), [float(x0), float(y0), float(x0 + new_w), float(y0 + new_h)], (width, height)


def _blank_canvas(size: tuple[int, int], colour: tuple[int, ...]) -> Image.Image:
    """This thread's canvas of `size`, refilled with `colour`: refilling 4096x4096 takes a seventh
    of the time of allocating it afresh (page faults), a quarter of a sample's cost otherwise."""
    canvas = getattr(_canvases, "image", None)
    if canvas is None or canvas.size != tuple(size):
        canvas = _canvases.image = Image.new("RGB", tuple(size))
    canvas.paste(colour, (0, 0, *canvas.size))
    return canvas


def map_box(box, paste_box: list[float], size: tuple[int, int]) -> list[float]:
    """A box of the original image (its pixels) in canvas pixels: scaled, then offset."""
    x0, y0, x1, y1 = paste_box
    sx, sy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    bx0, by0, bx1, by1 = (float(v) for v in box)
    return [x0 + bx0 * sx, y0 + by0 * sy, x0 + bx1 * sx, y0 + by1 * sy]


def synth_sample(key: str, meta: Mapping, images: list[bytes], rng: np.random.Generator, *,
                 canvas_size: tuple[int, int], paste_side: tuple[int, int], quality: int, source: str) -> dict:
    """One output sample ({"key", "image", "ext", "json"} for `write_shard`), or `_Skip`
    (one of SKIP_KINDS) if the input cannot become one."""
    if len(images) != 1:
        raise _Skip("not_one_image", f"{len(images)} images")
    try:
        data, paste_box, size = paste_on_canvas(images[0], rng, canvas_size, paste_side, quality)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL's "cannot identify", truncation
        raise _Skip("image_decode", f"{type(exc).__name__}: {exc}") from None
    boxes = meta.get("boxes")
    box = boxes[0] if isinstance(boxes, list) and len(boxes) == 1 and boxes[0] is not None else None
    out = {**meta, "source": source, "id": meta.get("id", key),
           "boxes": [map_box(box, paste_box, size) if box is not None else paste_box],
           "paste_box": paste_box, "canvas": list(canvas_size)}
    out.setdefault("kind", "qa")
    return {"key": key, "image": data, "ext": "0.jpg",
            "json": json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()}


class _Skip(Exception):
    """A sample left out and counted by `kind` in its shard's marker, never a crash."""

    def __init__(self, kind: str, detail: str = ""):
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}")


# ---- inputs --------------------------------------------------------------------------
# An input is (key, load) pairs in input order: load() -> (meta, [image bytes]) or _Skip.
# Loading waits until the sample's shard is written, so resumed shards read no images.
# Both are plain functions returning generators, so a bad input fails before any output.
def _conversation_input(uri: str) -> Iterator[tuple[str, Callable]]:
    read_index(uri)  # DataSourceError naming the URI
    return ((key, lambda meta=meta, images=images: (meta, images)) for key, meta, images in iter_conversations(uri))


def _llava_input(json_uri: str, image_root: str, source: str) -> Iterator[tuple[str, Callable]]:
    """LLaVA items under `import_llava`'s rules: the same keys, checks and image loading."""
    fs, path = filesystem(json_uri)
    try:
        items = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DataSourceError(f"{json_uri} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"cannot read {json_uri}: {exc}") from None
    if not isinstance(items, list):
        raise DataSourceError(f"{json_uri} is not a LLaVA list of samples")
    root = _ImageRoot(image_root)

    def load(item) -> tuple[dict, list[bytes]]:
        try:
            meta, files = _llava_sample(item, root, source)
        except BadSample as exc:  # bad_image is the undecodable image of the conversation path
            raise _Skip("image_decode" if exc.kind == "bad_image" else exc.kind, exc.detail) from None
        return meta, [data for _, data in files]

    return ((f"{n:09d}", lambda item=item: load(item)) for n, item in enumerate(items))


# ---- the stage's work ----------------------------------------------------------------
def synthesize(output: str, *, input: str | None = None, llava_json: str | None = None,
               image_root: str | None = None, canvas_size: tuple[int, int] = (4096, 4096),
               paste_side: tuple[int, int] = (1024, 1536), seed: int = 0, samples_per_shard: int = 1000,
               source: str = "hr_sft", quality: int = 90, max_samples: int | None = None,
               threads: int = 1) -> dict:
    """Write high-res SFT shards under `output` from a conversation source or a LLaVA JSON.

    Input problems (no index, unreadable JSON) raise DataSourceError before anything is
    written; an output made with other settings raises SettingsMismatch. Returns {"written",
    "skipped": {kind: count}, "shards", "resumed_shards"}; counts cover resumed shards too,
    so a rerun reports what the output holds. `threads` canvases are made at once (the
    output does not depend on how many).
    """
    if (input is None) == (llava_json is None):
        raise ValueError("give exactly one of input (conversation shards) or llava_json (+ image_root)")
    if input is not None:
        samples = _conversation_input(input)
    else:
        samples = _llava_input(llava_json, image_root or "", source)
    settings = {"input": input, "llava_json": llava_json, "image_root": image_root, "canvas_size": list(canvas_size),
                "paste_side": list(paste_side), "seed": seed, "quality": quality, "source": source,
                "samples_per_shard": samples_per_shard}
    _claim_output(output, settings)
    done = committed_shards(output)
    draw = {"canvas_size": canvas_size, "paste_side": paste_side, "quality": quality, "source": source}
    written, resumed, skipped, planned = 0, 0, Counter(), set()
    chunks = _chunks(islice(samples, max_samples), samples_per_shard)
    # PIL releases the GIL while it decodes, resizes and encodes: threads scale over cores
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for number, (start, chunk) in enumerate(chunks):
            name = f"shard-{number:06d}.tar"
            planned.add(name)
            keys = [key for key, _ in chunk]
            marker = done.get(name)
            if marker is None or sorted(marker.get("inputs", {})) != sorted(keys):
                if marker is not None:
                    log.warning("%s/%s covers other inputs than planned: writing it again", output, name)
                marker = _write_one(pool, output, name, start, chunk, seed, draw)
            else:
                resumed += 1
            written += marker["samples"]
            skipped.update(o["reason"] for o in marker["inputs"].values() if o["status"] == "skipped")
    finish_source(output, source, planned)
    return {"written": written, "skipped": dict(skipped), "shards": len(planned), "resumed_shards": resumed}


def _write_one(pool: ThreadPoolExecutor, output: str, name: str, start: int, chunk: list, seed: int,
               draw: dict) -> dict:
    """Make and commit one planned shard; returns its marker."""
    def make(offset: int, key: str, load: Callable) -> dict | _Skip:
        try:
            return synth_sample(key, *load(), np.random.default_rng([seed, start + offset]), **draw)
        except _Skip as exc:
            return exc

    out, outcomes = [], {}
    for (key, _), made in zip(chunk, pool.map(make, range(len(chunk)), *zip(*chunk))):
        if isinstance(made, _Skip):
            log.warning("skipping %s: %s", key, made)
            outcomes[key] = {"input": key, "status": "skipped", "reason": made.kind}
        else:
            out.append(made)
            outcomes[key] = {"input": key, "status": "written"}
    write_shard(output, name, out, outcomes)
    return {"samples": len(out), "inputs": outcomes}


def _chunks(samples, size: int) -> Iterator[tuple[int, list]]:
    """(position of the first, samples) in runs of `size`: the shard plan, by input position."""
    start = 0
    while chunk := list(islice(samples, size)):
        yield start, chunk
        start += len(chunk)


def _claim_output(output: str, settings: dict) -> None:
    """Record the settings beside the shards, or refuse an output made with other ones."""
    fs, path = filesystem(output)
    record = f"{path}/{SETTINGS_NAME}"
    try:
        previous = json.loads(fs.cat_file(record))
    except FileNotFoundError:
        previous = None
    except ValueError:
        previous = {}
    if previous is not None and previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise SettingsMismatch(f"{output} holds shards made with other settings ({', '.join(changed)}); "
                         "write to a new output")
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(record, json.dumps(settings, sort_keys=True).encode())
