"""One PS3 pre-training step at full size: time, samples/s, MFU and peak memory per option.

On CUDA the `ps3-4k-siglip` step (SO400M trunk, scales 378-3780, 2560 selected patches)
runs at the paper's batch per GPU (4096 over 128 GPUs = 32) on synthetic inputs of the
loader's shapes, through the runtime's own `parallelize` (so each row is what a spec with
those `train` fields gets): fp32, bf16 autocast, FSDP2 with the bf16 mixed-precision
policy, then selective and full activation checkpointing and compiled blocks on top. One
more pair of rows times the input path alone: float32 pixels copied from host memory vs
uint8 pixels from pinned memory, copied without blocking and normalised on the device.

Every row also carries the memory `platformctl estimate` predicts for it (the meta-device
trace), next to what `torch.cuda.max_memory_allocated` measured. On CPU (`--quick`) the
tiny preset proves the script in seconds; there the measured peak is torch.profiler's
memory timeline of the same warm step.

Usage: ``python bench/gpu_step.py [--quick] [--preset NAME] [--micro-batch N] [--steps N]``.
The last line is one JSON object: ``flops_per_step``, ``flop_counter_vs_analytic``,
``estimate_vs_measured_memory``, and on CUDA ``mfu``, ``peak_memory_gb``, ``samples_per_s``
(of the best row).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ps3.tasks.pretrain_cost import analytic_flops_per_sample, counted_flops_per_sample
from ps3_platform.estimate import estimate_stage
from ps3_platform.estimate.measure import cpu_peak_bytes, training_step
from ps3_platform.runtime.distributed import ParallelizeConfig, WorldInfo, parallelize, uses_autocast
from ps3_platform.runtime.optim import param_groups
from ps3_platform.runtime.task import build_probe
from ps3_platform.spec import Pool, Stage
from ps3_platform.spec.pools import load_pools

GIB = 2**30

#: (row name, train fields) in the order the options stack up.
GPU_ROWS = [
    ("fp32, no wrapper", dict(precision="fp32", parallelism="ddp")),
    ("bf16 autocast", dict(precision="bf16", parallelism="ddp")),
    ("FSDP2, bf16 policy", dict(precision="bf16", parallelism="fsdp")),
    ("+ selective checkpointing", dict(precision="bf16", parallelism="fsdp", activationCheckpointing="selective")),
    ("+ full checkpointing", dict(precision="bf16", parallelism="fsdp", activationCheckpointing="full")),
    ("+ selective, compiled blocks", dict(precision="bf16", parallelism="fsdp", activationCheckpointing="selective",
                                          compile=True)),
]
CPU_ROWS = [
    ("fp32, no wrapper", dict(precision="fp32", parallelism="ddp")),
    ("+ full checkpointing", dict(precision="fp32", parallelism="ddp", activationCheckpointing="full")),
    ("FSDP2 (a group of one)", dict(precision="fp32", parallelism="fsdp")),
]


@dataclass
class Row:
    name: str
    step_s: float | None = None
    samples_per_s: float | None = None
    mfu: float | None = None
    peak_gb: float | None = None
    estimate_gb: float | None = None
    note: str = ""


def _stage(preset: str, micro_batch: int, train: dict) -> Stage:
    return Stage(name="bench", task="ps3_pretrain", model={"preset": preset},
                 train={"globalBatch": micro_batch, "steps": 1, **train})


def _one_rank_group(device: torch.device) -> WorldInfo:
    """FSDP2 needs a process group even on one GPU: a group of one, as torchrun would make."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    return WorldInfo(rank=0, world_size=1, local_rank=0, restart_count=0, device=device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_row(name: str, train: dict, args, device: torch.device, world: WorldInfo, flops_per_sample: float,
             peak_flops: float) -> Row:
    """Warm-up, then the best of `args.steps` timed steps (forward, backward, AdamW step)."""
    stage = _stage(args.preset, args.micro_batch, train)
    row = Row(name, estimate_gb=estimate_stage(stage, Pool()).memory.total / GIB)
    torch.manual_seed(0)
    probe = build_probe(stage, device)
    model = parallelize(probe.model, world, ParallelizeConfig.from_train(stage.train))
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), probe.model.no_weight_decay_keys), lr=1e-5,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_autocast(model, stage.train.precision))
    batch = probe.batch(args.micro_batch)

    def step() -> None:
        with autocast:
            loss = probe.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(args.warmup + (2 if train.get("compile") else 0)):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        row.note = "out of GPU memory"
        return row
    finally:
        del model, optimizer, probe, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.step_s = min(times)
    row.samples_per_s = args.micro_batch / row.step_s
    row.mfu = flops_per_sample * row.samples_per_s / peak_flops
    if device.type == "cuda":
        row.peak_gb = torch.cuda.max_memory_allocated(device) / GIB
    elif stage.train.parallelism == "ddp":  # the profiler measures the unwrapped model only
        row.peak_gb = _cpu_peak(stage, args.micro_batch) / GIB
    return row


