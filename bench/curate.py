"""Curation benchmarks, on one CPU core.

- saliency: appendix A's box scores, vectorised (one weighted density map built from each
  mask's bounds + the integral image's needed rows) vs the plain loop over boxes x masks,
  on the same masks; asserts equal output.
- box recall: the share of synthetic signs (`ps3.data.synth` scenes) whose centre lies in
  one of the 4 salient boxes, with `ClassicalSegmenter` masks; also its time per image.
- OCR word recall: the share of the labelled lines' words of synthetic documents that
  Tesseract reads back (same string, box overlapping the line).
- throughput: the whole pipeline (read -> masks -> boxes -> OCR captions, documents -> OCR)
  on Ray Data with 1 and then 2 CPU workers, on the same raw inputs (Ray start excluded).

Usage: python bench/curate.py [--quick] [--scenes N] [--seed S]
The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy starts its pools

import argparse
import io
import json
import math
import time

import numpy as np
from PIL import Image

from ps3.curation.boxes import candidate_boxes, centres_inside, salient_boxes, saliency_scores, saliency_scores_loop
from ps3.curation.models.classical import ClassicalSegmenter
from ps3.curation.types import Masks
from ps3.data.synth import SynthConfig, sample

#: 2K-4K scenes would make the segmenter's downscale dominate; it works at 1024 either way.
SCENES = SynthConfig(scene_size=(1024, 2048))


def random_masks(count: int, work: tuple[int, int], image: tuple[int, int], seed: int = 0) -> Masks:
    """`count` blob masks of mixed sizes (a few px to a tenth of the image), like SAM's."""
    rng = np.random.default_rng(seed)
    w, h = work
    ys, xs = np.mgrid[:h, :w]
    masks = np.zeros((count, h, w), dtype=bool)
    bounds = np.zeros((count, 4), dtype=np.int32)
    for m in range(count):
        rx, ry = w * rng.uniform(0.002, 0.15), h * rng.uniform(0.002, 0.15)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        masks[m] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        # the ellipse's bounding box, as a segmenter reports it (SAM's records carry one)
        x0, y0 = max(0, math.floor(cx - rx)), max(0, math.floor(cy - ry))
        bounds[m] = x0, y0, max(x0, min(w, math.ceil(cx + rx) + 1)), max(y0, min(h, math.ceil(cy + ry) + 1))
    return Masks(masks, image, bounds)


def _timed(fn, *args, repeat: int = 1) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - started)
    return out, best


def bench_saliency(quick: bool) -> dict:
    """Vectorised vs loop scores for one 4K image: 100 masks at 1024x768, 90 candidates.

    The masks come with their bounds, as both segmenters give them; the figure without
    bounds (every mask read whole) is reported beside it."""
    image, work = (4096, 3072), (1024, 768)
    masks = random_masks(100, work, image)
    boxes = candidate_boxes(*image)
    fast, fast_s = _timed(saliency_scores, masks, boxes, repeat=20)
    dense = Masks(masks.masks, masks.image_size)  # the same masks without their bounds
    fast_dense, dense_s = _timed(saliency_scores, dense, boxes, repeat=10)
    loop, loop_s = _timed(saliency_scores_loop, dense, boxes, repeat=1 if quick else 2)
    for scores in (fast, fast_dense):
        np.testing.assert_allclose(scores, loop, rtol=1e-5, atol=1e-6 * float(np.abs(loop).max()))
    return {"saliency_masks": masks.count, "saliency_boxes": len(boxes), "saliency_ms": round(1000 * fast_s, 2),
            "saliency_loop_ms": round(1000 * loop_s, 1), "saliency_speedup": round(loop_s / fast_s, 1),
            "saliency_speedup_without_bounds": round(loop_s / dense_s, 1)}


