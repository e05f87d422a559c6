"""VILA-HD step cost: the two-pass trick, image tokens per image, and 4K vs 1.5K at one budget.

- two-pass overhead: one training step (forward + backward of the LM loss) with
  LOOK_CLOSE_MODE "after_prompt" (pass 1: the LLM without gradients up to the first
  question, low-res image tokens only, for the top-down prompt; pass 2: the whole sequence)
  over the same step with "after_image" (bottom-up selection, one LLM pass), on the same
  batch and the same selected-patch budget, so both give the LLM the same sequence.
- tokens per image: `Selection.image_tokens` at the 1.5K and 4K training defaults (both
  NUM_TOKEN_LOOK_CLOSE=10240, appendix C), read from the presets alone (no model is built).
- 4K vs 1.5K: the step with the 4-scale preset over the step with the 3-scale one at the
  same selected-patch budget (the 3-scale preset's full budget), same LLM, same text. PS3
  encodes only the selected patches, so the goal is a ratio of at most 1.3.

On CPU (one thread) the steps run with `ps3-tiny-4s` vs `ps3-tiny` (their 512 vs 256 px
top scales stand in for 4K vs 1.5K) and a small random Qwen2 (hidden 256, 4 layers), large
enough next to the tiny PS3 that the LLM's share of a step is not negligible. With
`--device cuda` they run with `ps3-4k-siglip` vs `ps3-1.5k-siglip` and a random Qwen2-7B-width
LLM in bf16. The configurations are timed interleaved, in a rotating order, so load from
other processes falls on all of them; each ratio is the median of per-round ratios.

Usage: python bench/vila_hd.py [--quick] [--repeats N] [--device cpu|cuda]
The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before torch starts its pools

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ps3.model import PS3VisionEncoder, get_preset
from ps3.model.forward import count_looks
from ps3.model.selection import look_budgets
from ps3.vila_hd.model import IGNORE, Selection, VilaHD

#: Token ids of the random LLM: 0..3 are special (3 is <image>), 10 stands for the newline.
IMAGE_TOKEN_ID, NEWLINE_TOKEN_ID, FIRST_TEXT_ID = 3, 10, 4
#: The training defaults of `jobs/vila_hd_1.5k.yaml` and `jobs/vila_hd_4k.yaml`: appendix C
#: selects 10240 high-res patches per image at training in both.
DEFAULTS = {"1.5k": ("ps3-1.5k-siglip", Selection(num_token_look_close=10240)),
            "4k": ("ps3-4k-siglip", Selection(num_token_look_close=10240))}


@dataclass(kw_only=True, frozen=True)
class Setup:
    """What one device's run measures with."""

    low: str
    """3-scale PS3 preset (the 1.5K side)."""
    high: str
    """4-scale PS3 preset (the 4K side)."""
    llm: dict
    """Qwen2Config sizes of the random LLM."""
    batch: int
    """Conversations per step, one image each."""
    text_tokens: int
    """Text tokens per conversation (the <image> placeholder included)."""
    prompt_tokens: int
    """Tokens up to the end of the first question: what pass 1 reads besides the image."""
    dtype: torch.dtype
    """Parameter dtype of the whole model."""
    warmup: int
    """Untimed steps per configuration before timing."""


