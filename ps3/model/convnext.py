"""Light-weight ConvNeXt branch that gives the selection stage a high-res view.

Low-res ViT features alone cannot locate fine detail, so PS3 adds a tiny ConvNeXt (stem +
a few blocks + 1x1 projection) run on a 1512-pixel view; its cosine score with the prompt
is max-pooled down to the low-res grid and averaged with the ViT score (paper §2.2).
Parameter names follow the released layout (``stem.0``, ``stem.1``, ``blocks.i.{weight,
conv_dw, norm, mlp.fc1, mlp.fc2}``, ``out_proj``); the layer scale is called ``weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ps3.model.layers import Mlp

__all__ = ["LayerNorm2d", "ConvNeXtBlock", "SelectionConvNet"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, channels-last LayerNorm, 4x MLP, layer scale, residual."""

    def __init__(self, dim: int, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.full((dim,), ls_init))  # layer scale ("gamma")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)  # [B, C, H, W]
        return x + y * self.weight.reshape(1, -1, 1, 1)


class SelectionConvNet(nn.Module):
    """Patchify stem (kernel = stride) + ConvNeXt blocks + 1x1 output projection."""

    def __init__(self, hidden: int, out: int, depth: int, kernel: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, hidden, kernel_size=kernel, stride=kernel), LayerNorm2d(hidden, eps=1e-6))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(hidden) for _ in range(depth)))
        self.out_proj = nn.Conv2d(hidden, out, kernel_size=1)

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        """[B, 3, Ssel, Ssel] -> [B, out, Ssel/kernel, Ssel/kernel]."""
        return self.out_proj(self.blocks(self.stem(view)))
