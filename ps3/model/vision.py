"""PS3 vision encoder: low-res pass, patch selection, high-res pass over selected patches.

Stage 1 encodes the low-res view and keeps every block's K/V. Stage 2 scores cells by
cosine between a prompt and (projected ViT features + ConvNeXt features). Stage 3 embeds
only the top-k cells of each high-res scale (scale-aware positional embeddings) and runs
them through the same blocks, each attending over [low-res K/V of that layer ; own K/V].

Module and parameter names follow the released ``vision_model.*`` layout. Orchestration
of the pre-training forward and multi-look inference lives in ``ps3.model.forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ps3.model.convnext import SelectionConvNet
from ps3.model.errors import PS3InputError
from ps3.model.layers import Mlp
from ps3.model.presets import PS3Preset
from ps3.model.selection import logits_to_probs, prompt_logits
from ps3.model.trunk import VisionTrunk, resample_pos_table

__all__ = ["LowRes", "SelectionFeatures", "PS3VisionEncoder", "resize_square"]


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Squash-resize [B, 3, H, W] to [B, 3, size, size]: bicubic, no antialias, in fp32.

    Non-square images are squashed (aspect ratio not kept), like the released image
    processor and training transform; this differs from the released encoder's own
    aspect-preserving path, which only matters for inputs that skip the processor.
    """
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return out.to(image.dtype)


@dataclass
class LowRes:
    """Stage-1 results kept for stages 2 and 3."""

    pooled: torch.Tensor  # [B, D] MAP output over the low-res tokens
    tokens: torch.Tensor  # [B, N0, D] last block output (before the final norm)
    hidden: dict[int, torch.Tensor]  # selected block outputs, each [B, N0, D]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block (k, v), each [B, H, N0, hd]


@dataclass
class SelectionFeatures:
    """Prompt-independent stage-2 features, computed once and scored against many prompts."""

    lowres: torch.Tensor  # [B, S', D, G0, G0] projected ViT features, one map per head
    conv: torch.Tensor  # [B, C, Gc, Gc] ConvNeXt branch output


