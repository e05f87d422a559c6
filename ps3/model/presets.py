"""PS3 architecture presets: one typed record per model, a registry users name in specs.

The numbers of the released checkpoints (SigLIP-SO400M trunk, scales, selection layers,
budgets, ConvNeXt branch) come from the paper and the digest of the released code
(`shared/reference/ps3_reference.md` §1.1). Tiny presets run the same code path on CPU.

The data pipeline reads only plain numbers from a preset (``scales``, ``patch_size``,
``budgets``, ``selection_view_size``, ``text_context_length``) so ``ps3.data`` never has to
import this package; the pre-training task passes them across.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "PS3Preset",
    "PresetError",
    "UnknownPresetError",
    "scale_budgets",
    "get_preset",
    "list_presets",
    "register_preset",
]

GeluApprox = Literal["none", "tanh"]


class PresetError(ValueError):
    """A preset field is out of range or inconsistent with another field."""


class UnknownPresetError(KeyError):
    """A preset name (or an override field name) that the registry does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0])


def scale_budgets(scales: tuple[int, ...], max_select_num: int) -> tuple[int, ...]:
    """Per-high-res-scale token budgets, proportional to each scale's pixel count.

    Same rule as the released code: ``int(total * s_i^2 / sum_j s_j^2)`` for each high-res
    scale, rounding remainder added to the last scale, so that every scale covers the same
    image area ([512, 2048] for 1.5K, [85, 341, 2134] for 4K at 2560).
    """
    pixels = [s * s for s in scales[1:]]
    budgets = [int(max_select_num * p / sum(pixels)) for p in pixels]
    budgets[-1] += max_select_num - sum(budgets)
    return tuple(budgets)