def bench_box_recall(quick: bool, scenes: int | None = None, seed: int = 0) -> dict:
    """Box recall and segmentation time over synthetic scenes (decode time excluded)."""
    segmenter = ClassicalSegmenter()
    n = scenes or (12 if quick else 60)
    hits, signs, seg_s, megapixels = 0, 0, 0.0, 0.0
    for i in range(n):
        data, _, record = sample("scene", seed, i, SCENES)
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        masks, secs = _timed(segmenter.generate, image)
        boxes, _ = salient_boxes(masks)
        found = centres_inside(boxes, np.asarray(record.boxes))
        hits, signs, seg_s = hits + int(found.sum()), signs + len(found), seg_s + secs
        megapixels += record.width * record.height / 1e6
    return {"box_recall": round(hits / signs, 3), "recall_scenes": n, "recall_signs": signs, "recall_seed": seed,
            "segment_ms_per_image": round(1000 * seg_s / n, 1), "mean_megapixels": round(megapixels / n, 2)}


def bench_ocr(quick: bool) -> dict:
    from ps3.curation.documents import ocr_word_recall

    n = 4 if quick else 20
    started = time.perf_counter()
    recall = ocr_word_recall(n, seed=0)
    return {"ocr_word_recall": round(recall, 3), "ocr_pages": n,
            "ocr_s_per_page": round((time.perf_counter() - started) / n, 2)}


def _throughput(raw: dict, output: str, workers: int) -> float:
    """Inputs per second of one whole curation run on a fresh embedded Ray with `workers` CPUs."""
    import tempfile

    from ps3.curation.config import CurationConfig
    from ps3.curation.pipeline import curate
    from ps3.curation.ray_adapter import stream
    from ps3.curation import ray_cluster

    config = CurationConfig.model_validate({
        "output": output, "samplesPerShard": 4, "masks": {"generator": "classical"}, "captions": {"captioner": "ocr"},
        # two pools of `workers` actors share `workers` CPUs: half a CPU each, so both stages run at once
        "workers": {"masks": workers, "captions": workers, "cpusPerActor": 0.5},
        "sources": [{"name": kind, "kind": "natural" if kind == "scene" else "document", "uri": uri}
                    for kind, uri in raw.items()]})
    arrivals: list[float] = []

    def timed(rows, kind, cfg):
        for row in stream(rows, kind, cfg):
            arrivals.append(time.perf_counter())
            yield row

    ray_cluster.disable_implicit_auth()
    with ray_cluster.embedded(workers, 0, tempfile.mkdtemp(prefix="ray-bench-")):
        curate(config, stream=timed)
    # Steady state: from the first finished input to the last, so actor start-up (model loads)
    # and filling the pipeline are not counted against more workers.
    return (len(arrivals) - 1) / max(1e-9, arrivals[-1] - arrivals[0])


def bench_throughput(quick: bool) -> dict:
    import tempfile

    from ps3.data.synth import generate_raw

    root = tempfile.mkdtemp(prefix="curate-bench-")
    n = 6 if quick else 16
    kinds = ["scene"] if quick else ["scene", "document"]  # quick: OCR of whole pages takes ~3 s each
    raw = generate_raw(f"file://{root}/raw", n, seed=9, kinds=kinds,
                       config=SynthConfig(scene_size=(1024, 1536), doc_long_side=(1024, 1536)))
    one = _throughput(raw, f"file://{root}/out1", 1)
    two = _throughput(raw, f"file://{root}/out2", 2)
    return {"images_per_s_1": round(one, 3), "images_per_s_2": round(two, 3), "scaling": round(two / one, 2),
            "throughput_inputs": n * len(kinds), "cpus": os.cpu_count()}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="curation benchmarks (saliency, recall, OCR on 1 core; throughput on 1 and 2)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer masks and scenes, well under a minute")
    parser.add_argument("--scenes", type=int, default=None, help="synthetic scenes for box recall")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed for box recall")
    args = parser.parse_args()
    result = {**bench_saliency(args.quick), **bench_box_recall(args.quick, args.scenes, args.seed),
              **bench_ocr(args.quick), "threads": 1}
    result.update(bench_throughput(args.quick))  # last: Ray starts worker processes of its own
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
