"""Pieces the PS3 tasks share: task parameters, preset, tokenizer, data, initial weights.

Everything here runs before the first step, so every mistake in a spec (a missing
checkpoint, weights of another architecture, a batch the preset cannot take) surfaces as
a `TaskSetupError` naming the field to change, before any GPU time is spent.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import fsspec
import torch
from pydantic import ValidationError

from ps3.data import DataSourceError, SamplingError, SourceIndex, build_loader, normalize_images
from ps3.model import (
    CheckpointError,
    PresetError,
    PS3Model,
    PS3Preset,
    TokenizerError,
    UnknownPresetError,
    build_tokenizer,
    get_preset,
    load_siglip_hf,
)
from ps3_platform.runtime.task import RunContext, TaskSetupError
from ps3_platform.spec import Stage

from .params import TaskParams


def parse_params(model: type[TaskParams], ctx: RunContext) -> TaskParams:
    return params_of(model, ctx.params)


def params_of(model: type[TaskParams], params: dict) -> TaskParams:
    """A stage's params as its task's typed model (a task's build and its cost probe alike)."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TaskSetupError(f"spec params.{where}: {first['msg']}") from None


def preset_for(ctx: RunContext, max_selected: int | None = None) -> PS3Preset:
    return preset_of(ctx.stage, max_selected)


def preset_of(stage: Stage, max_selected: int | None = None) -> PS3Preset:
    """The stage's preset with the spec's overrides (and a cap on selected patches)."""
    spec = stage.model
    if not spec.preset:
        raise TaskSetupError("spec model.preset is required for PS3 tasks (e.g. ps3-4k-siglip, ps3-tiny)")
    overrides = dict(spec.overrides)
    if max_selected is not None:
        overrides["max_select_num"] = max_selected
    try:
        return get_preset(spec.preset, **overrides)
    except (UnknownPresetError, PresetError, TypeError) as exc:
        raise TaskSetupError(f"spec model: {exc}") from None


def check_batch_fits(preset: PS3Preset, micro_batch: int, max_tokens: int) -> None:
    """A micro-batch must fit the token budget per forward: fail now, not after an OOM."""
    per_image = (preset.scales[0] // preset.patch_size) ** 2 + preset.max_select_num
    if micro_batch * per_image > max_tokens:
        fit = max(1, max_tokens // per_image)
        raise TaskSetupError(
            f"micro-batch {micro_batch} x {per_image} vision tokens per image ({preset.max_select_num} selected) "
            f"exceeds params.maxTokensPerMicroBatch={max_tokens}; set train.microBatch to {fit} or less "
            "(gradient accumulation keeps the global batch)"
        )


def tokenizer_for(ctx: RunContext, preset: PS3Preset):
    uri = ctx.stage.data.tokenizer
    if not uri:
        raise TaskSetupError("spec data.tokenizer is required: a SentencePiece .model or tokenizers .json file")
    try:
        return build_tokenizer(uri, context_length=preset.text_context_length)
    except (TokenizerError, OSError) as exc:
        raise TaskSetupError(f"spec data.tokenizer {uri}: {exc}") from None


def loader_for(ctx: RunContext, preset: PS3Preset, tokenizer, sources, *, global_caption_fraction: float,
               global_batch: int | None = None, micro_batch: int | None = None, rank: int | None = None,
               world_size: int | None = None, seed: int | None = None,
               local_crop: tuple[float, float] | None = None):
    if not sources:
        raise TaskSetupError("spec data.sources is empty: name at least one shard directory")
    try:
        return build_loader(
            [s.model_dump() for s in sources],
            rank=ctx.rank if rank is None else rank, world_size=ctx.world_size if world_size is None else world_size,
            global_batch=global_batch or ctx.batch.global_batch, micro_batch=micro_batch or ctx.batch.micro_batch,
            seed=ctx.stage.data.seed if seed is None else seed, scales=preset.scales, patch_size=preset.patch_size,
            budgets=preset.budgets, selection_view_size=preset.selection_view_size,
            context_length=preset.text_context_length, tokenize=tokenizer,
            num_workers=ctx.stage.data.num_workers, global_caption_fraction=global_caption_fraction,
            read_retry_seconds=ctx.stage.data.read_retry_seconds, pin_memory=ctx.device.type == "cuda",
            local_crop=local_crop,
        )
    except (DataSourceError, SamplingError) as exc:
        raise TaskSetupError(f"spec data: {exc}") from None


def check_data_reaches_preset(preset: PS3Preset, sources, probe: int = 8) -> None:
    """The preset's top scale must be one the data comes near (within 2x), or it only upsamples.

    A few json members per source tell the image sizes; all sources together are judged,
    since low-res web images beside high-res documents are the paper's own mix.
    """
    top, sides = preset.scales[-1], []
    for source in sources:
        try:
            sides += SourceIndex.open(source.uri).probe_long_sides(probe)
        except (DataSourceError, OSError, ValueError):
            continue  # the loader reports unreadable sources
    if sides and 2 * max(sides) < top:
        raise TaskSetupError(
            f"spec model.preset {preset.name} encodes up to {top} px, but the largest of {len(sides)} sampled "
            f"images in data.sources has a long side of {max(sides)} px: pick a preset whose top scale the data "
            "reaches (e.g. ps3-1.5k-siglip for images around 1.5K), or higher-resolution data"
        )


def init_weights(model: PS3Model, uri: str | None, load_stage: Callable[[PS3Model, str], int] | None = None) -> None:
    """Start from SigLIP (HF `SiglipModel` layout), a released/exported PS3 checkpoint, or, with
    `load_stage` (the runtime's `load_weights`), another stage's committed checkpoint of the
    same model (what `lowres_pretrain` hands `ps3_pretrain`: the paper's order)."""
    if not uri:
        return
    try:
        with fsspec.open(f"{uri.rstrip('/')}/config.json") as f:
            config = json.load(f)
    except FileNotFoundError:
        if load_stage is None:
            raise TaskSetupError(f"spec model.initFrom {uri}: no config.json there (expected a SigLIP or PS3 "
                                 "checkpoint directory)") from None
        try:
            load_stage(model, uri)
        except TaskSetupError as exc:
            raise TaskSetupError(f"spec model.initFrom {uri}: no config.json there (a SigLIP or PS3 checkpoint "
                                 f"directory) and no stage checkpoint either: {exc}") from None
        return
    except (OSError, ValueError) as exc:  # unreachable store, unreadable or malformed JSON
        raise TaskSetupError(f"spec model.initFrom {uri}: cannot read config.json: {exc}") from None
    try:
        if config.get("model_type") == "siglip":
            load_siglip_hf(model, uri, allow_gelu_mismatch=True)
        elif config.get("model_type") == "ps3" or "vision_config" in config and "text_config" in config:
            from ps3.model import load_ps3_checkpoint

            released = load_ps3_checkpoint(uri)
            if released.preset.scales != model.preset.scales or released.preset.width != model.preset.width:
                raise CheckpointError(f"{uri}: checkpoint is {released.preset.name} with scales "
                                      f"{released.preset.scales}, the spec's preset has {model.preset.scales}")
            model.load_state_dict(released.state_dict())
        else:
            raise CheckpointError(f"{uri}: model_type {config.get('model_type')!r} is neither siglip nor ps3")
    except (CheckpointError, KeyError, RuntimeError) as exc:
        raise TaskSetupError(f"spec model.initFrom: {exc}") from None


def to_device(batch: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The batch on `device`, its uint8 PS3 pixels normalised there to `dtype`.

    Pixels travel as uint8 (a quarter of float32's bytes over PCIe too) and become model
    input here, after the copy: the one place for every PS3 consumer (pre-training,
    evaluation and its pictures). Copies are non-blocking on CUDA, where the loader pins
    its batches; VILA-HD batches (`images`) pass through as uint8, their model normalises.
    """
    non_blocking = torch.device(device).type == "cuda"

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return normalize_images({k: move(v) for k, v in batch.items()}, dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
