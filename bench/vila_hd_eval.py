"""VILA-HD data and evaluation speed: high-res SFT synthesis at 4096², and questions answered per second.

- `synth_images_per_s`: `ps3.vila_hd.hr_synth.paste_on_canvas` on one core, what the
  `hr_sft_synth` stage does per sample: decode a low-res VQA image, resize it to a side in
  [1024, 1536], paste it on a solid 4096x4096 canvas, encode JPEG q90. The goal is that
  synthesis is not what a 4K SFT stage waits for: at least 20 images/s/core. Baseline in the
  same run: decoding the canvases it wrote (the least a 4K SFT loader does per image, on the
  same core), so the two rates compare like for like.
  `synth_images_per_s_all_cores`: the same with one thread per core, as the stage runs.
- `eval_questions_per_s`: the `vila_hd_eval` loop (`ps3.vila_hd.sweep.run_setting`) with a
  tiny random VILA-HD (ps3-tiny + a 2-layer Qwen2) answering 4KPro-format questions by option
  scores, top-down at 12.5% of the high-res patches; baseline: the same questions low-res only.

Usage: python bench/vila_hd_eval.py [--quick]
The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before torch starts its pools

import argparse
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ps3.data.synth import SynthConfig
from ps3.model import PS3VisionEncoder, get_preset
from ps3.vila_hd.benchmarks import read_benchmark
from ps3.vila_hd.hr_synth import paste_on_canvas
from ps3.vila_hd.llm import build_tiny_llm, load_llm
from ps3.vila_hd.model import Selection, VilaHD
from ps3.vila_hd.sweep import Item, Setting, run_setting
from ps3.vila_hd.synth import BENCHMARK_FILE, vocabulary_texts, vqa_sample, write_benchmark

CANVAS = (4096, 4096)
PASTE_SIDE = (1024, 1536)
#: Low-res VQA images as SFT sets hold them (LLaVA-style data is mostly 336-1024 px).
SOURCE_CONFIG = SynthConfig(scene_size=(512, 1024))
QUESTION_CONFIG = SynthConfig(scene_size=(1024, 1536), sign_fraction=(0.08, 0.1), signs=(1, 1))


def bench_synth(n: int) -> dict:
    sources = [vqa_sample(0, i, SOURCE_CONFIG, question="mark")[2][0][1] for i in range(n)]
    paste_on_canvas(sources[0], np.random.default_rng(0), canvas_size=CANVAS, paste_side=PASTE_SIDE)  # warm-up
    canvases = []
    started = time.perf_counter()
    for i, data in enumerate(sources):
        canvases.append(paste_on_canvas(data, np.random.default_rng([0, i]), canvas_size=CANVAS,
                                        paste_side=PASTE_SIDE)[0])
    synth_s = time.perf_counter() - started
    cores = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:  # as the stage makes them (its `threads` param)
        list(pool.map(lambda i: paste_on_canvas(sources[i], np.random.default_rng([0, i]), canvas_size=CANVAS,
                                                paste_side=PASTE_SIDE), range(n)))
    threaded_s = time.perf_counter() - started
    started = time.perf_counter()
    for data in canvases:
        Image.open(io.BytesIO(data)).convert("RGB")
    decode_s = time.perf_counter() - started
    return {"synth_images": n, "synth_images_per_s": round(n / synth_s, 2), "synth_cores": cores,
            "synth_images_per_s_all_cores": round(n / threaded_s, 2),
            "decode_images_per_s": round(n / decode_s, 2), "synth_vs_decode": round(decode_s / synth_s, 2),
            "canvas_kib": round(sum(map(len, canvases)) / n / 1024)}


def bench_eval(n: int, tmp: str) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    build_tiny_llm(f"{tmp}/llm", vocabulary_texts())
    llm = load_llm(f"{tmp}/llm")
    torch.manual_seed(0)
    newline = llm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    model = VilaHD(PS3VisionEncoder(get_preset("ps3-tiny")), llm.model, image_token_id=llm.image_token_id,
                   newline_token_id=newline).eval()
    write_benchmark(f"file://{tmp}/data", n, cfg=QUESTION_CONFIG, question="mark", shuffle_options=False)
    questions, _ = read_benchmark(f"file://{tmp}/data/{BENCHMARK_FILE}", "4kpro")
    items = [Item(q, Path(q.image.removeprefix("file://")).read_bytes()) for q in questions]
    base = Selection(select_num_each_scale=(8, 32))
    result = {"questions": len(items)}
    for setting in (Setting("after_prompt", 0.0), Setting("after_prompt", 0.125), Setting("after_image", 0.125)):
        run_setting(model, llm.tokenizer, items[:2], setting.selection(base, model), answer="options",
                    batch_size=8, max_new_tokens=1, instruction="")  # warm-up
        started = time.perf_counter()
        summary, _ = run_setting(model, llm.tokenizer, items, setting.selection(base, model), answer="options",
                                 batch_size=8, max_new_tokens=1, instruction="Answer with the option's letter.")
        result[setting.name] = {"questions_per_s": round(len(items) / (time.perf_counter() - started), 2),
                                "tokens_per_image": summary["tokens_per_image"], "recall": summary["recall"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images and questions, under a minute")
    args = parser.parse_args()
    torch.set_num_threads(1)
    synth = bench_synth(6 if args.quick else 40)
    with tempfile.TemporaryDirectory() as tmp:
        evaluation = bench_eval(16 if args.quick else 64, tmp)
    print(f"{'hr_sft_synth at 4096x4096 (one core)':<40}{'images/s':>10}")
    print(f"{'  paste + JPEG q90 encode':<40}{synth['synth_images_per_s']:>10.2f}")
    print(f"{'  baseline: decode the same canvases':<40}{synth['decode_images_per_s']:>10.2f}")
    print(f"{'  paste + encode, ' + str(synth['synth_cores']) + ' threads':<40}"
          f"{synth['synth_images_per_s_all_cores']:>10.2f}")
    print(f"\n{'vila_hd_eval, tiny model (one core)':<40}{'questions/s':>12}{'tokens/image':>14}{'recall':>8}")
    for name in ("lowres", "topdown@12%", "bottomup@12%"):
        row = evaluation[name]
        recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        print(f"  {name:<38}{row['questions_per_s']:>12.2f}{row['tokens_per_image']:>14.0f}{recall:>8}")
    result = {**synth, "eval_questions": evaluation["questions"],
              "eval_questions_per_s": evaluation["topdown@12%"]["questions_per_s"],
              "eval_lowres_questions_per_s": evaluation["lowres"]["questions_per_s"],
              "eval_bottomup_questions_per_s": evaluation["bottomup@12%"]["questions_per_s"], "threads": 1}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
