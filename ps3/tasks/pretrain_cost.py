"""What a `ps3_pretrain` step costs: its probe (model, micro-batch, loss) and its FLOPs.

The probe (`ps3_platform.runtime.task.TaskProbe`) is the task's step without data: the
spec's preset built on any device, a micro-batch with the loader's shapes (whole high-res
views up to 1024 px, pre-gathered patches above, as `ps3.data` gives them) and the loss the
task trains on. `platformctl estimate` traces it on the meta device, the trainer's MFU uses
its counted FLOPs, and a benchmark can run it on a GPU.

`analytic_flops_per_sample` counts the same step by hand from the preset's numbers, term by
term; a test holds the FLOP counter to it (bench goal: within 5 %).
"""

from __future__ import annotations

import functools

import torch

from ps3.data.views import ViewConfig
from ps3.losses import BoxLossConfig, box_supervision_loss, sigmoid_loss
from ps3.model import PS3Model, PS3Preset
from ps3_platform.runtime.step_trace import count_flops
from ps3_platform.runtime.task import TaskProbe
from ps3_platform.spec import Stage

from .common import params_of, preset_of
from .params import PretrainParams

__all__ = ["analytic_flops_per_sample", "counted_flops_per_sample", "example_batch", "probe"]


def example_batch(preset: PS3Preset, n: int, device: torch.device) -> dict:
    """A micro-batch of `n` local-caption samples as the model's forward receives it: the
    loader's keys and shapes, pixels normalised to float32 (what `common.to_device` makes of
    the loader's uint8 on the device).

    Each box covers the top-left fifth of every scale, so in-box pooling and the box loss
    have something to read; the values are random (cost does not depend on them).
    """
    p = preset
    views = ViewConfig(p.scales, p.patch_size, p.budgets, p.selection_view_size, p.text_context_length)
    boxes = []
    for grid in p.grids[1:]:
        box = torch.zeros(n, grid, grid, device=device)  # [B, G_s, G_s]
        box[:, : max(1, grid // 5), : max(1, grid // 5)] = 1
        boxes.append(box)
    batch = {
        "lowres": torch.randn(n, 3, p.scales[0], p.scales[0], device=device),
        "selection_view": torch.randn(n, 3, p.selection_view_size, p.selection_view_size, device=device),
        "gt_maps": boxes, "saliency_maps": boxes,
        "is_global": torch.zeros(n, dtype=torch.bool, device=device),
        "tokens": torch.randint(0, p.text_vocab_size, (n, p.text_context_length), device=device),
    }
    if views.patches:  # the loader cut the selected cells already (4K)
        batch["hr_index"] = [torch.arange(k, device=device).expand(n, k) for k in p.budgets]  # [B, K_s]
        batch["hr_patches"] = [torch.randn(n, k, 3, p.patch_size, p.patch_size, device=device) for k in p.budgets]
    else:
        batch["highres"] = [torch.randn(n, 3, s, s, device=device) for s in p.scales[1:]]
    return batch


def pretrain_loss(model: PS3Model, batch: dict, params: PretrainParams) -> torch.Tensor:
    """The loss `ps3.tasks.pretrain`'s step trains on, on one rank (no cross-rank texts)."""
    out = model(batch)
    contrastive = sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
    config = BoxLossConfig(bce_weight=params.bce_weight, dice_weight=params.dice_weight,
                           topdown_weight=params.topdown_weight, bottomup_weight=params.bottomup_weight)
    box = box_supervision_loss(out.topdown_probs, out.bottomup_probs, batch["gt_maps"], batch["is_global"],
                               config, bottomup_gt_maps=batch["saliency_maps"])
    return params.contrastive_weight * contrastive + box["loss"]


def probe(stage: Stage, device: torch.device) -> TaskProbe:
    """The `ps3_pretrain` stage's model on `device`, its micro-batches and its loss."""
    params = params_of(PretrainParams, stage.params)
    return _probe(preset_of(stage, params.max_selected_patches), params, device)


def _probe(preset: PS3Preset, params: PretrainParams, device: torch.device) -> TaskProbe:
    with torch.device(device):
        model = PS3Model(preset)
    return TaskProbe(model=model, batch=lambda n: example_batch(preset, n, device),
                     loss=lambda m, batch: pretrain_loss(m, batch, params))


@functools.lru_cache(maxsize=8)
def counted_flops_per_sample(preset: PS3Preset, micro_batch: int = 2) -> float:
    """Training FLOPs per image, counted by `torch.utils.flop_counter` on the meta device.

    Forward + backward of the real model (selection, both towers, loss) on a micro-batch of
    two, per image; the count is linear in the batch but for the [B, B] logits of the loss
    (whose weights do not change it: the default params serve).
    """
    return count_flops(_probe(preset, PretrainParams(), torch.device("meta")), micro_batch) / micro_batch


def _linear(fan_in: int, fan_out: int, tokens: int, input_grad: bool = True) -> int:
    """Forward + backward FLOPs of a matmul layer: 2 forward, 2 for the weight gradient and
    2 for the input gradient (none for a layer reading the images, which need none)."""
    return (6 if input_grad else 4) * fan_in * fan_out * tokens


def _attention(width: int, queries: int, keys: int) -> int:
    """QK^T and AV of every head: 4 x q x k x width forward, twice that backward."""
    return 12 * queries * keys * width


def _map_head(d: int, mlp: int, tokens: int) -> int:
    """The MAP pooling head over `tokens`: their key/values, one latent query and its MLP."""
    return _linear(d, 2 * d, tokens) + _attention(d, 1, tokens) + _linear(d, d, 2) + _linear(d, mlp, 2) \
        + _linear(mlp, d, 1)


def _vision_flops(p: PS3Preset) -> int:
    """Trunk on the low-res tokens and the selected high-res ones (which attend over the low-res
    K/V as well), patch embedding, the two MAP poolings and the selection branch."""
    d, n0, k = p.width, p.grids[0] ** 2, p.max_select_num
    block = _linear(d, 3 * d, 1) + _linear(d, d, 1) + _linear(d, p.mlp_dim, 1) + _linear(p.mlp_dim, d, 1)
    trunk = p.depth * (block * (n0 + k) + _attention(d, n0, n0) + _attention(d, k, n0 + k))
    embed = _linear(3 * p.patch_size ** 2, d, n0 + k, input_grad=False)
    pools = _map_head(d, p.mlp_dim, n0) + _map_head(d, p.mlp_dim, k)
    n_sel, n_hr = len(p.select_layers), p.num_highres_scales
    projection = _linear(n_sel * d, n_sel * d, n0) + _linear(n_sel * d, n_hr * d, n0)
    return trunk + embed + pools + projection + _selection_convnet(p)


def _selection_convnet(p: PS3Preset) -> int:
    """Patchify stem (reads the image), ConvNeXt blocks (7x7 depthwise, 4x MLP), 1x1 projection."""
    c, cells = p.sel_hidden_dim, (p.selection_view_size // p.sel_kernel_size) ** 2
    stem = _linear(3 * p.sel_kernel_size ** 2, c, cells, input_grad=False)
    blocks = p.sel_depth * (_linear(49, 1, cells * c) + _linear(c, 4 * c, cells) + _linear(4 * c, c, cells))
    return stem + blocks + _linear(c, p.sel_out_dim, cells)


def _text_flops(p: PS3Preset) -> int:
    """Text tower over the caption, its projection at the last token and the prompt head."""
    w, length = p.text_width, p.text_context_length
    block = _linear(w, 3 * w, length) + _linear(w, w, length) + _linear(w, p.text_mlp_dim, length) \
        + _linear(p.text_mlp_dim, w, length) + _attention(w, length, length)
    return p.text_depth * block + _linear(w, p.embed_dim, 1) + _linear(p.embed_dim, p.width, 1) \
        + _linear(p.width, p.width, 1)


def analytic_flops_per_sample(preset: PS3Preset) -> float:
    """Training FLOPs per image counted by hand: every matmul and attention product of the
    step, forward + backward. Leaves out what is not a matmul (norms, activations, softmax,
    top-k, the loss), as the FLOP counter does."""
    return float(_vision_flops(preset) + _text_flops(preset))
