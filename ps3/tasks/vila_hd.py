"""`vila_hd`: one VILA-HD training stage (align, pretrain, selection or SFT) on the runtime.

Stages differ only in their spec: what is trainable, the losses' weights, the data, and
where they start from. The first stage takes PS3 from a `ps3_pretrain` stage's checkpoint
(`params.visionFrom`) or a released/exported PS3 directory (`model.initFrom`); every later
stage takes the whole model from the previous stage's committed checkpoint
(`checkpoint.initFrom`). The LLM's architecture and tokenizer always come from
`params.llm` (its weights too, in the first stage).
"""

from __future__ import annotations

import json

import torch
from ps3_platform.runtime.optim import param_groups
from ps3_platform.runtime.task import RunContext, StepResult, TaskSetupError, TaskState

from ps3.model import PS3Model
from ps3.vila_hd.loader import build_conversation_loader
from ps3.vila_hd.export import (
    ExportError,
    export_vila_hd,
    is_vila_hd_export,
    load_vila_hd,
)
from ps3.vila_hd.llm import LLMError, load_llm
from ps3.vila_hd.losses import selection_loss, selection_recall
from ps3.vila_hd.model import SELECTION_MODULES, Selection, VilaHD
from ps3.vila_hd.params import MODULES, VilaHDParams

from .common import init_weights, parse_params, preset_for, to_device, unwrap

#: PS3's selection modules (the released `token_selection_param_names`; the prior prompt is not one).
__all__ = ["MODULES", "SELECTION_MODULES", "build", "freeze_except", "fresh_model", "module_parameters"]


