"""Trace one training micro-batch on the meta device: the FLOPs it costs and the memory it holds.

`platformctl estimate` and the MFU figure need the cost of a step before any GPU runs it.
The meta device gives every shape and dtype without allocating or computing anything, so
the task's own model and step run here as they would on a GPU (selection path, text tower
and loss included) and two counters watch:

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward and backward. They are
  *model* FLOPs (the PaLM MFU convention): attention backward counts twice its forward, not
  the recomputation a fused kernel does, and checkpointed blocks count once.
- Memory: every tensor storage created during the step is added while it lives (a weak
  finalizer subtracts it when freed), so the high-water mark over the step is what the
  caching allocator's `max_memory_allocated` sees on top of what existed before (parameters,
  optimizer state). Gradients are told apart as they land in `.grad`, so FSDP's sharding
  can be applied to them afterwards (`StepTrace.peak_bytes`).

The meta device has only the math path of `scaled_dot_product_attention`, which keeps the
[T, T] attention matrix for backward; GPUs and CPUs run a fused kernel that keeps q, k, v,
the output and the log-sum-exp. The trace reroutes attention to the fused CPU kernel's meta
function, which saves exactly those. Under bf16 precision the trainer runs `torch.autocast`,
which the meta device ignores; `_MetaAutocast` applies its casts (matmuls in bf16, norms and
softmax in fp32, parameter casts cached for the forward) so saved activations get the dtypes
they have on a GPU.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from .task import TaskProbe

_aten = torch.ops.aten
_FUSED = _aten._scaled_dot_product_flash_attention_for_cpu
_FUSED_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class StepTrace:
    """The memory one micro-batch's forward + backward holds, as traced on the meta device."""

    micro_batch: int
    samples: tuple[tuple[int, int], ...]
    """(bytes live besides gradients, gradient bytes) after every allocation, beyond what
    existed before the step; gradients are full size, as on one unsharded rank."""

    def peak_bytes(self, grad_share: float = 1.0) -> int:
        """Most bytes live at once during the step when each gradient keeps `grad_share` of its
        size (1/world under FSDP, which reduce-scatters each gradient as it lands)."""
        return int(max((other + grads * grad_share for other, grads in self.samples), default=0))


# ---- FLOPs of the fused attention kernel (model FLOPs: backward = 2 x forward) ----------------
def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """QK^T and AV of one attention call: 2 x b x h x s_q x s_k x (d_qk + d_v)."""
    b, h, s_q, d_qk = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (d_qk + d_v)


def _fused_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _fused_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, *args, out_shape=None, **kwargs) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs its forward.

    torch's own formula treats a grouped convolution's weight gradient as a dense one, which
    counts a ConvNeXt depthwise 7x7 backward C times over (33x for the tiny preset).
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


FLOP_FORMULAS = {_FUSED: _fused_forward_flops, _FUSED_BACKWARD: _fused_backward_flops,
                 _aten.convolution_backward: _conv_backward_flops}


