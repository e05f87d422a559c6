"""Per-sample tensors of a PS3 step: scale views, ground-truth maps, selected patches.

Geometry follows the preset: every view is the whole image squash-resized to S x S
(bicubic), a scale's patch grid is (S / p) x (S / p), and a box's ground-truth map marks
every cell the box overlaps. In the pre-gathered form the loader picks each high-res
scale's K cells itself, teacher-forced from the box: all in-box cells first (nearest the
box centre first when there are more than K), then the cells nearest the box centre. That
departs from the released code (which fills the rest by the model's scores) so that only a
window around the box has to be resampled.

Pixels stay uint8, channel-first ([..., 3, H, W]), until they reach the device: they cross
the loader's worker processes through /dev/shm, where float32 would take four times the
room (about 145 GiB per node at the 4K settings; see ps3_platform.compile.shm).
`normalize_pixels` (mean = std = 0.5) runs once there, for every consumer
(`ps3.tasks.common.to_device`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .decode import (
    REDUCING_GAP,
    SELECTION_GAP,
    Decoded,
    Window,
    full_view,
    plain_view,
    region_decoding,
    window_source,
    window_view,
)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ViewConfig:
    """The preset numbers the data side needs (passed as plain values; no model import)."""

    scales: tuple[int, ...]  # first is the low-res scale, e.g. (378, 756, 1512, 3780)
    patch_size: int  # e.g. 14
    budgets: tuple[int, ...]  # patches per high-res scale, e.g. (85, 341, 2134)
    selection_view_size: int  # view of the selection branch, e.g. 1512
    context_length: int  # caption tokens, e.g. 64
    highres: str = "auto"  # "full" (whole views), "patches" (pre-gathered) or "auto"
    full_max: int = 1024  # "auto" gives whole views when the largest scale is at most this
    local_crop: tuple[float, float] | None = None  # low-res only: local pairs see a crop this many box sides wide

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        object.__setattr__(self, "budgets", tuple(int(b) for b in self.budgets))
        if len(self.scales) < 2 or list(self.scales) != sorted(self.scales):
            raise ValueError(f"scales must be ascending with at least two, got {self.scales}")
        if any(s % self.patch_size for s in self.scales):
            raise ValueError(f"every scale must be a multiple of patch_size {self.patch_size}: {self.scales}")
        if len(self.budgets) != len(self.scales) - 1:
            raise ValueError(f"need one budget per high-res scale {self.scales[1:]}, got {self.budgets}")
        for s, k in zip(self.scales[1:], self.budgets):
            if not 0 <= k <= (s // self.patch_size) ** 2:  # 0 happens: budgets split by pixel share
                raise ValueError(f"budget {k} at scale {s} must be in [0, {(s // self.patch_size) ** 2}]")
        if self.highres not in ("auto", "full", "patches"):
            raise ValueError(f"highres must be auto, full or patches, got {self.highres!r}")
        if self.local_crop is not None and not 1.0 <= self.local_crop[0] <= self.local_crop[1]:
            raise ValueError(f"local_crop must be [low, high] with 1 <= low <= high, got {list(self.local_crop)}")

    @property
    def patches(self) -> bool:
        """True when high-res input is pre-gathered patches rather than whole views."""
        return self.highres == "patches" or (self.highres == "auto" and self.scales[-1] > self.full_max)

    def grid(self, scale: int) -> int:
        return scale // self.patch_size

    @property
    def decode_size(self) -> int:
        """Pixels per side the whole-image decode must keep for the views made from it.

        With pre-gathered patches and region decoding, those are only the low-res and
        selection views (the windows get their own decode); otherwise every view.
        """
        if self.local_crop is not None:  # only the low-res view; crops decode their own regions
            return self.scales[0]
        if self.patches and region_decoding():
            return max(self.scales[0], math.ceil(self.selection_view_size * SELECTION_GAP))
        return max(max(self.scales), self.selection_view_size)


class Pixels(Protocol):
    """Where view pixels come from: the fast decoder or the plain method."""

    def full(self, size: int, coarse: bool = False) -> np.ndarray: ...  # uint8 [size, size, 3]
    def windows(self, wanted: Sequence[Window]) -> list[np.ndarray]: ...  # uint8 [h, w, 3] each


class FastPixels:
    """Whole views from one reduced decode `dec`; windows resampled alone from one region
    decode of `data` (the encoded image), or from `dec` when it is fine enough.
    """

    def __init__(self, dec: Decoded, data: bytes, key: str):
        self.dec, self.data, self.key = dec, data, key

    def full(self, size: int, coarse: bool = False) -> np.ndarray:
        return full_view(self.dec, size, SELECTION_GAP if coarse else REDUCING_GAP)

    def windows(self, wanted: Sequence[Window]) -> list[np.ndarray]:
        if not wanted:
            return []
        src = window_source(self.data, self.key, self.dec, wanted)
        return [window_view(src, size, box) for size, box in wanted]


class PlainPixels:
    """Views by full decode + full resize per scale; windows cropped from them."""

    def __init__(self, image):
        self.image, self._views = image, {}

    def full(self, size: int, coarse: bool = False) -> np.ndarray:
        if size not in self._views:
            self._views[size] = plain_view(self.image, size)
        return self._views[size]

    def windows(self, wanted: Sequence[Window]) -> list[np.ndarray]:
        return [self.full(size)[y0:y1, x0:x1] for size, (x0, y0, x1, y1) in wanted]


def channels_first(arr: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> uint8 [..., 3, H, W], the form pixels cross processes in.

    Permuted as uint8, which is cheap; normalising waits for the device (`normalize_pixels`).
    """
    arr = arr if arr.flags.writeable else arr.copy()  # Pillow's arrays are read-only; uint8 copies are cheap
    return torch.from_numpy(arr).movedim(-1, -3).contiguous()


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> x / 127.5 - 1 (mean = std = 0.5) in `dtype`, on the pixels' device.

    Computed in float32 whatever `dtype` is, so a bf16 model sees the float32 values rounded
    once, and the float32 result is exactly what the data workers used to send.
    """
    values = pixels.to(torch.float32).div_(127.5).sub_(1.0)
    return values if dtype == torch.float32 else values.to(dtype)


def box_cells(box: Box, width: int, height: int, scale: int, patch: int) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1), end-exclusive: the cells of scale's grid that the box overlaps."""
    grid = scale // patch
    sx, sy = scale / width / patch, scale / height / patch
    c0, r0 = math.floor(box[0] * sx), math.floor(box[1] * sy)
    c1, r1 = math.ceil(box[2] * sx), math.ceil(box[3] * sy)
    c0, r0 = min(max(c0, 0), grid - 1), min(max(r0, 0), grid - 1)
    return r0, c0, max(min(r1, grid), r0 + 1), max(min(c1, grid), c0 + 1)


