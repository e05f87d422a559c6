"""`lowres_pretrain`: SigLIP-style contrastive pre-training at the base scale only.

The paper's PS3 starts from SigLIP: an encoder whose low-res features already tell apart
what captions talk about, which is what top-down selection reads. This stage trains the
same towers `ps3_pretrain` uses on low-res image-text pairs (whole images with their
global captions, and crops around labelled boxes with their local captions at many
context sizes), so that `ps3_pretrain` can start from its committed checkpoint through
`model.initFrom`, as it would from real SigLIP weights. The selection modules take no part
and stay as initialised (frozen here, so data parallelism sees no unused parameter).
"""

from __future__ import annotations

import torch
from torch import nn

from ps3.losses import sigmoid_loss, sigmoid_loss_all_gather
from ps3.model import PS3Model, clamp_logit_scale_
from ps3_platform.runtime.optim import param_groups
from ps3_platform.runtime.step_trace import count_flops
from ps3_platform.runtime.task import RunContext, StepResult, TaskProbe, TaskState
from ps3_platform.spec import Stage

from .common import init_weights, loader_for, parse_params, preset_for, preset_of, to_device, tokenizer_for, unwrap
from .params import LowresPretrainParams

#: What a low-res contrastive step trains: the vision trunk, the text tower (its prompt head
#: excepted: it serves selection) and the logit temperature and bias.
TRAINED = ("vision_model.trunk.", "text_model.", "logit_scale", "logit_bias")
UNTRAINED = ("text_model.prompt_proj.",)


def freeze_selection(model: PS3Model) -> None:
    """Only the towers learn here; every selection module keeps its initial weights."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(TRAINED) and not name.startswith(UNTRAINED))


def build(ctx: RunContext) -> TaskState:
    params: LowresPretrainParams = parse_params(LowresPretrainParams, ctx)
    preset = preset_for(ctx)
    tokenizer = tokenizer_for(ctx, preset)
    model = PS3Model(preset)
    init_weights(model, ctx.stage.model.init_from)
    freeze_selection(model)
    data = loader_for(ctx, preset, tokenizer, ctx.stage.data.sources,
                      global_caption_fraction=ctx.stage.data.global_caption_fraction, local_crop=params.crop_context)
    model = ctx.parallelize(model)
    optimizer = ctx.build_optimizer(param_groups(model.named_parameters(), unwrap(model).no_weight_decay_keys))
    contrast = sigmoid_loss_all_gather if params.contrastive_exchange == "all_gather" else sigmoid_loss

    def step(model: nn.Module, batch: dict) -> StepResult:
        batch = to_device(batch, ctx.device)
        out = model(batch)  # no selection view: the low-res contrastive forward
        loss = contrast(out.image_features, out.text_features, out.logit_scale, out.logit_bias,
                        rank=ctx.rank, world_size=ctx.world_size, sizes=batch.get("rank_sizes"))
        n = len(batch["tokens"])
        return StepResult(loss=loss, samples=n, tokens=n * (preset.grids[0] ** 2 + batch["tokens"].shape[1]))

    return TaskState(
        model=model, optimizer=optimizer, scheduler=ctx.build_scheduler(optimizer), data=data, step=step,
        flops_per_sample=counted_flops_per_sample(ctx.stage), bad_sample_counts=data.bad_sample_counts,
        after_optimizer_step=lambda: clamp_logit_scale_(unwrap(model)),
    )


# ---- cost (platformctl estimate, MFU) ----------------------------------------------------
def probe(stage: Stage, device: torch.device) -> TaskProbe:
    """The stage's model on `device` (selection frozen, as the stage has it), its low-res
    micro-batches and its contrastive loss."""
    preset = preset_of(stage)
    with torch.device(device):
        model = PS3Model(preset)
    freeze_selection(model)

    def batch(n: int) -> dict:
        return {"lowres": torch.randn(n, 3, preset.scales[0], preset.scales[0], device=device),
                "tokens": torch.randint(0, preset.text_vocab_size, (n, preset.text_context_length), device=device)}

    def loss(m: PS3Model, batch: dict) -> torch.Tensor:
        out = m(batch)
        return sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)

    return TaskProbe(model=model, batch=batch, loss=loss)


def counted_flops_per_sample(stage: Stage, micro_batch: int = 2) -> float:
    """Training FLOPs per image of a step, counted on the meta device (the trainer's MFU)."""
    return count_flops(probe(stage, torch.device("meta")), micro_batch) / micro_batch