class PS3VisionEncoder(nn.Module):
    """The three-stage PS3 vision tower (parameters only plus per-stage methods)."""

    def __init__(self, preset: PS3Preset) -> None:
        super().__init__()
        p = preset
        self.preset = p
        n_hr, d, n_sel = p.num_highres_scales, p.width, len(p.select_layers)
        self.trunk = VisionTrunk(p)
        # The released projection MLP uses torch's default LayerNorm eps (1e-5).
        self.selection_feature_proj = Mlp(n_sel * d, n_sel * d, d * n_hr, approximate=p.gelu_approximate, norm_eps=1e-5)
        self.prior_prompt = nn.Parameter(torch.randn(d))
        self.pos_emb_residual = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, g * g, d)) for g in p.grids[1:]] if p.separate_pos_emb else []
        )
        self.highres_selection_feature_module = SelectionConvNet(p.sel_hidden_dim, p.sel_out_dim, p.sel_depth, p.sel_kernel_size)
        self.prompt_proj_for_highres = nn.Linear(d, p.sel_out_dim * n_hr)

    def set_grad_checkpointing(self, enable: bool = True, *, every: int = 1) -> None:
        """Recompute every ``every``-th trunk block in backward (non-reentrant checkpointing)."""
        self.trunk.grad_checkpointing, self.trunk.checkpoint_every = enable, every

    # ---- stage 1 -------------------------------------------------------------------
    def encode_lowres(self, lowres: torch.Tensor) -> LowRes:
        """Low-res view [B, 3, S0, S0] -> pooled feature, tokens, selected hidden states, K/V."""
        s0 = self.preset.scales[0]
        if lowres.dim() != 4 or lowres.shape[1:] != (3, s0, s0):
            raise PS3InputError(f"lowres must be [B, 3, {s0}, {s0}] for preset {self.preset.name}, got {list(lowres.shape)}")
        x = self.trunk.embed_image(lowres)  # [B, N0, D]
        out = self.trunk.run_blocks(x, keep=tuple(self.preset.select_layers), return_kv=True)
        return LowRes(self.trunk.pool(out.tokens), out.tokens, out.hidden, out.kv)

    # ---- stage 2 -------------------------------------------------------------------
    def selection_features(self, low: LowRes, selection_view: torch.Tensor) -> SelectionFeatures:
        """Project the concatenated selection layers and run the ConvNeXt branch."""
        p = self.preset
        ssel = p.selection_view_size
        if selection_view.dim() != 4 or selection_view.shape[1:] != (3, ssel, ssel):
            raise PS3InputError(f"selection_view must be [B, 3, {ssel}, {ssel}] for preset {p.name}, got {list(selection_view.shape)}")
        b, g0, d = low.tokens.shape[0], p.grids[0], p.width
        feat = torch.cat([low.hidden[i] for i in p.select_layers], dim=-1)  # [B, N0, L*D]
        feat = self.selection_feature_proj(feat)  # [B, N0, S'*D]
        feat = feat.reshape(b, g0, g0, p.num_highres_scales, d).permute(0, 3, 4, 1, 2)  # [B, S', D, G0, G0]
        conv = self.highres_selection_feature_module(selection_view.to(feat.dtype))  # [B, C, Gc, Gc]
        return SelectionFeatures(feat, conv)

    def check_prompt(self, prompt: torch.Tensor, batch: int) -> None:
        """A prompt must be [B, width]; anything else is a clear error, not a broadcast."""
        if prompt.dim() != 2 or prompt.shape != (batch, self.preset.width):
            raise PS3InputError(
                f"prompt must be [B={batch}, {self.preset.width}] (the vision width of preset {self.preset.name}), got {list(prompt.shape)}"
            )

    def selection_probs(self, feats: SelectionFeatures, prompt: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-scale probabilities [B, G_s, G_s]: top-down for a prompt, bottom-up (prior) for None."""
        b = feats.lowres.shape[0]
        if prompt is None:
            prompt = self.prior_prompt[None].expand(b, -1)
        else:
            self.check_prompt(prompt, b)
        n_hr = self.preset.num_highres_scales
        hr_prompt = self.prompt_proj_for_highres(prompt).reshape(b, n_hr, -1)  # [B, S', C]
        logits = prompt_logits(feats.lowres, prompt, feats.conv, hr_prompt)  # [B, S', G0, G0]
        return logits_to_probs(logits, self.preset.grids[1:], self.preset.share_first_selection_head)

    # ---- stage 3 -------------------------------------------------------------------
    def embed_selected(self, patches: list[torch.Tensor], index: list[torch.Tensor]) -> torch.Tensor:
        """Embed selected patches of every high-res scale with scale-aware positions.

        patches: per scale [B, K_s, 3, p, p]; index: per scale long [B, K_s] (row-major
        cells of that scale's grid). Position = shared base table resampled to the scale's
        grid + that scale's learned residual, both gathered at the cells. -> [B, sum K_s, D]
        """
        parts = []
        for s, (patch, idx) in enumerate(zip(patches, index)):
            tok = self.trunk.patch_embed.embed_patches(patch)  # [B, K_s, D]
            grid = self.preset.grids[s + 1]
            pos = resample_pos_table(self.trunk.pos_embed, grid)[0][idx]  # [B, K_s, D]
            if len(self.pos_emb_residual):
                pos = pos + self.pos_emb_residual[s][0][idx]
            parts.append(tok + pos.to(tok.dtype))
        return torch.cat(parts, dim=1)

    def encode_highres(self, tokens: torch.Tensor, low: LowRes) -> torch.Tensor:
        """Run high-res tokens [B, K, D] through the blocks with the low-res K/V prefix."""
        return self.trunk.run_blocks(tokens, prefix=low.kv).tokens  # [B, K, D]
