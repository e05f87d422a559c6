"""The SigLIP ViT trunk PS3 shares between its low-res and high-res passes.

No class token, learned 2-D positional table at the low-res grid, MAP pooling head. The
trunk can embed a whole image or only a set of selected patches (with their positional
embeddings gathered from a resampled table), and can run its blocks with a per-layer K/V
prefix. Parameter names follow the released layout (``patch_embed.proj``, ``pos_embed``,
``blocks.i.*``, ``norm``, ``attn_pool.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ps3.model.layers import AttentionPool, Block, checkpoints_block
from ps3.model.presets import PS3Preset

__all__ = ["PatchEmbed", "VisionTrunk", "resample_pos_table", "gather_patches", "TrunkOutput"]


def resample_pos_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a square [1, G0*G0, D] positional table to [1, grid*grid, D].

    Bicubic with antialias, computed in fp32 (the released code's choice; matters for
    numerical agreement). The table is returned unchanged at its own size.
    """
    n, d = table.shape[1], table.shape[2]
    g0 = round(n ** 0.5)
    if g0 == grid:
        return table
    t = table.float().reshape(1, g0, g0, d).permute(0, 3, 1, 2)  # [1, D, G0, G0]
    t = F.interpolate(t, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(table.dtype)


def gather_patches(image: torch.Tensor, index: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut only the selected patches out of a full image.

    image [B, 3, G*p, G*p], index [B, K] (row-major cells) -> [B, K, 3, p, p]. Uses a view
    and advanced indexing so the whole image is never unfolded into G*G patches.
    """
    b, c, h, w = image.shape
    g = h // patch
    view = image.reshape(b, c, g, patch, w // patch, patch)
    rows, cols = index // (w // patch), index % (w // patch)  # [B, K]
    batch = torch.arange(b, device=image.device)[:, None]  # [B, 1]
    return view[batch, :, rows, :, cols, :]  # [B, K, C, p, p]


class PatchEmbed(nn.Module):
    """Conv patchify; also applies the same weights to already-cut patches."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, G*p, G*p] -> [B, G*G, D] in row-major order."""
        return self.proj(image).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, K, 3, p, p] -> [B, K, D]: the conv as a matmul over only the selected patches."""
        b, k = patches.shape[:2]
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # [D, 3*p*p], (c, y, x) order
        return F.linear(patches.reshape(b, k, weight.shape[1]).to(weight.dtype), weight, self.proj.bias)


class TrunkOutput:
    """What one pass through the blocks leaves behind (plain holder, not a module)."""

    def __init__(self, tokens: torch.Tensor, hidden: dict[int, torch.Tensor], kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.tokens = tokens  # [B, N, D] last block output, before the final norm
        self.hidden = hidden  # block index -> [B, N, D] block outputs that were asked for
        self.kv = kv  # per block (k, v), each [B, H, N, hd]


class VisionTrunk(nn.Module):
    """SigLIP ViT without class token; blocks take an optional per-layer K/V prefix."""

    def __init__(self, preset: PS3Preset) -> None:
        super().__init__()
        p = preset
        self.grad_checkpointing = False
        self.checkpoint_every = 1  # with grad_checkpointing: recompute every N-th block (1: all, 2: every other)
        self.patch_embed = PatchEmbed(p.patch_size, p.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, p.grids[0] ** 2, p.width))
        self.blocks = nn.ModuleList(
            Block(p.width, p.heads, p.mlp_dim, eps=p.ln_eps, approximate=p.gelu_approximate) for _ in range(p.depth)
        )
        self.norm = nn.LayerNorm(p.width, eps=p.ln_eps)
        self.attn_pool = AttentionPool(p.width, p.heads, p.mlp_dim, eps=p.ln_eps, approximate=p.gelu_approximate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT-style init (truncated normal 0.02, zero biases) for training from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """Whole square image [B, 3, S, S] -> tokens with positional embedding [B, (S/p)^2, D]."""
        x = self.patch_embed(image)
        grid = image.shape[-1] // self.patch_embed.patch
        return x + resample_pos_table(self.pos_embed, grid).to(x.dtype)

    def run_blocks(self, x: torch.Tensor, *, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                   keep: tuple[int, ...] = (), return_kv: bool = False) -> TrunkOutput:
        """Run every block; each block i attends over ``prefix[i]`` (if given) plus its own tokens."""
        hidden: dict[int, torch.Tensor] = {}
        kvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, blk in enumerate(self.blocks):
            pk, pv = prefix[i] if prefix is not None else (None, None)
            if self.grad_checkpointing and checkpoints_block(i, self.checkpoint_every) and torch.is_grad_enabled():
                x, k, v = checkpoint(blk, x, pk, pv, use_reentrant=False)
            else:
                x, k, v = blk(x, pk, pv)
            if i in keep:
                hidden[i] = x
            if return_kv:
                kvs.append((k, v))
        return TrunkOutput(x, hidden, kvs)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm then MAP pooling: [B, N, D] (+ mask [B, N]) -> [B, D]."""
        return self.attn_pool(self.norm(tokens), mask)