# ---- attention and autocast as a GPU runs them ------------------------------------------------
def _fused_attention(sdpa):
    """`F.scaled_dot_product_attention` through the fused kernel (see module docstring)."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or enable_gqa:  # the fused CPU kernel has neither: keep the math path
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return _FUSED(query, key, value, is_causal=is_causal, attn_mask=attn_mask, scale=scale)[0]

    return attention


class _MetaAutocast:
    """`torch.autocast("cuda", bfloat16)` for meta tensors, which the real autocast passes by:
    the matmuls of `LOWER` run in bf16, the calls of `FP32` in fp32, the rest as they come.

    Casts of parameters are cached until `end_forward`, as autocast caches casts of leaves
    that require grad for its region, so a block run twice (PS3's low-res and high-res
    passes) holds one bf16 copy of its weights.
    """

    LOWER = ("linear", "conv2d", "scaled_dot_product_attention")
    FP32 = ("layer_norm", "group_norm", "softmax", "log_softmax", "binary_cross_entropy_with_logits", "normalize")

    def __init__(self) -> None:
        self._cache: dict[int, torch.Tensor] = {}

    def end_forward(self) -> None:
        self._cache.clear()

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if isinstance(value, nn.Parameter) and dtype == torch.bfloat16:
            if id(value) not in self._cache:
                self._cache[id(value)] = value.to(dtype)
            return self._cache[id(value)]
        return value.to(dtype)

    def wrap(self, fn, dtype: torch.dtype):
        def cast_then_call(*args, **kwargs):
            args = tuple(self._cast(a, dtype) for a in args)
            return fn(*args, **{k: self._cast(v, dtype) for k, v in kwargs.items()})

        return cast_then_call


@contextlib.contextmanager
def _as_on_gpu(autocast: _MetaAutocast | None):
    """Fused attention (and autocast's casts) for every call of `torch.nn.functional` while open.

    The functions are replaced on the module rather than caught by a `TorchFunctionMode`
    because a mode is set aside while it handles `backward()`, so the forward that activation
    checkpointing recomputes in backward would escape it. Traces run before training, in one
    thread; the originals are back on exit.
    """
    originals = {name: getattr(F, name) for name in ("scaled_dot_product_attention",
                                                      *(_MetaAutocast.LOWER + _MetaAutocast.FP32 if autocast else ()))}
    patched = {"scaled_dot_product_attention": _fused_attention(originals["scaled_dot_product_attention"])}
    if autocast is not None:
        for name in _MetaAutocast.LOWER + _MetaAutocast.FP32:
            inner = patched.get(name, originals[name])
            patched[name] = autocast.wrap(inner, torch.bfloat16 if name in _MetaAutocast.LOWER else torch.float32)
    try:
        for name, fn in patched.items():
            setattr(F, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


# ---- live storage bytes -----------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Bytes of every storage an op creates, while it lives; gradients counted apart."""

    def __init__(self) -> None:
        super().__init__()
        self.other = self.grads = 0
        self.samples: list[tuple[int, int]] = []
        self._seen: dict[int, int] = {}  # id(storage) -> bytes, while alive
        self._grad_storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._seen:
            return
        self._seen[key] = storage.nbytes()
        self.other += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        self.samples.append((self.other, self.grads))

    def _free(self, key: int) -> None:
        size = self._seen.pop(key)
        if key in self._grad_storages:
            self._grad_storages.discard(key)
            self.grads -= size
        else:
            self.other -= size

    def mark_grad(self, param: torch.Tensor) -> None:
        """A gradient landed in `param.grad`: count its storage as gradient from now on."""
        key = id(param.grad.untyped_storage())
        if key in self._seen and key not in self._grad_storages:
            self._grad_storages.add(key)
            self.other -= self._seen[key]
            self.grads += self._seen[key]


# ---- the traces -------------------------------------------------------------------------------
def _run(probe: TaskProbe, micro_batch: int, autocast: _MetaAutocast | None = None) -> None:
    batch = probe.batch(micro_batch)
    loss = probe.loss(probe.model, batch)
    if autocast is not None:
        autocast.end_forward()
    loss.backward()


def count_flops(probe: TaskProbe, micro_batch: int) -> float:
    """Model FLOPs of forward + backward of one micro-batch of `micro_batch` samples (meta device)."""
    with _as_on_gpu(None), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        _run(probe, micro_batch)
    probe.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


#: How a stage computes: fp32; "autocast" (bf16 autocast over fp32 parameters, DDP); "bf16"
#: (FSDP2 mixed precision: bf16 parameters and inputs, no autocast).
PRECISIONS = ("fp32", "autocast", "bf16")


def _bf16_inputs(batch: Any) -> Any:
    """Floating tensors of a batch in bf16, as FSDP2's root casts its forward inputs."""
    if isinstance(batch, torch.Tensor):
        return batch.to(torch.bfloat16) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _bf16_inputs(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_bf16_inputs(v) for v in batch)
    return batch


def trace_memory(probe: TaskProbe, micro_batch: int, *, precision: str = "fp32",
                 grads_exist: bool = False) -> StepTrace:
    """The live-memory timeline of one micro-batch (forward + backward, meta device).

    `precision`: one of `PRECISIONS`. `grads_exist`: a later micro-batch of an accumulating
    step, whose gradients are already there (allocated before the trace, so not counted in
    it); otherwise gradients start as None, as after `zero_grad`. No FLOP counter runs
    alongside: its module hooks keep checkpointed blocks' recomputed activations alive
    longer than a training step does.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    model = probe.model
    if precision == "bf16":
        model.to(torch.bfloat16)
        make_batch = probe.batch
        probe = TaskProbe(model=model, batch=lambda n: _bf16_inputs(make_batch(n)), loss=probe.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    if grads_exist:
        for p in params:
            p.grad = torch.empty_like(p)
    live = _LiveBytes()
    autocast = _MetaAutocast() if precision == "autocast" else None
    hooks = [p.register_post_accumulate_grad_hook(live.mark_grad) for p in params]
    try:
        with _as_on_gpu(autocast), live:
            _run(probe, micro_batch, autocast)
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    return StepTrace(micro_batch=micro_batch, samples=tuple(live.samples))
