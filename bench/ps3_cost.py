"""PS3 pre-training cost per image vs resolution, against a plain ViT on the whole image.

For the PS3-4K-SigLIP architecture with max resolution 756 (scales 378/756), 1512
(378/756/1512) and 3780 (378/756/1512/3780), all with the 2560-patch budget, count the
FLOPs of one pre-training forward+backward of the vision tower per image
(``torch.utils.flop_counter`` on the meta device: exact counts, no memory), and the same for
the SigLIP SO400M ViT encoding the whole image at that resolution. The text tower is
identical for both and left out.

Wall time (and, on CUDA, peak memory) is measured side by side too: on CUDA with the real
models (bf16 autocast) where they fit; on CPU with a narrow stand-in (width 128, depth 2,
same scales, patch size and budgets) because the real model takes minutes per step there.

Usage: ``python bench/ps3_cost.py [--quick] [--batch N] [--device cpu|cuda]``. The last
line printed is one JSON object (``ps3_cost_ratio_3780_vs_756``,
``whole_image_flops_ratio_3780`` and the tables).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ps3.model import PS3VisionEncoder, get_preset
from ps3.model.forward import vision_pretrain_forward

RESOLUTIONS = (756, 1512, 3780)
SCALES = {756: (378, 756), 1512: (378, 756, 1512), 3780: (378, 756, 1512, 3780)}
NARROW = dict(width=128, depth=2, heads=2, mlp_dim=512, select_layers=(0, 1), sel_hidden_dim=64, sel_out_dim=64,
              sel_depth=1, embed_dim=128, text_width=128, text_heads=2, text_depth=1, text_mlp_dim=256)


def _preset(res: int, narrow: bool = False):
    overrides = NARROW if narrow else {}
    return get_preset("ps3-4k-siglip").replace(name=f"ps3-{res}", scales=SCALES[res], max_select_num=2560, **overrides)


def _batch(p, b: int, device: str, gathered: bool = False) -> dict:
    """Inputs of one pre-training look: a box covering a fifth of the image, local caption.

    ``gathered`` gives the high-res input as pre-cut patches + cell indices (the loader's
    fast path at 4K) instead of full images per scale; the FLOPs are the same.
    """
    gt = []
    for g in p.grids[1:]:
        m = torch.zeros(b, g, g, device=device)
        m[:, : g // 5, : g // 5] = 1
        gt.append(m)
    data = dict(
        lowres=torch.randn(b, 3, p.scales[0], p.scales[0], device=device),
        selection_view=torch.randn(b, 3, p.selection_view_size, p.selection_view_size, device=device),
        gt_maps=gt, is_global=torch.zeros(b, dtype=torch.bool, device=device),
        prompt=torch.randn(b, p.width, device=device),
    )
    if gathered:
        data["hr_index"] = [torch.arange(k, device=device).expand(b, k) for k in p.budgets]
        data["hr_patches"] = [torch.randn(b, k, 3, p.patch_size, p.patch_size, device=device) for k in p.budgets]
    else:
        data["highres"] = [torch.randn(b, 3, s, s, device=device) for s in p.scales[1:]]
    return data


def ps3_step(enc: PS3VisionEncoder, batch: dict) -> None:
    """Forward + backward of the vision side of one pre-training step (pooled + box-map terms)."""
    out = vision_pretrain_forward(enc, **batch)
    loss = out.pooled.float().sum() + sum(p.float().sum() for p in out.topdown_probs + out.bottomup_probs)
    loss.backward()


def whole_image_step(enc: PS3VisionEncoder, image: torch.Tensor) -> None:
    """Forward + backward of the same ViT encoding every patch of the image (SigLIP at that size)."""
    trunk = enc.trunk
    tokens = trunk.run_blocks(trunk.embed_image(image)).tokens
    trunk.pool(tokens).float().sum().backward()


def count_flops(res: int, batch: int = 1) -> tuple[float, float]:
    """(PS3, whole-image) FLOPs per image of one forward+backward, counted on the meta device."""
    p = _preset(res)
    with torch.device("meta"):
        enc = PS3VisionEncoder(p)
    with FlopCounterMode(display=False) as fc:
        ps3_step(enc, _batch(p, batch, "meta"))
    ps3 = fc.get_total_flops() / batch
    enc.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fc:
        whole_image_step(enc, torch.randn(batch, 3, res, res, device="meta"))
    return ps3, fc.get_total_flops() / batch


def _time(fn, device: str, repeats: int) -> tuple[float, float | None]:
    """Best-of-N seconds of fn() (robust to other jobs on shared cores) and peak CUDA GiB (None on CPU)."""
    fn()  # warm-up
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return min(times), peak


def measure(res: int, device: str, batch: int, quick: bool) -> dict:
    """Step time (and peak memory) of PS3 vs whole image at one resolution."""
    narrow = device == "cpu"
    p = _preset(res, narrow=narrow)
    enc = PS3VisionEncoder(p).to(device)
    data = _batch(p, batch, device, gathered=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    repeats = 3 if quick else 5

    def run(fn, *args):
        with amp:
            fn(enc, *args)
        enc.zero_grad(set_to_none=True)

    row = {"model": "narrow stand-in" if narrow else "PS3-4K vision"}
    row["ps3_s"], row["ps3_peak_gib"] = _time(lambda: run(ps3_step, data), device, repeats)
    fits = res <= (756 if quick else 1512) if narrow else True
    row["whole_s"], row["whole_peak_gib"] = None, None
    if fits:
        image = torch.randn(batch, 3, res, res, device=device)
        try:
            row["whole_s"], row["whole_peak_gib"] = _time(lambda: run(whole_image_step, image), device, repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    return row


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="FLOPs + a short CPU timing (< 1 min on 2 cores)")
    ap.add_argument("--batch", type=int, default=1, help="images per timed step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()

    flops = {res: count_flops(res) for res in RESOLUTIONS}
    print("FLOPs per image, one pre-training forward+backward of the vision tower (2560-patch budget)")
    print(f"{'max res':>8} {'PS3 TFLOP':>10} {'whole-image TFLOP':>18} {'whole / PS3':>12}")
    for res, (ps3, whole) in flops.items():
        print(f"{res:>8} {ps3 / 1e12:>10.3f} {whole / 1e12:>18.3f} {whole / ps3:>12.1f}")

    timing = {res: measure(res, args.device, args.batch, args.quick) for res in RESOLUTIONS}
    print(f"\nBest step time per batch of {args.batch} on {args.device} ({timing[756]['model']}); '-' = not run (too large here)")
    print(f"{'max res':>8} {'PS3 s':>8} {'whole s':>9} {'PS3 GiB':>8} {'whole GiB':>10}")
    for res, r in timing.items():
        print(f"{res:>8} {_fmt(r['ps3_s'], 8, 3)} {_fmt(r['whole_s'], 9, 3)} "
              f"{_fmt(r['ps3_peak_gib'], 8, 2)} {_fmt(r['whole_peak_gib'], 10, 2)}")

    result = {
        "ps3_cost_ratio_3780_vs_756": round(flops[3780][0] / flops[756][0], 4),
        "whole_image_flops_ratio_3780": round(flops[3780][1] / flops[3780][0], 2),
        "whole_image_growth_3780_vs_756": round(flops[3780][1] / flops[756][1], 2),
        "ps3_tflops_per_image": {str(r): round(f[0] / 1e12, 4) for r, f in flops.items()},
        "whole_image_tflops_per_image": {str(r): round(f[1] / 1e12, 4) for r, f in flops.items()},
        "ps3_time_ratio_3780_vs_756": round(timing[3780]["ps3_s"] / timing[756]["ps3_s"], 3),
        "timing_device": args.device, "timing_model": timing[756]["model"], "timing": {str(k): v for k, v in timing.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