def module_parameters(model: VilaHD) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of each trainable unit, every parameter in exactly one."""
    proj, vision = model.mm_projector, model.vision_tower
    selection = [p for name in SELECTION_MODULES for p in getattr(vision, name).parameters()]
    chosen = {id(p) for p in selection}
    return {
        "projector": [*proj.norm.parameters(), *proj.mlp.parameters()],
        "embeddings": [proj.high_res_pos_embed, *proj.high_res_scale_embed],
        "prompt_head": list(proj.top_down_prompt_head.parameters()),
        "selection": selection,
        "vision": [p for p in vision.parameters() if id(p) not in chosen],
        "llm": list(model.llm.parameters()),
    }


def freeze_except(model: VilaHD, trainable: list[str]) -> dict[str, tuple[int, bool]]:
    """Freeze everything but the named units; returns {unit: (parameters, trainable)}."""
    counts = {}
    for name, params in module_parameters(model).items():
        for p in params:
            p.requires_grad_(name in trainable)
        counts[name] = (sum(p.numel() for p in params), name in trainable)
    return counts


def fresh_model(ctx: RunContext, llm: str, prompt_head: str, ps3: PS3Model | None = None) -> tuple[VilaHD, object]:
    """The stage's architecture: PS3 of the spec's preset, the LLM at `llm` (with its weights)."""
    try:
        loaded = load_llm(llm)
    except LLMError as exc:
        raise TaskSetupError(f"spec params.llm: {exc}") from None
    ps3 = ps3 or PS3Model(preset_for(ctx))
    return VilaHD.on_llm(ps3.vision_model, loaded, prompt_head=prompt_head), loaded.tokenizer


def _build_model(ctx: RunContext, params: VilaHDParams) -> tuple[VilaHD, object]:
    ps3 = PS3Model(preset_for(ctx))
    init_weights(ps3, ctx.stage.model.init_from)
    if params.vision_from:
        ctx.load_weights(ps3, params.vision_from)
    model, tokenizer = fresh_model(ctx, params.llm, params.prompt_head, ps3)
    source = ctx.stage.checkpoint.init_from
    if source and is_vila_hd_export(source):  # an exported directory (this platform's or a stage's export)
        try:
            exported, _ = load_vila_hd(source)
            model.load_state_dict(exported.state_dict())
        except (ExportError, RuntimeError) as exc:
            raise TaskSetupError(f"spec checkpoint.initFrom: {exc}") from None
        ctx.log.info("started from the exported model %s", source)
    elif source:  # the previous stage's committed checkpoint
        step = ctx.load_weights(model, source)
        ctx.log.info("started from %s step %d", source, step)
    return model, tokenizer


def _export(ctx: RunContext, params: VilaHDParams, model: torch.nn.Module) -> None:
    """The trained model as an HF-style directory (every rank takes part in gathering it,
    FSDP-sharded or not; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank != 0:
        return
    plain, tokenizer = fresh_model(ctx, params.llm, params.prompt_head)
    plain.load_state_dict(state)
    export_vila_hd(plain, tokenizer, params.export_to)
    ctx.log.info("exported the model to %s", params.export_to)


def build(ctx: RunContext) -> TaskState:
    params: VilaHDParams = parse_params(VilaHDParams, ctx)
    selection = _selection(params)
    model, tokenizer = _build_model(ctx, params)
    enc = model.vision_tower
    for name, (count, trained) in freeze_except(model, params.trainable).items():
        ctx.log.info("parameters %-12s %12d %s", name, count, "trainable" if trained else "frozen")
    image_tokens = selection.image_tokens(enc)
    sources = ctx.stage.data.sources
    if not sources:
        raise TaskSetupError("spec data.sources is empty: name at least one conversation shard directory")

    def loader(srcs, *, rank, world_size, global_batch, micro_batch):
        try:
            return build_conversation_loader(
                [s.model_dump() for s in srcs], tokenizer=tokenizer, image_size=enc.preset.scales[-1],
                max_length=params.max_text_tokens + image_tokens, image_tokens=image_tokens, rank=rank,
                world_size=world_size, global_batch=global_batch, micro_batch=micro_batch,
                seed=ctx.stage.data.seed, num_workers=ctx.stage.data.num_workers,
                read_retry_seconds=ctx.stage.data.read_retry_seconds, pin_memory=ctx.device.type == "cuda")
        except (ValueError, OSError) as exc:
            raise TaskSetupError(f"spec data: {exc}") from None

    data = loader(sources, rank=ctx.rank, world_size=ctx.world_size, global_batch=ctx.batch.global_batch,
                  micro_batch=ctx.batch.micro_batch)
    for info, spec in zip(data.source_sizes(), sources):
        ctx.log.info("source %s: %d conversations, weight %g, %s", info.name, info.size, info.weight, spec.uri)
    model = ctx.parallelize(model)
    optimizer = ctx.build_optimizer(param_groups(model.named_parameters(), unwrap(model).no_weight_decay_keys))
    grids = enc.preset.grids[1:]

    def step(model: torch.nn.Module, batch: dict) -> StepResult:
        batch = to_device(batch, ctx.device)
        out = model(batch, selection)
        sel = selection_loss(out.selection_probs, batch["boxes"], batch["has_box"], grids)
        loss = params.lm_loss_weight * out.lm_loss + params.selection_loss_weight * sel["loss"]
        # what the micro-batch left unused still takes part in backward (VilaHD's ghost)
        loss = loss + (out.ghost if out.ghost is not None else 0.0)
        recall = selection_recall(out.selected, batch["boxes"], batch["has_box"], grids)
        figures = {"lm_loss": out.lm_loss.detach(), "selection_loss": sel["loss"].detach(),  # read when logged
                   "image_tokens": sum(out.image_tokens) / max(1, len(out.image_tokens))}
        if len(recall):
            figures["selection_recall"] = recall.float().mean()
        return StepResult(loss=loss, metrics=figures, samples=len(batch["input_ids"]),
                          tokens=int(out.labels.shape[0] * out.labels.shape[1]))

    def evaluate() -> dict:
        from ps3.vila_hd.evaluate import evaluate_choices

        if params.export_to:
            _export(ctx, params, model)
        if not params.eval_batches or not ctx.stage.data.eval_sources or ctx.rank != 0:
            return {}
        held_out = loader(ctx.stage.data.eval_sources, rank=0, world_size=1, global_batch=ctx.batch.micro_batch,
                          micro_batch=ctx.batch.micro_batch)
        results = evaluate_choices(unwrap(model), held_out, params.eval_batches, selection, tokenizer, ctx.device)
        (ctx.run_dir / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        ctx.log.info("evaluation: %s", json.dumps(results, sort_keys=True))
        return results

    return TaskState(model=model, optimizer=optimizer, scheduler=ctx.build_scheduler(optimizer), data=data,
                     step=step, evaluate=evaluate, bad_sample_counts=data.bad_sample_counts)


def _selection(params: VilaHDParams) -> Selection:
    return Selection(mode=params.look_close_mode, num_look_close=params.num_look_close,
                     num_token_look_close=params.num_token_look_close,
                     select_num_each_scale=tuple(params.select_num_each_scale) if params.select_num_each_scale else None,
                     smooth_selection_prob=params.smooth_selection_prob,
                     dynamic_resolution=params.dynamic_resolution, gt_forced=params.gt_forced_selection)
