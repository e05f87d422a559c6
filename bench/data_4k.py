"""PS3 4K data pipeline vs the plain method, on one CPU core, in the same run.

Both produce what one PS3-4K-SigLIP step needs per sample (scales 378/756/1512/3780,
patch 14, budgets 85/341/2134, selection view 1512) from the same 4K JPEG shards made by
`ps3.data.synth`:
- pipeline: `ps3.data` as the loader runs it: ranged read, DCT-scaled decode (1/2) for the
  low-res and selection views (torch's antialiased bicubic), one JPEG region decode at full
  size for the windows of the selected patches, which alone are resampled; uint8 tensors
  out (the training process normalises them on the device, after the copy).
- pipeline, whole decode: the same without the region decoder (what runs where
  `ps3.data._jpegregion` is not built): one full-size decode serves every view.
- plain: full Pillow decode, bicubic resize to every scale, full float32 normalised tensors
  made in the worker (what the released code does, minus its full-resolution GT maps).

Usage: python bench/data_4k.py [--quick] [--samples N] [--data URI]
The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before torch starts its pools

import argparse
import json
import tempfile
import time

import torch

import ps3.data.decode as decode_module
from ps3.data.batches import MicroBatchMaker, SourceRef, normalize_images
from ps3.data.decode import plain_decode
from ps3.data.index import SourceIndex
from ps3.data.records import parse_record
from ps3.data.sampling import Slot
from ps3.data.shards import read_sample_bytes
from ps3.data.synth import SynthConfig, generate
from ps3.data.views import PlainPixels, ViewConfig, sample_tensors

PS3_4K = {"scales": (378, 756, 1512, 3780), "patch_size": 14, "budgets": (85, 341, 2134),
          "selection_view_size": 1512, "context_length": 64}


def make_data(root: str, samples: int) -> str:
    cfg = SynthConfig(scene_size=(3840, 4096))  # 4K scenes, aspect up to 4:3
    return generate(root, samples, seed=0, kinds=("scene",), samples_per_shard=50, config=cfg)["scene"]


def slots(n: int) -> list[Slot]:
    """A quarter global pairs, like a training batch."""
    return [Slot(0, i, i % 4 == 0, seed=1000 + i) for i in range(n)]


def run_pipeline(uri: str, n: int) -> float:
    maker = MicroBatchMaker([SourceRef.open("scene", uri, 0)], ViewConfig(**PS3_4K, highres="patches"))
    todo = slots(n)
    maker.load(todo[0], set())  # warm-up (opens the index, first reads)
    started = time.perf_counter()
    for slot in todo:
        maker.load(slot, set())
    return time.perf_counter() - started


def run_whole_decode(uri: str, n: int) -> float:
    """The pipeline as it runs without the native region decoder."""
    region = decode_module._decode_region
    decode_module._decode_region = None
    try:
        return run_pipeline(uri, n)
    finally:
        decode_module._decode_region = region


def run_plain(uri: str, n: int) -> float:
    index = SourceIndex.open(uri)
    views = ViewConfig(**PS3_4K, highres="full")
    started = time.perf_counter()
    for slot in slots(n):
        path, entry = index.locate(slot.index)
        image, raw = read_sample_bytes(index.fs, path, entry)
        record = parse_record(entry.key, raw)
        box = None if slot.is_global else record.boxes[0]
        pixels = PlainPixels(plain_decode(image))
        tensors = sample_tensors(pixels, record.width, record.height, box, views, record.boxes)
        normalize_images(tensors)  # the released code normalises in its data workers
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples, under a minute")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--data", default=None, help="existing scene source URI (default: generate)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.samples or (5 if args.quick else 24)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        uri = args.data or make_data(f"file://{tmp}", n)
        gen_s = time.perf_counter() - started
        index = SourceIndex.open(uri)
        n = min(n, len(index))
        megapixels = []
        for i in range(n):
            path, entry = index.locate(i)
            record = parse_record(entry.key, read_sample_bytes(index.fs, path, entry)[1])
            megapixels.append(record.width * record.height / 1e6)
        if not decode_module.region_decoding():
            raise SystemExit("ps3.data._jpegregion is not built: install libjpeg's headers (make install-test)")
        fast_s = run_pipeline(uri, n)
        whole_s = run_whole_decode(uri, n)
        plain_s = run_plain(uri, n)
    result = {"samples": n, "mean_megapixels": round(sum(megapixels) / n, 2), "generate_s": round(gen_s, 2),
              "samples_per_s": round(n / fast_s, 3), "baseline_samples_per_s": round(n / plain_s, 3),
              "speedup": round(plain_s / fast_s, 2), "whole_decode_samples_per_s": round(n / whole_s, 3),
              "region_decode_gain": round(whole_s / fast_s, 2), "preset": "ps3-4k-siglip", "threads": 1}
    print(f"{'method':<26}{'samples':>8}{'seconds':>10}{'samples/s':>12}{'ms/sample':>11}")
    for name, secs in (("pipeline", fast_s), ("pipeline, whole decode", whole_s), ("plain", plain_s)):
        print(f"{name:<26}{n:>8}{secs:>10.2f}{n / secs:>12.2f}{1000 * secs / n:>11.0f}")
    print(f"speedup {result['speedup']}x on {n} 4K JPEGs ({result['mean_megapixels']} MP mean)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
