"""`ps3_pretrain`: PS3 pre-training (paper section 2.3, appendix B).

Localized sigmoid contrast between the pooled high-res features of the selected in-box
patches and the local captions, mixed with global low-res/global-caption pairs; patches
are selected by the ground-truth boxes (teacher forcing); top-down and bottom-up selection
are trained with BCE + DICE against the boxes. Loss weights are spec params.
"""

from __future__ import annotations

from torch import nn

from ps3.losses import BoxLossConfig, box_supervision_loss, sigmoid_loss, sigmoid_loss_all_gather
from ps3.model import PS3Model, clamp_logit_scale_
from ps3_platform.runtime.optim import param_groups
from ps3_platform.runtime.task import RunContext, StepResult, TaskState

from .common import (
    check_batch_fits,
    check_data_reaches_preset,
    init_weights,
    loader_for,
    parse_params,
    preset_for,
    to_device,
    tokenizer_for,
    unwrap,
)
from .params import PretrainParams
from .pretrain_cost import counted_flops_per_sample


def build(ctx: RunContext) -> TaskState:
    params: PretrainParams = parse_params(PretrainParams, ctx)
    preset = preset_for(ctx, params.max_selected_patches)
    check_batch_fits(preset, ctx.batch.micro_batch, params.max_tokens_per_micro_batch)
    check_data_reaches_preset(preset, ctx.stage.data.sources)
    tokenizer = tokenizer_for(ctx, preset)
    model = PS3Model(preset)
    init_weights(model, ctx.stage.model.init_from, load_stage=ctx.load_weights)
    flops = counted_flops_per_sample(preset)  # MFU's numerator: counted on the meta device, cached per preset
    data = loader_for(ctx, preset, tokenizer, ctx.stage.data.sources,
                      global_caption_fraction=ctx.stage.data.global_caption_fraction)
    model = ctx.parallelize(model)
    optimizer = ctx.build_optimizer(param_groups(model.named_parameters(), unwrap(model).no_weight_decay_keys))
    box_config = BoxLossConfig(bce_weight=params.bce_weight, dice_weight=params.dice_weight,
                               topdown_weight=params.topdown_weight, bottomup_weight=params.bottomup_weight)

    contrast = sigmoid_loss_all_gather if params.contrastive_exchange == "all_gather" else sigmoid_loss

    def step(model: nn.Module, batch: dict) -> StepResult:
        batch = to_device(batch, ctx.device)
        out = model(batch)
        contrastive = contrast(out.image_features, out.text_features, out.logit_scale, out.logit_bias,
                                   rank=ctx.rank, world_size=ctx.world_size, sizes=batch.get("rank_sizes"))
        # Top-down learns the caption's box; bottom-up every labelled box of the image (paper Fig. 5b/c).
        box = box_supervision_loss(out.topdown_probs, out.bottomup_probs, batch["gt_maps"], batch["is_global"],
                                   box_config, bottomup_gt_maps=batch["saliency_maps"])
        loss = params.contrastive_weight * contrastive + box["loss"]
        figures = {"contrastive": contrastive.detach()}  # tensors: the trainer reads them when it logs
        figures |= {k: v.detach() for k, v in box.items() if k != "loss"}
        tokens = sum(int(i.shape[1]) for i in out.hr_index) + batch["tokens"].shape[1]
        return StepResult(loss=loss, metrics=figures, samples=len(batch["tokens"]),
                          tokens=tokens * len(batch["tokens"]))

    return TaskState(
        model=model, optimizer=optimizer, scheduler=ctx.build_scheduler(optimizer), data=data, step=step,
        flops_per_sample=flops, bad_sample_counts=data.bad_sample_counts,
        after_optimizer_step=lambda: clamp_logit_scale_(unwrap(model)),
    )