def _cpu_peak(stage: Stage, micro_batch: int) -> int:
    """Peak bytes of a warm CPU step from torch.profiler's memory timeline (what the CPU
    allocator reported), the CPU's stand-in for `torch.cuda.max_memory_allocated`."""
    torch.manual_seed(0)
    return cpu_peak_bytes(training_step(build_probe(stage, "cpu"), micro_batch, stage.train.activation_checkpointing))


def _input_rows(args, device: torch.device) -> list[Row]:
    """The input path alone: one micro-batch of the loader's pixels to normalised device tensors."""
    from ps3.data import normalize_images

    p = build_probe(_stage(args.preset, args.micro_batch, {}), "meta").batch(args.micro_batch)
    shapes = {k: [t.shape for t in v] if isinstance(v, list) else v.shape for k, v in p.items()
              if k in ("lowres", "selection_view", "highres", "hr_patches")}
    rows = []
    for name, dtype, pinned in (("input: float32 from host", torch.float32, False),
                                ("input: uint8 pinned, normalised on device", torch.uint8, True)):
        host = {k: [torch.zeros(s, dtype=dtype) for s in v] if isinstance(v, list) else torch.zeros(v, dtype=dtype)
                for k, v in shapes.items()}
        if pinned and device.type == "cuda":
            host = {k: [t.pin_memory() for t in v] if isinstance(v, list) else v.pin_memory() for k, v in host.items()}

        def copy() -> None:
            moved = {k: [t.to(device, non_blocking=pinned) for t in v] if isinstance(v, list)
                     else v.to(device, non_blocking=pinned) for k, v in host.items()}
            normalize_images(moved)
            _sync(device)

        size = sum(t.numel() * t.element_size() for v in host.values() for t in (v if isinstance(v, list) else [v]))
        row = Row(name, note=f"{size / 2**20:.0f} MiB per micro-batch through shared memory")
        if device.type == "cuda":  # on CPU there is no copy to time
            copy()
            start = time.perf_counter()
            for _ in range(args.steps):
                copy()
            row.step_s = (time.perf_counter() - start) / args.steps
            row.samples_per_s = args.micro_batch / row.step_s
        rows.append(row)
    return rows


def _peak_flops(device: torch.device) -> float:
    """The h100 pool's `gpuPeakTflops` on CUDA (the same dense bf16 figure for an H200);
    on CPU a nominal 100 GFLOP/s, as the trainer uses."""
    if device.type != "cuda":
        return 1e11
    pool = load_pools().pools.get("h100")
    return (pool.gpu_peak_tflops if pool and pool.gpu_peak_tflops else 989.0) * 1e12


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (CPU: the tiny preset)")
    parser.add_argument("--preset", help="default: ps3-4k-siglip on CUDA, ps3-tiny on CPU")
    parser.add_argument("--micro-batch", type=int, help="samples per GPU per step (default: 32 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per row (best is reported)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("ps3-4k-siglip" if device.type == "cuda" else "ps3-tiny")
    args.micro_batch = args.micro_batch or (32 if device.type == "cuda" else 8)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = 2 if args.quick else 3

    from ps3.model import get_preset

    preset = get_preset(args.preset)
    counted = counted_flops_per_sample(preset)
    analytic = analytic_flops_per_sample(preset)
    peak_flops = _peak_flops(device)
    world = _one_rank_group(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.preset} on {name}, micro-batch {args.micro_batch}, best of {args.steps} steps, "
          f"{counted / 1e9:.2f} GFLOP per sample (FLOP counter; hand count {analytic / 1e9:.2f}), "
          f"MFU against {peak_flops / 1e12:g} TFLOP/s")

    rows = [_run_row(n, t, args, device, world, counted, peak_flops) for n, t in (GPU_ROWS if device.type == "cuda"
                                                                                  else CPU_ROWS)]
    rows += _input_rows(args, device)
    print("| option | step s | samples/s | MFU | peak GiB | estimate GiB | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {_fmt(r.step_s, '.4f')} | {_fmt(r.samples_per_s, '.1f')} | {_fmt(r.mfu, '.3f')} | "
              f"{_fmt(r.peak_gb, '.3f')} | {_fmt(r.estimate_gb, '.3f')} | {r.note} |")

    measured = [r for r in rows if r.peak_gb and r.estimate_gb]
    worst = max(measured, key=lambda r: abs(r.estimate_gb / r.peak_gb - 1)) if measured else None
    result = {
        "device": name, "preset": args.preset, "micro_batch": args.micro_batch,
        "flops_per_step": counted * args.micro_batch,
        "flop_counter_vs_analytic": round(counted / analytic - 1, 5),
        "estimate_vs_measured_memory": round(worst.estimate_gb / worst.peak_gb - 1, 4) if worst else None,
    }
    if device.type == "cuda":
        best = max((r for r in rows if r.mfu is not None), key=lambda r: r.mfu, default=None)
        if best is not None:
            result |= {"mfu": round(best.mfu, 4), "peak_memory_gb": round(best.peak_gb, 2),
                       "samples_per_s": round(best.samples_per_s, 2), "best_option": best.name}
    if dist.is_initialized():
        dist.destroy_process_group()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
