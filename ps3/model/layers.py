"""Transformer building blocks shared by the trunk: MLP, attention with a K/V prefix, block, MAP head.

Parameter names follow the released PS3 checkpoint layout (timm ViT names: ``attn.qkv``,
``attn.proj``, ``mlp.fc1``...), so weights load and export without renaming. Each block is
its own ``nn.Module`` so FSDP2 ``fully_shard`` and activation checkpointing can wrap it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Mlp", "KVAttention", "Block", "AttentionPool", "checkpoints_block"]


def checkpoints_block(index: int, every: int) -> bool:
    """Whether block ``index`` (0-based) of a trunk recomputes its activations in backward when
    every ``every``-th block does: 1 is all of them, 2 every other one.

    Blocks 1, 3, 5, ... for ``every=2``, counting as torchtitan's selective per-layer
    checkpointing does, so block 0 (whose input is the cheap embedding) keeps its activations.
    """
    return (index + 1) % every == 0


class Mlp(nn.Module):
    """Two-layer MLP with GELU and an optional LayerNorm on the hidden features."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, *, approximate: str = "none",
                 norm_eps: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        # The selection projection and prompt heads carry a LayerNorm between the layers.
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out if out is not None else dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class KVAttention(nn.Module):
    """Multi-head self-attention that can also attend over a prefix of cached keys/values.

    PS3's high-res tokens attend over ``[low-res K/V of the same layer ; own K/V]``; the
    low-res pass returns its K/V so the high-res pass can reuse them (no recomputation, and
    the cache stays in the graph so the low-res blocks get gradients through it).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Return the output [B, N, D] and this call's own (k, v), each [B, H, N, hd]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, hd]
        # Own K/V leave the block (low-res cache): contiguous copies, not views of qkv, so
        # FSDP2's output hooks stay valid and SDPA gets dense keys.
        k, v = k.contiguous(), v.contiguous()
        keys, values = k, v
        if prefix_kv is not None:
            pk, pv = prefix_kv  # [B, H, N0, hd]
            keys, values = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)  # [B, H, N, hd]
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj(out), (k, v)


class Block(nn.Module):
    """Pre-norm ViT block (attention + MLP) whose attention accepts a K/V prefix."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, eps: float, approximate: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = KVAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, approximate=approximate)

    def forward(self, x: torch.Tensor, prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (block output [B, N, D], k, v) with k, v [B, H, N, hd] of this call's tokens.

        K/V are separate positional tensors (not a tuple) so that
        ``torch.utils.checkpoint`` and FSDP hooks see plain tensor arguments.
        """
        prefix = (prefix_k, prefix_v) if prefix_k is not None else None
        attn_out, (k, v) = self.attn(self.norm1(x), prefix)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, k, v


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP) with one learned latent query and an optional token mask.

    The mask restricts pooling to in-box tokens during pre-training; a sample whose mask is
    all False pools over every token instead (an empty box must not produce NaNs).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, eps: float, approximate: str) -> None:
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, approximate=approximate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool x [B, N, D] (mask [B, N] bool, True = pool this token) to [B, D]."""
        b, n, d = x.shape
        hd = d // self.heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.heads, hd).transpose(1, 2)  # [B, H, 1, hd]
        k, v = self.kv(x).reshape(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
        attn_mask = None
        if mask is not None:
            mask = mask.bool()
            mask = mask | ~mask.any(dim=1, keepdim=True)  # empty rows pool everything (not in place)
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, 1, hd]
        out = self.proj(out.transpose(1, 2).reshape(b, 1, d))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]