CPU = Setup(low="ps3-tiny", high="ps3-tiny-4s", batch=2, text_tokens=384, prompt_tokens=48, dtype=torch.float32,
            warmup=1, llm={"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 512})
# Qwen2-7B's widths (VILA-HD's LLM family); random weights cost the same as trained ones.
CUDA = Setup(low="ps3-1.5k-siglip", high="ps3-4k-siglip", batch=1, text_tokens=384, prompt_tokens=48,
             dtype=torch.bfloat16, warmup=2,
             llm={"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                  "intermediate_size": 18944, "vocab_size": 152064})


# ---- tokens per image at the defaults: presets only ------------------------------------
def encoded_patches(enc, selection: Selection) -> int:
    """High-res patches the looks really encode: each look takes at most the free cells."""
    cells = [g * g for g in enc.preset.grids[1:]]
    used = [0] * len(cells)
    for n_tokens in count_looks(enc, selection.num_look_close, selection.num_token_look_close,
                                sum(selection.budgets(enc))):
        counts = look_budgets(selection.budgets(enc), [c - u for c, u in zip(cells, used)], n_tokens)
        used = [u + c for u, c in zip(used, counts)]
    return sum(used)


def bench_tokens() -> dict:
    """`image_tokens` at the 1.5K and 4K defaults (it reads only `enc.preset`), and the
    patches the looks encode there, as a cross-check of its high-res part."""
    result = {}
    for key, (preset, selection) in DEFAULTS.items():
        enc = SimpleNamespace(preset=get_preset(preset))
        result[f"tokens_per_image_{key}"] = selection.image_tokens(enc)
        result[f"patches_{key}"] = encoded_patches(enc, selection)
    return result


# ---- step timing --------------------------------------------------------------------------
def make_llm(setup: Setup, device: torch.device):
    """A random Qwen2 causal LM (the class VILA-HD loads), built on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**setup.llm, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with device:
        return Qwen2ForCausalLM(config).to(setup.dtype)


def make_model(preset: str, llm, setup: Setup, device: torch.device) -> VilaHD:
    torch.manual_seed(0)
    with device:
        model = VilaHD(PS3VisionEncoder(get_preset(preset)), llm, image_token_id=IMAGE_TOKEN_ID,
                       newline_token_id=NEWLINE_TOKEN_ID)
    return model.to(setup.dtype).train()


def make_batch(setup: Setup, image_size: int, device: torch.device) -> dict:
    """`batch` conversations `[header | <image> | question | answer]`, the answer labelled,
    with one random image each at the preset's top scale (what the loader hands over)."""
    g = torch.Generator().manual_seed(0)
    b, n = setup.batch, setup.text_tokens
    ids = torch.randint(FIRST_TEXT_ID, setup.llm["vocab_size"], (b, n), generator=g)
    ids[:, 8] = IMAGE_TOKEN_ID  # after a short system/user header
    labels = ids.clone()
    labels[:, : setup.prompt_tokens] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "prompt_end": torch.full((b,), setup.prompt_tokens - 1),
             "images": torch.randint(0, 256, (b, 3, image_size, image_size), dtype=torch.uint8, generator=g),
             "image_sizes": torch.full((b, 2), image_size)}
    return {k: v.to(device) for k, v in batch.items()}


def step_fn(model: VilaHD, batch: dict, selection: Selection, device: torch.device) -> Callable[[], dict]:
    """One timed training step: forward (one or two LLM passes) + backward of the LM loss."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> dict:
        model.zero_grad(set_to_none=True)
        sync()
        started = time.perf_counter()
        out = model(batch, selection)
        out.lm_loss.backward()
        sync()
        return {"s": time.perf_counter() - started, "image_tokens": out.image_tokens,
                "sequence": int(out.logits.shape[1])}

    return step


def time_interleaved(steps: dict[str, Callable[[], dict]], warmup: int, repeats: int) -> dict[str, list[dict]]:
    """Every step `warmup` times untimed, then `repeats` rounds of one run each, the order
    rotating every round so no configuration always runs first (or right after another)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(steps[name]())
    return runs


def median_ratio(a: list[dict], b: list[dict]) -> float:
    """Median over rounds of a's step time / b's in the same round."""
    return statistics.median(x["s"] / y["s"] for x, y in zip(a, b))


def bench_steps(setup: Setup, device: torch.device, repeats: int) -> tuple[dict, list[tuple]]:
    """The three configurations, timed together; the ratios and one table row each."""
    llm = make_llm(setup, device)
    low, high = make_model(setup.low, llm, setup, device), make_model(setup.high, llm, setup, device)
    budget = low.vision_tower.preset.max_highres_tokens  # the 3-scale preset's every patch
    configs = {  # name: (model, mode)
        f"{setup.low}, two passes": (low, "after_prompt"),
        f"{setup.low}, one pass": (low, "after_image"),
        f"{setup.high}, two passes": (high, "after_prompt"),
    }
    steps = {name: step_fn(model, make_batch(setup, model.vision_tower.preset.scales[-1], device),
                           Selection(mode=mode, num_token_look_close=budget), device)
             for name, (model, mode) in configs.items()}
    runs = time_interleaved(steps, setup.warmup, repeats)
    two, one, high_two = (runs[name] for name in configs)
    result = {"two_pass_overhead": round(median_ratio(two, one), 3),
              "step_time_ratio_4k_vs_1.5k": round(median_ratio(high_two, two), 3),
              "selected_patches": budget}
    rows = []
    for name, key in zip(configs, ("two_pass", "one_pass", "4k_two_pass")):
        times = [r["s"] for r in runs[name]]
        result[f"step_ms_{key}"] = round(1000 * statistics.median(times), 1)
        rows.append((name, f"{result[f'step_ms_{key}']:.1f}", f"{1000 * min(times):.1f}",
                     str(runs[name][-1]["image_tokens"]), str(runs[name][-1]["sequence"])))
    return result, rows


# ---- report -------------------------------------------------------------------------------
def print_tables(setup: Setup, result: dict, rows: list[tuple]) -> None:
    from rich.console import Console
    from rich.table import Table

    llm = setup.llm
    where = f"cpu, {result['threads']} thread(s)" if result["device"] == "cpu" else result["device"]
    config = Table(title=f"VILA-HD step benchmark ({where}; {result['repeats']} interleaved rounds after "
                         f"{setup.warmup} warm-up)")
    config.add_column("setting")
    config.add_column("value", justify="right")
    llm_text = (f"hidden {llm['hidden_size']}, {llm['num_hidden_layers']} layers, "
                f"{llm['num_attention_heads']}/{llm['num_key_value_heads']} q/kv heads, MLP {llm['intermediate_size']}, "
                f"vocab {llm['vocab_size']}, {str(setup.dtype).removeprefix('torch.')}")
    text = f"{setup.batch} x {setup.text_tokens}, first question ends at {setup.prompt_tokens}, the rest labelled"
    settings = [
        ("PS3 presets (1.5K / 4K side)", f"{setup.low} / {setup.high}"),
        ("LLM (random Qwen2)", llm_text),
        ("conversations x text tokens", text),
        ("selected patches per image", f"{result['selected_patches']} (every patch of {setup.low})"),
        ("1.5K default, NUM_TOKEN_LOOK_CLOSE=10240", f"{result['tokens_per_image_1.5k']} tokens, {result['patches_1.5k']} patches"),
        ("4K default, NUM_TOKEN_LOOK_CLOSE=10240", f"{result['tokens_per_image_4k']} tokens, {result['patches_4k']} patches"),
        ("two_pass_overhead (two passes / one)", f"{result['two_pass_overhead']:.3f}"),
        ("step_time_ratio_4k_vs_1.5k (goal <= 1.3)", f"{result['step_time_ratio_4k_vs_1.5k']:.3f}"),
    ]
    for key, value in settings:
        config.add_row(key, value)
    steps = Table(title="training step (forward + backward of the LM loss)")
    for column in ("configuration", "median ms", "min ms", "image tokens", "sequence"):
        steps.add_column(column, justify="left" if column == "configuration" else "right")
    for row in rows:
        steps.add_row(*row)
    console = Console()
    console.print(config)
    console.print(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, under a minute on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 quick, 15 otherwise)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the real 1.5K/4K presets and a 7B-width LLM in bf16")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.device == "cpu":
        torch.set_num_threads(1)
    setup = CUDA if args.device == "cuda" else CPU
    repeats = args.repeats or (5 if args.quick else 15)
    result = bench_tokens()
    figures, rows = bench_steps(setup, torch.device(args.device), repeats)
    result.update(figures)
    result.update(device=args.device, threads=torch.get_num_threads() if args.device == "cpu" else None,
                  repeats=repeats, presets=[setup.low, setup.high], llm=setup.llm, batch=setup.batch,
                  text_tokens=setup.text_tokens, prompt_tokens=setup.prompt_tokens)
    print_tables(setup, result, rows)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
