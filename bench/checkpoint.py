"""Checkpoint benchmark: training stall of an async sharded save to S3 vs a synchronous torch.save.

One run, one SeaweedFS S3 server on loopback, one model + AdamW state (>= 1 GB, or
~150 MB with --quick). Measured side by side:

- baseline: `torch.save` of the same state into an s3fs file on the same server (the
  training is blocked for all of it);
- `Checkpointer(async_save=True).save()`: how long the call blocks (the stall), and how
  long until the step is committed in the background;
- `Checkpointer(async_save=False).save()`: the synchronous sharded save, for reference;
- restore: `Checkpointer.load()` from S3 (MB/s), next to `torch.load` from an s3fs file.

The last line printed is one JSON object: stall_ratio (async stall / torch.save time),
restore_mb_per_s, state_bytes and the raw timings. Goal: stall_ratio <= 0.10.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ps3_platform.runtime.checkpoint import Checkpointer
from ps3_platform.runtime.state import ModelAndOptimizer
from ps3_platform.testing import SeaweedS3
from torch import nn

WIDTH = 2048  # each layer: 2048 x 2048 weights + bias, fp32


def build(n_layers: int, seed: int | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of linear layers with AdamW whose moments are populated (as after a real step)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(n_layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3) if seed is None else torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for per_param in optimizer.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def torch_save_baseline(server: SeaweedS3, model, optimizer, key: str) -> tuple[float, float]:
    """Seconds of a synchronous torch.save to S3 and of the torch.load back."""
    fs = server.filesystem(skip_instance_cache=True)

    def save() -> None:
        with fs.open(key, "wb") as f:
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, f)

    def load() -> None:
        with fs.open(key, "rb") as f:
            torch.load(f, weights_only=True)

    return timed(save), timed(load)


def checkpointer(uri: str, stage: str, async_save: bool) -> Checkpointer:
    return Checkpointer(uri=uri, job="bench", stage=stage, keep=2, keep_every=None,
                        async_save=async_save, rank=0, world_size=1)


#: What the test server can hold: SeaweedS3 runs at most 50 volumes of 64 MB, and deleted
#: objects are not reclaimed within a run, so the benchmark plans its writes to fit.
STORE_CAPACITY = 3.0e9


def run(n_layers: int, saves: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ps3-bench-ckpt-"))
    server = SeaweedS3(tmp / "s3").start()
    try:
        os.environ.update(server.env)
        uri = server.make_bucket("bench")
        model, optimizer = build(n_layers, seed=0)
        nbytes = state_bytes(model, optimizer)
        saves = max(1, min(saves, int((STORE_CAPACITY - nbytes) // nbytes)))
        sync_s, torch_load_s = torch_save_baseline(server, model, optimizer, "bench/baseline/state.pt")

        async_ck = checkpointer(uri, "async", True)
        stalls, commits = [], []
        for step in range(1, saves + 1):
            started = time.perf_counter()
            async_ck.save(step, {"app": ModelAndOptimizer(model, optimizer)})
            stalls.append(time.perf_counter() - started)
            async_ck.wait()
            commits.append(time.perf_counter() - started)

        dcp_sync_s = None
        if (saves + 2) * nbytes <= STORE_CAPACITY:
            sync_ck = checkpointer(uri, "sync", False)
            dcp_sync_s = timed(lambda: sync_ck.save(1, {"app": ModelAndOptimizer(model, optimizer)}))
            sync_ck.close()

        restored, restored_opt = build(n_layers, seed=None)
        load_s = timed(lambda: async_ck.load({"app": ModelAndOptimizer(restored, restored_opt)}))
        exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
        async_ck.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    stall = statistics.mean(stalls)
    return {
        "state_bytes": nbytes, "torch_save_s": sync_s, "torch_load_s": torch_load_s,
        "async_stall_s": stall, "async_stall_first_s": stalls[0], "async_commit_s": statistics.mean(commits),
        "dcp_sync_save_s": dcp_sync_s, "restore_s": load_s, "restore_exact": exact,
        "stall_ratio": stall / sync_s, "restore_mb_per_s": nbytes / 1e6 / load_s,
        "torch_load_mb_per_s": nbytes / 1e6 / torch_load_s, "saves": saves,
    }


def print_table(r: dict) -> None:
    mb = r["state_bytes"] / 1e6
    rows = [
        ("torch.save -> S3 (sync, baseline)", r["torch_save_s"], "training blocked throughout"),
        ("Checkpointer async: save() stall", r["async_stall_s"],
         f"mean of {r['saves']}; first save {r['async_stall_first_s']:.2f}s"),
        ("Checkpointer async: until committed", r["async_commit_s"], "upload runs in background"),
        ("Checkpointer sync save (committed)", r["dcp_sync_save_s"],
         "reference" if r["dcp_sync_save_s"] is not None else "skipped: test store too small"),
        ("torch.load <- S3 (baseline)", r["torch_load_s"], f"{r['torch_load_mb_per_s']:.0f} MB/s"),
        ("Checkpointer.load <- S3", r["restore_s"], f"{r['restore_mb_per_s']:.0f} MB/s, exact={r['restore_exact']}"),
    ]
    print(f"\ncheckpoint benchmark: state {mb:.0f} MB (model + AdamW), SeaweedFS S3 on loopback")
    print(f"{'operation':<40}{'seconds':>10}  note")
    for name, seconds, note in rows:
        shown = f"{seconds:>10.2f}" if seconds is not None else f"{'-':>10}"
        print(f"{name:<40}{shown}  {note}")
    print(f"\nstall ratio (async stall / torch.save): {r['stall_ratio']:.3f}  (goal <= 0.10)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~150 MB state, under a minute")
    parser.add_argument("--layers", type=int, help="override the number of 2048x2048 layers (12 B/param each)")
    parser.add_argument("--saves", type=int, default=2, help="async saves to average the stall over")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    n_layers = args.layers or (3 if args.quick else 22)  # 12 bytes/param: ~151 MB or ~1.1 GB
    result = run(n_layers, args.saves)
    print_table(result)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