def gt_map(cells: tuple[int, int, int, int], grid: int) -> torch.Tensor:
    """float [grid, grid]: 1 on the box's cells."""
    r0, c0, r1, c1 = cells
    m = torch.zeros(grid, grid)
    m[r0:r1, c0:c1] = 1.0
    return m


def select_cells(cells: tuple[int, int, int, int], grid: int, budget: int) -> np.ndarray:
    """Teacher-forced selection: in-box cells first, then nearest the box centre; ascending."""
    r0, c0, r1, c1 = cells
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dist = (rows + 0.5 - (r0 + r1) / 2) ** 2 + (cols + 0.5 - (c0 + c1) / 2) ** 2
    inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    key = dist + np.where(inside, 0.0, 4.0 * grid * grid)  # any inside cell beats any outside
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.argpartition(key, budget - 1)[:budget] if budget < key.size else np.arange(key.size)
    return np.sort(chosen)


def cells_window(scale: int, patch: int, chosen: np.ndarray) -> Window:
    """The bounding window (in scale's view pixels) of the chosen cells; non-empty `chosen`."""
    rows, cols = np.divmod(chosen, scale // patch)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    return scale, (c0 * patch, r0 * patch, c1 * patch, r1 * patch)


def cut_patches(win: np.ndarray, window: Window, patch: int, chosen: np.ndarray) -> torch.Tensor:
    """uint8 [K, 3, p, p]: the chosen cells' pixels out of their bounding window's pixels."""
    scale, (x0, y0, x1, y1) = window
    rows, cols = np.divmod(chosen, scale // patch)
    win = win.reshape((y1 - y0) // patch, patch, (x1 - x0) // patch, patch, 3)  # [nr, p, nc, p, 3]
    return channels_first(win[rows - y0 // patch, :, cols - x0 // patch])  # [K, p, p, 3] -> [K, 3, p, p]


def gather_patches(pixels: Pixels, cfg: ViewConfig, chosen: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Per high-res scale uint8 [K_s, 3, p, p]: the chosen cells' pixels.

    All scales' windows are asked for at once, so the pixels behind them are decoded once.
    """
    p = cfg.patch_size
    windows = [cells_window(s, p, c) for s, c in zip(cfg.scales[1:], chosen) if c.size]
    decoded = iter(zip(windows, pixels.windows(windows)))
    out = []
    for c in chosen:
        if c.size:
            window, win = next(decoded)
            out.append(cut_patches(win, window, p, c))
        else:
            out.append(torch.zeros(0, 3, p, p, dtype=torch.uint8))
    return out


def sample_tensors(pixels: Pixels, width: int, height: int, box: Box | None, cfg: ViewConfig,
                   all_boxes: Sequence[Box] = ()) -> dict:
    """One sample's tensors; `box` None means a global pair (whole image, all-ones maps).

    Returns lowres [3, S0, S0], selection_view [3, Ssel, Ssel], gt_maps [G_s, G_s] per
    high-res scale (the caption's box: top-down target and pooling mask), saliency_maps
    [G_s, G_s] per scale (the union of `all_boxes`, or gt_maps without them: the bottom-up
    target of paper Fig. 5c), and either highres [3, S_s, S_s] or hr_index [K_s] +
    hr_patches [K_s, 3, p, p] per high-res scale. Pixels are uint8 (not yet normalised),
    maps float.
    """
    whole = (0.0, 0.0, float(width), float(height))
    out: dict = {"lowres": channels_first(pixels.full(cfg.scales[0])),
                 "selection_view": channels_first(pixels.full(cfg.selection_view_size, coarse=True)),
                 "gt_maps": [], "saliency_maps": [], "highres": [], "hr_index": [], "hr_patches": []}
    for scale, budget in zip(cfg.scales[1:], cfg.budgets):
        grid = cfg.grid(scale)
        cells = box_cells(box or whole, width, height, scale, cfg.patch_size)
        out["gt_maps"].append(gt_map(cells, grid))
        salient = out["gt_maps"][-1].clone()
        for other in (all_boxes if box is not None else ()):
            salient = salient.maximum(gt_map(box_cells(other, width, height, scale, cfg.patch_size), grid))
        out["saliency_maps"].append(salient)
        if cfg.patches:
            out["hr_index"].append(torch.from_numpy(select_cells(cells, grid, budget).astype(np.int64)))
        else:
            out["highres"].append(channels_first(pixels.full(scale)))
    if cfg.patches:
        out["hr_patches"] = gather_patches(pixels, cfg, [i.numpy() for i in out["hr_index"]])
    return out


def crop_window(width: int, height: int, box: Box, size: int, factor: float) -> Window:
    """A size x size window centred on `box`, `factor` times its longer side wide.

    In view coordinates, as every view: the window is taken from the squash-resized view
    whose size makes the crop exactly `size` pixels, so a crop is squashed like the low-res
    view the model sees at pre-training (a factor too wide for the image gives the whole view).
    """
    share = max((box[2] - box[0]) / width, (box[3] - box[1]) / height, 1e-6)  # box side / view side
    view = max(size, round(size / (factor * share)))
    cx, cy = (box[0] + box[2]) / 2 / width * view, (box[1] + box[3]) / 2 / height * view
    x0 = min(max(round(cx - size / 2), 0), view - size)
    y0 = min(max(round(cy - size / 2), 0), view - size)
    return view, (x0, y0, x0 + size, y0 + size)


def lowres_tensors(pixels: Pixels, width: int, height: int, box: Box | None, cfg: ViewConfig,
                   factor: float = 1.0) -> dict:
    """One sample of low-res contrastive pre-training (SigLIP's step at the base scale).

    lowres [3, S0, S0] uint8: the whole image for a global pair (`box` None), else a crop
    around the box `factor` box sides wide (`crop_window`). Crops are how a low-res encoder
    meets what local captions name at a size it can see, as SigLIP met objects in web photos
    at every scale; in the whole 64 px view of the tiny preset a sign is a few pixels.
    """
    if box is None:
        return {"lowres": channels_first(pixels.full(cfg.scales[0]))}
    window = crop_window(width, height, box, cfg.scales[0], factor)
    return {"lowres": channels_first(pixels.windows([window])[0])}