@dataclass(kw_only=True, frozen=True)
class PS3Preset:
    """Everything that fixes the shapes of a PS3 model (vision + text towers)."""

    name: str
    """Registry name; free text for presets built from a checkpoint."""
    # --- vision trunk (SigLIP ViT, no class token, MAP head) ---
    patch_size: int = 14
    """Side of a square patch in pixels, the same on every scale."""
    width: int = 1152
    """Vision transformer width (also the pooled image feature width)."""
    depth: int = 27
    """Number of vision transformer blocks."""
    heads: int = 16
    """Attention heads of the vision blocks and of the MAP head."""
    mlp_dim: int = 4304
    """Hidden width of the vision MLPs (SO400M: round(1152 * 3.7362))."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon of the trunk and text tower (SigLIP uses 1e-6)."""
    gelu_approximate: GeluApprox = "none"
    """GELU flavour of the vision tower: timm SigLIP uses exact, HF SigLIP uses tanh."""
    # --- PS3 multi-scale selection ---
    scales: tuple[int, ...] = (378, 756, 1512)
    """Square image sizes; the first is the low-res pass, the rest are high-res scales."""
    selection_view_size: int = 1512
    """Size of the square view the light-weight ConvNeXt selection branch sees."""
    max_select_num: int = 2560
    """High-res tokens per look, split across scales by ``budgets``."""
    select_layers: tuple[int, ...] = (0, 9, 18, 26)
    """Block outputs (0-based) concatenated to compute selection features."""
    separate_pos_emb: bool = True
    """Add a learned per-scale residual to the shared, resampled positional table."""
    share_first_selection_head: bool = True
    """Use selection head 0 for every scale, as the released checkpoints do."""
    sel_hidden_dim: int = 512
    """ConvNeXt selection branch width."""
    sel_out_dim: int = 512
    """ConvNeXt selection branch output width (the high-res prompt width)."""
    sel_depth: int = 3
    """Number of ConvNeXt blocks in the selection branch."""
    sel_kernel_size: int = 28
    """Stem patchify kernel of the ConvNeXt branch (1512 / 28 = 54 = 2 x low-res grid)."""
    # --- text tower (SigLIP text transformer, last-token pooling) ---
    text_vocab_size: int = 32000
    """Token vocabulary size; must cover the tokenizer's ids."""
    text_context_length: int = 64
    """Tokens per caption after padding / truncation."""
    text_width: int = 1152
    """Text transformer width."""
    text_depth: int = 27
    """Number of text transformer blocks."""
    text_heads: int = 16
    """Text attention heads."""
    text_mlp_dim: int = 4304
    """Hidden width of the text MLPs."""
    text_gelu_approximate: GeluApprox = "none"
    """GELU flavour of the text tower (SigLIP2 uses tanh)."""
    embed_dim: int = 1152
    """Shared image/text embedding width; equals ``width`` (the trunk has no projection)."""
    init_logit_scale: float = 2.302585092994046
    """Initial log temperature of the sigmoid loss (log 10)."""
    init_logit_bias: float = -10.0
    """Initial bias of the sigmoid loss."""
    tags: tuple[str, ...] = field(default=())
    """Free labels (e.g. "tiny") shown by ``list_presets``."""

    def __post_init__(self) -> None:
        _check_preset(self)

    @property
    def budgets(self) -> tuple[int, ...]:
        """Per-high-res-scale token budgets of one look (sum = ``max_select_num``)."""
        return scale_budgets(self.scales, self.max_select_num)

    @property
    def grids(self) -> tuple[int, ...]:
        """Patch-grid side of every scale (low-res first)."""
        return tuple(s // self.patch_size for s in self.scales)

    @property
    def num_highres_scales(self) -> int:
        """Number of high-res scales (all scales but the first)."""
        return len(self.scales) - 1

    @property
    def max_highres_tokens(self) -> int:
        """Patches over all high-res scales; bounds the number of looks."""
        return sum(g * g for g in self.grids[1:])

    def replace(self, **overrides: Any) -> PS3Preset:
        """A copy with fields replaced by name; unknown names raise with suggestions."""
        names = [f.name for f in dataclasses.fields(self)]
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise UnknownPresetError(f"unknown preset field {key!r}.{hint} Valid fields: {', '.join(names)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return dataclasses.replace(self, **fixed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check_preset(p: PS3Preset) -> None:
    """Cross-field checks, raised at construction so a bad override fails early."""
    if len(p.scales) < 2 or list(p.scales) != sorted(set(p.scales)):
        raise PresetError(f"preset {p.name}: scales must be >= 2 strictly increasing sizes, got {p.scales}")
    bad = [s for s in p.scales if s % p.patch_size]
    if bad:
        raise PresetError(f"preset {p.name}: scales {bad} are not multiples of patch_size={p.patch_size}")
    if p.width % p.heads or p.text_width % p.text_heads:
        raise PresetError(f"preset {p.name}: width must divide by heads (vision {p.width}/{p.heads}, text {p.text_width}/{p.text_heads})")
    if not p.select_layers or max(p.select_layers) >= p.depth or min(p.select_layers) < 0:
        raise PresetError(f"preset {p.name}: select_layers {p.select_layers} must index blocks 0..{p.depth - 1}")
    if p.embed_dim != p.width:
        raise PresetError(f"preset {p.name}: embed_dim ({p.embed_dim}) must equal width ({p.width}); the trunk has no output projection")
    if p.selection_view_size % p.sel_kernel_size:
        raise PresetError(f"preset {p.name}: selection_view_size {p.selection_view_size} is not a multiple of sel_kernel_size {p.sel_kernel_size}")
    if p.selection_view_size // p.sel_kernel_size < p.grids[0]:
        raise PresetError(f"preset {p.name}: the selection branch grid must be at least the low-res grid {p.grids[0]}")
    if p.max_select_num < p.num_highres_scales or p.max_select_num > p.max_highres_tokens:
        raise PresetError(f"preset {p.name}: max_select_num {p.max_select_num} must lie in [{p.num_highres_scales}, {p.max_highres_tokens}]")


_SO400M = dict(patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304, select_layers=(0, 9, 18, 26))

# Tiny presets: patch 8, low-res 64 (8x8 grid), high-res 128/256(/512). Small text drawn in
# a 256-pixel synthetic image (strokes of 1-2 px) survives at the top scale but averages out
# to a blur at 64, so the test data only separates when the high-res pass does its job.
# The selection branch's 8 px stem on the 256 view keeps its cells smaller than a synthetic
# sign (11 px there), as the released 28 px stem on 1512 is smaller than a 68 px one. With a
# 16 px stem a sign's colour filled a tenth of a cell and selection recall was 0.10, not
# 0.14 (192 held-out scenes, two seeds; docs/benchmarks.md).
_TINY = dict(
    patch_size=8, width=64, depth=4, heads=4, mlp_dim=128, select_layers=(0, 1, 2, 3),
    selection_view_size=256, sel_kernel_size=8, sel_hidden_dim=32, sel_out_dim=32, sel_depth=1,
    text_vocab_size=1000, text_context_length=16, text_width=64, text_depth=2, text_heads=4,
    text_mlp_dim=128, embed_dim=64, tags=("tiny",),
)

_REGISTRY: dict[str, PS3Preset] = {}


def register_preset(preset: PS3Preset) -> PS3Preset:
    """Add a preset under its name (names are unique)."""
    if preset.name in _REGISTRY:
        raise PresetError(f"preset {preset.name!r} is already registered")
    _REGISTRY[preset.name] = preset
    return preset


register_preset(PS3Preset(name="ps3-1.5k-siglip", scales=(378, 756, 1512), **_SO400M))
register_preset(PS3Preset(name="ps3-4k-siglip", scales=(378, 756, 1512, 3780), **_SO400M))
register_preset(PS3Preset(name="ps3-tiny", scales=(64, 128, 256), max_select_num=80, **_TINY))
register_preset(PS3Preset(name="ps3-tiny-4s", scales=(64, 128, 256, 512), max_select_num=160, **_TINY))


def list_presets() -> list[str]:
    """Registered preset names, sorted."""
    return sorted(_REGISTRY)


def get_preset(name: str, **overrides: Any) -> PS3Preset:
    """The named preset with fields overridden by name (e.g. ``depth=2``).

    Raises ``UnknownPresetError`` listing the valid names (with a did-you-mean) for an
    unknown preset or field, and ``PresetError`` when an override breaks a cross-field rule.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPresetError(f"unknown PS3 preset {name!r}.{hint} Valid presets: {', '.join(list_presets())}")
    preset = _REGISTRY[name]
    return preset.replace(**overrides) if overrides else preset
