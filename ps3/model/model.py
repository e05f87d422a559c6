"""PS3Model: vision encoder + text tower + sigmoid-loss temperature and bias.

State-dict names are the released checkpoint layout (``vision_model.*``, ``text_model.*``,
``logit_scale``, ``logit_bias``), so ``ps3.model.weights`` reads and writes it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ps3.losses import MAX_LOGIT_SCALE
from ps3.losses import clamp_logit_scale_ as clamp_param_
from ps3.model.forward import (
    PS3ImageOutput,
    encode_image_multilook,
    vision_pretrain_forward,
)
from ps3.model.presets import PS3Preset, get_preset
from ps3.model.text import TextTransformer
from ps3.model.vision import PS3VisionEncoder

__all__ = ["PS3Model", "PretrainOutput", "clamp_logit_scale_"]



@dataclass
class PretrainOutput:
    """What the pre-training loss needs from one forward."""

    image_features: torch.Tensor  # [B, E] L2-normalised
    text_features: torch.Tensor  # [B, E] L2-normalised
    logit_scale: torch.Tensor  # [1] exp of the learned log temperature
    logit_bias: torch.Tensor  # [1]
    topdown_probs: list[torch.Tensor]  # per high-res scale [B, G_s, G_s]
    bottomup_probs: list[torch.Tensor]  # per high-res scale [B, G_s, G_s]
    hr_index: list[torch.Tensor]  # per scale long [B, K_s], the encoded cells


def clamp_logit_scale_(model: PS3Model, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the model's log temperature to [0, log 100] in place; call after each optimizer step."""
    clamp_param_(model.logit_scale, max_value)


class PS3Model(nn.Module):
    """The full PS3 pre-training model (CLIP-style pair of towers plus selection)."""

    #: Parameter-name parts trained without weight decay besides 1-D ones (runtime.optim.param_groups):
    #: the position and token embeddings and the attention pool's latent query.
    no_weight_decay_keys = ("pos_embed", "pos_emb_residual", "attn_pool.latent", "positional_embedding",
                            "token_embedding")

    def __init__(self, preset: PS3Preset | str, **overrides: Any) -> None:
        super().__init__()
        if isinstance(preset, str):
            preset = get_preset(preset, **overrides)
        elif overrides:
            preset = preset.replace(**overrides)
        self.preset = preset
        self.vision_model = PS3VisionEncoder(preset)
        self.text_model = TextTransformer(preset)
        # Shape [1], not []: FSDP2 cannot shard scalar parameters. The released layout stores
        # them as scalars; ps3.model.weights converts on the way in and out.
        self.logit_scale = nn.Parameter(torch.tensor([preset.init_logit_scale]))
        self.logit_bias = nn.Parameter(torch.tensor([preset.init_logit_bias]))

    def set_grad_checkpointing(self, enable: bool = True, *, every: int = 1) -> None:
        """Non-reentrant activation checkpointing of every ``every``-th vision and text block
        (1: all of them; 2: every other one, see ``ps3.model.layers.checkpoints_block``)."""
        self.vision_model.set_grad_checkpointing(enable, every=every)
        self.text_model.grad_checkpointing, self.text_model.checkpoint_every = enable, every

    def blocks(self) -> list[nn.Module]:
        """Every transformer block (the units to wrap with FSDP2 ``fully_shard``)."""
        return [*self.vision_model.trunk.blocks, *self.text_model.transformer.resblocks]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Caption tokens [B, L] -> text embedding [B, E]."""
        emb = self.text_model(tokens)
        return F.normalize(emb, dim=-1) if normalize else emb

    def text_prompt(self, tokens: torch.Tensor) -> torch.Tensor:
        """Top-down selection prompt [B, D] for captions (or questions) [B, L]."""
        return self.text_model.prompt(self.text_model(tokens))

    def encode_image(self, pixel_values: torch.Tensor, *, prompt: torch.Tensor | None = None,
                     num_look_close: int | str = 1, num_token_look_close: int | None = None,
                     scale_budgets: tuple[int, ...] | None = None) -> PS3ImageOutput:
        """Inference on a normalised image [B, 3, H, W] (squash-resized to every scale); see
        ``ps3.model.forward.encode_image_multilook`` for the look and budget options."""
        return encode_image_multilook(self.vision_model, pixel_values, prompt=prompt, num_look_close=num_look_close,
                                      num_token_look_close=num_token_look_close, scale_budgets=scale_budgets)

    def forward_pretrain(self, batch: Mapping[str, Any]) -> PretrainOutput:
        """One pre-training forward on a contract batch (see ``ps3.model`` docs for the keys).

        The top-down prompt comes from each sample's own caption through the prompt head;
        the caption embedding is not detached, so the top-down box loss also trains it.
        """
        text = self.text_model(batch["tokens"])  # [B, E]
        prompt = self.text_model.prompt(text)  # [B, D]
        vis = vision_pretrain_forward(
            self.vision_model, lowres=batch["lowres"], selection_view=batch["selection_view"],
            is_global=batch["is_global"], gt_maps=batch.get("gt_maps"), prompt=prompt,
            highres=batch.get("highres"), hr_index=batch.get("hr_index"), hr_patches=batch.get("hr_patches"),
        )
        return PretrainOutput(
            image_features=F.normalize(vis.pooled, dim=-1), text_features=F.normalize(text, dim=-1),
            # Computed inside forward (clone, not the parameter itself): under FSDP2 the root's
            # unsharded parameters are freed after forward.
            logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias.clone(),
            topdown_probs=vis.topdown_probs, bottomup_probs=vis.bottomup_probs, hr_index=vis.hr_index,
        )

    def forward_lowres(self, batch: Mapping[str, Any]) -> PretrainOutput:
        """Low-res contrastive pre-training (SigLIP's step at the base scale): the pooled low-res
        feature of `lowres` against the caption. The paper's PS3 starts from such an encoder;
        the `lowres_pretrain` stage trains one. No selection, so no maps and no high-res index."""
        text = self.text_model(batch["tokens"])  # [B, E]
        image = self.vision_model.encode_lowres(batch["lowres"]).pooled  # [B, E]
        return PretrainOutput(image_features=F.normalize(image, dim=-1), text_features=F.normalize(text, dim=-1),
                              logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias.clone(),
                              topdown_probs=[], bottomup_probs=[], hr_index=[])

    def forward(self, batch: Mapping[str, Any]) -> PretrainOutput:
        """A batch without a selection view is a low-res contrastive one (`forward_lowres`),
        any other a PS3 pre-training one (`forward_pretrain`). One `forward`, so DDP and FSDP2
        hooks see either."""
        return self.forward_pretrain(batch) if "selection_view" in batch else self.forward_lowres(batch)
