"""Where PS3 looks, as pictures: the image, its caption, and the top-down and bottom-up
selection maps side by side, with the cells each would select outlined.

Recall is one number per scene; a picture shows whether the prompt moved the selection to
the sign the caption names or left it on whatever is salient (PS3 paper, figure 5). Drawn at
the top high-res scale, with the budget the recall uses: as many cells as the box covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PANEL = 384  # pixels per side of each panel
TRUTH, PICKED = (0, 200, 0), (255, 200, 0)


def to_pil(view: torch.Tensor) -> Image.Image:
    """A normalised [3, S, S] view (mean 0.5, std 0.5) back to an RGB image."""
    pixels = ((view.float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _panel(image: Image.Image, probs: torch.Tensor, truth: torch.Tensor, title: str) -> Image.Image:
    """The image under a heat map of `probs` [G, G], truth cells outlined green and the
    top-k cells (k = truth cells) outlined amber."""
    grid = probs.shape[-1]
    heat = probs.float().cpu()
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    red = Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize((PANEL, PANEL), Image.NEAREST)
    base = image.resize((PANEL, PANEL)).convert("RGB")
    tint = Image.merge("RGB", (red, Image.new("L", red.size, 0), Image.new("L", red.size, 0)))
    panel = Image.blend(base, tint, 0.35)
    draw = ImageDraw.Draw(panel)
    cell = PANEL / grid
    k = int(truth.sum())
    picked = set(probs.flatten().topk(k).indices.tolist()) if k else set()
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
        if truth.flatten()[index]:
            draw.rectangle(box, outline=TRUTH, width=2)
        if index in picked:  # inset, so both outlines show on a cell that is both
            x0, y0, x1, y1 = box
            draw.rectangle((x0 + 2, y0 + 2, x1 - 2, y1 - 2), outline=PICKED, width=2)
    draw.text((4, 4), title, fill=(255, 255, 255))
    return panel


def draw_selection_maps(view: torch.Tensor, caption: str, topdown: torch.Tensor, bottomup: torch.Tensor,
                        truth: torch.Tensor, path: Path) -> None:
    """One PNG: the caption over [top-down | bottom-up] panels of the same image."""
    image = to_pil(view)
    recall = {}
    for name, probs in (("top-down", topdown), ("bottom-up", bottomup)):
        k = int(truth.sum())
        picked = probs.flatten().topk(k).indices if k else torch.zeros(0, dtype=torch.long)
        recall[name] = float(truth.flatten()[picked].float().mean()) if k else float("nan")
    panels = [_panel(image, p, truth, f"{name}: recall {recall[name]:.2f}")
              for name, p in (("top-down", topdown), ("bottom-up", bottomup))]
    canvas = Image.new("RGB", (2 * PANEL, PANEL + 24), (255, 255, 255))
    ImageDraw.Draw(canvas).text((4, 6), f"caption: {caption}   (green: the caption's box; amber: selected)",
                                fill=(0, 0, 0))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * PANEL, 24))
    canvas.save(path, "PNG")
