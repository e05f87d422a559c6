"""SigLIP text tower with PS3's prompt head.

A pre-norm transformer over a fixed-length caption (no causal and no padding mask, as in
SigLIP), final LayerNorm, pooling of the *last* position, linear projection to the shared
embedding. The prompt head maps the L2-normalised text embedding to a selection prompt
for the vision encoder (top-down selection). Names follow the released ``text_model.*``
layout (OpenCLIP names: ``transformer.resblocks.i.attn.in_proj_weight`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ps3.model.errors import PS3InputError
from ps3.model.layers import Mlp, checkpoints_block
from ps3.model.presets import PS3Preset

__all__ = ["TextTransformer"]


class _TextAttention(nn.Module):
    """Full (unmasked) self-attention with a packed input projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _TextMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class TextBlock(nn.Module):
    """Pre-norm residual block; its own module so FSDP2 and checkpointing can wrap it."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, eps: float, approximate: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _TextAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _TextMlp(dim, mlp_dim, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Resblocks(nn.Module):
    """Holder so parameter names read ``transformer.resblocks.i``."""

    def __init__(self, blocks: list[TextBlock]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)


class TextTransformer(nn.Module):
    """Caption tokens [B, L] -> text embedding [B, E] (not normalised) and selection prompt [B, D]."""

    def __init__(self, preset: PS3Preset) -> None:
        super().__init__()
        p = preset
        self.preset = p
        self.grad_checkpointing = False
        self.checkpoint_every = 1  # with grad_checkpointing: recompute every N-th block (1: all, 2: every other)
        self.token_embedding = nn.Embedding(p.text_vocab_size, p.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(p.text_context_length, p.text_width))
        self.transformer = _Resblocks([
            TextBlock(p.text_width, p.text_heads, p.text_mlp_dim, eps=p.ln_eps, approximate=p.text_gelu_approximate)
            for _ in range(p.text_depth)
        ])
        self.ln_final = nn.LayerNorm(p.text_width, eps=p.ln_eps)
        self.text_projection = nn.Linear(p.text_width, p.embed_dim)
        # Released prompt head: Mlp(E -> D -> D) with a torch-default LayerNorm (eps 1e-5).
        self.prompt_proj = Mlp(p.embed_dim, p.width, p.width, norm_eps=1e-5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        p = self.preset
        if tokens.dim() != 2 or tokens.shape[1] != p.text_context_length:
            raise PS3InputError(f"tokens must be [B, {p.text_context_length}] for preset {p.name}, got {list(tokens.shape)}")
        if tokens.device.type == "meta" or not tokens.numel():  # nothing to read (FLOP counting)
            return
        # One host sync per step; an out-of-range id would otherwise be a device-side assert.
        if (int(tokens.min()) < 0 or int(tokens.max()) >= p.text_vocab_size):
            raise PS3InputError(f"token ids must lie in [0, {p.text_vocab_size}) (text_vocab_size of preset {p.name}), "
                                f"got max {int(tokens.max())}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] long -> [B, E]: embedding of the last position after the final LayerNorm."""
        self._check_tokens(tokens)
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)  # [B, L, W]
        for i, blk in enumerate(self.transformer.resblocks):
            if self.grad_checkpointing and checkpoints_block(i, self.checkpoint_every) and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.ln_final(x)
        return self.text_projection(x[:, -1])

    def prompt(self, text_embedding: torch.Tensor) -> torch.Tensor:
        """Selection prompt [B, D] from a text embedding [B, E] (normalised first)."""
        return self.prompt_proj(F.normalize(text_embedding, dim=-1))
