"""Vision-to-LLM projection: PS3 tokens on a grid -> LLM tokens, a quarter as many.

Everything that maps vision space into LLM space lives in one module (`mm_projector` in
the exported layout), so a stage that trains "the projector" trains all of it: the
2x2 merge MLP, the top-down prompt head (LLM space back to PS3's prompt space), and the
zero-initialised position and scale embeddings that tell the LLM where a high-res token
came from (a selected token has no neighbours in the sequence to say so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ps3.model.layers import Mlp

PROMPT_HEADS = ("linear", "mlp")


def merge_2x2(grid: torch.Tensor) -> torch.Tensor:
    """[N, G, G, D] -> [N, ceil(G/2)^2, 4D]: each 2x2 neighbourhood side by side in channels.

    Odd grids are zero-padded on the bottom/right, so 27x27 low-res tokens become 14x14.
    """
    n, g, _, d = grid.shape
    if g % 2:
        grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
        g += 1
    h = g // 2
    blocks = grid.reshape(n, h, 2, h, 2, d).permute(0, 1, 3, 2, 4, 5)  # [N, h, h, 2, 2, D]
    return blocks.reshape(n, h * h, 4 * d)


def whole_blocks(selected: torch.Tensor) -> torch.Tensor:
    """bool [N, G, G] selected cells -> bool [N, ceil(G/2)^2]: blocks whose four cells all are.

    A block with an unselected cell would feed the projector zeros for real image content,
    so only whole blocks become LLM tokens (padding cells of an odd grid never count).
    """
    merged = merge_2x2(selected[..., None].float())  # [N, h*h, 4]
    return merged.sum(-1) == 4


class MMProjector(nn.Module):
    """2x2 merge + LayerNorm + 2-layer MLP, the prompt head, and the high-res embeddings.

    `low_grid` is PS3's low-res grid (27 at full size): the position table has one entry per
    low-res cell and is area-resampled to each token grid, so every scale shares one notion of
    where in the image a token is; `num_scales` counts the low-res scale too.
    """

    def __init__(self, vision_width: int, llm_width: int, *, low_grid: int, num_scales: int,
                 prompt_head: str = "linear") -> None:
        super().__init__()
        if prompt_head not in PROMPT_HEADS:
            raise ValueError(f"prompt_head must be one of {PROMPT_HEADS}, got {prompt_head!r}")
        self.low_grid = low_grid
        self.norm = nn.LayerNorm(4 * vision_width)
        self.mlp = Mlp(4 * vision_width, llm_width, llm_width)
        if prompt_head == "linear":
            self.top_down_prompt_head = nn.Linear(llm_width, vision_width)
        else:
            self.top_down_prompt_head = Mlp(llm_width, 2 * vision_width, vision_width, norm_eps=1e-5)
        for module in self.top_down_prompt_head.modules():
            if isinstance(module, nn.Linear):  # small, so the first prompts are near PS3's own scale
                nn.init.uniform_(module.weight, -0.02, 0.02)
                nn.init.zeros_(module.bias)
        self.high_res_pos_embed = nn.Parameter(torch.zeros(1, low_grid * low_grid, llm_width))
        self.high_res_scale_embed = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 1, llm_width)) for _ in range(num_scales)])

    def project(self, merged: torch.Tensor) -> torch.Tensor:
        """[..., 4D] merged blocks -> [..., H] LLM tokens."""
        return self.mlp(self.norm(merged))

    def position(self, side: int, scale: int) -> torch.Tensor:
        """[side*side, H]: position (area-resampled table) + scale embedding of a token grid."""
        table = self.high_res_pos_embed.reshape(1, self.low_grid, self.low_grid, -1).permute(0, 3, 1, 2)
        if side != self.low_grid:
            table = F.interpolate(table.float(), size=(side, side), mode="area").to(table.dtype)
        return table.flatten(2).transpose(1, 2)[0] + self.high_res_scale_embed[scale][0]

    def prompt(self, state: torch.Tensor) -> torch.Tensor:
        """LLM state [B, H] -> PS3 selection prompt [B, D]."""
        return self.top_down_prompt_head(state)
