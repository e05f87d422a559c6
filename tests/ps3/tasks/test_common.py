"""`to_device`: PS3 pixels arrive as uint8 and are normalised once, after the copy."""

from __future__ import annotations

import pytest
import torch

from ps3.model import PS3Model, get_preset
from ps3.tasks.common import to_device
from ps3.tasks.params import PretrainParams
from ps3.tasks.pretrain_cost import example_batch, pretrain_loss



def _batch(pinned: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    pixels = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    batch = {"lowres": pixels(2, 3, 8, 8), "selection_view": pixels(2, 3, 16, 16),
             "hr_patches": [pixels(2, 4, 3, 4, 4)], "hr_index": [torch.arange(4).expand(2, 4)],
             "gt_maps": [torch.ones(2, 4, 4)], "tokens": torch.ones(2, 6, dtype=torch.long), "rank_sizes": [2]}
    if pinned:
        batch = {k: [t.pin_memory() for t in v] if isinstance(v, list) and torch.is_tensor(v[0])
                 else v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def _old_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """What the loader's workers sent before: float32 x / 127.5 - 1."""
    return pixels.float().div_(127.5).sub_(1.0)


def _check(out: dict, batch: dict, device: torch.device) -> None:
    assert out["lowres"].device.type == device.type and out["lowres"].dtype == torch.float32
    assert torch.equal(out["lowres"].cpu(), _old_normalise(batch["lowres"]))
    assert torch.equal(out["selection_view"].cpu(), _old_normalise(batch["selection_view"]))
    assert torch.equal(out["hr_patches"][0].cpu(), _old_normalise(batch["hr_patches"][0]))
    assert out["hr_index"][0].dtype == torch.long and out["tokens"].dtype == torch.long
    assert out["rank_sizes"] == [2]


def test_pixels_are_normalised_on_the_device_exactly_as_before():
    batch = _batch()
    _check(to_device(batch, torch.device("cpu")), batch, torch.device("cpu"))
    assert batch["lowres"].dtype == torch.uint8  # the loader's batch is not changed in place
    assert to_device(batch, torch.device("cpu"), torch.bfloat16)["lowres"].dtype == torch.bfloat16


def test_vila_hd_images_pass_as_uint8():
    """Its model normalises `images` itself (once: not here too)."""
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    assert to_device({"images": images}, torch.device("cpu"))["images"].dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_copy_without_blocking_and_normalise_on_the_gpu():
    batch = _batch(pinned=True)
    device = torch.device("cuda")
    out = to_device(batch, device)
    torch.cuda.synchronize()
    _check(out, batch, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_micro_batch_never_waits_for_the_gpu():
    """Issue 18 item 4: copy, normalise, forward, loss and backward of a pre-training
    micro-batch run under `set_sync_debug_mode("error")`, so any `.item()`, `.cpu()` or
    blocking copy on that path fails here (the step reads its loss once, after the last one)."""
    device = torch.device("cuda")
    preset = get_preset("ps3-tiny")
    model = PS3Model(preset).to(device)
    host = {}
    for key, value in example_batch(preset, 4, torch.device("cpu")).items():  # pinned; pixels as the loader's uint8
        pixels = key in ("lowres", "selection_view", "hr_patches", "highres")
        pin = lambda t: (t.clamp(-1, 1).add(1).mul(127.5).to(torch.uint8) if pixels else t).pin_memory()
        host[key] = [pin(t) for t in value] if isinstance(value, list) else pin(value)
    pretrain_loss(model, to_device(host, device), PretrainParams()).backward()  # warm-up: lazy inits may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pretrain_loss(model, to_device(host, device), PretrainParams())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()
