"""Worker processes for the checkpoint tests (run as a script, one process per rank).

Scenarios:
  roundtrip URI OUT   2 ranks (gloo, DDP): train, save sync and async (training goes on
                      while the async upload runs), reload into fresh objects, compare
                      bit-exact; writes OUT/result-rank{r}.json and OUT/expected-{mode}.pt
  load1 URI OUT       1 process: load what 2 ranks wrote into a plain (non-DDP) model and
                      compare with OUT/expected-{mode}.pt; writes OUT/load1.json
  killmid URI OUT     1 process: commit step 1, then start an async save of step 2 whose
                      upload stops after its first file; touches OUT/uploading and waits to
                      be killed (SIGKILL) there
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from ps3_platform.runtime import storage
from ps3_platform.runtime.checkpoint import Checkpointer
from ps3_platform.runtime.state import Counters, ModelAndOptimizer, rng_state
from torch import nn

JOB = "ckpt-test"


class DataPosition:
    """A stateful data iterator stand-in: position, shard order and a nested dict."""

    def __init__(self, position: int = 0):
        self.position = position
        self.order = [3, 1, 2]
        self.extra = {"epoch": 0, "source": "a"}

    def advance(self) -> None:
        self.position += 4
        self.order = self.order[1:] + self.order[:1]
        self.extra = {"epoch": self.position // 8, "source": "b" if self.position % 8 else "a"}

    def state_dict(self) -> dict:
        return {"position": self.position, "order": list(self.order), "extra": dict(self.extra)}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.order, self.extra = state["position"], list(state["order"]), dict(state["extra"])


def build(seed: int, distributed: bool):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=10)
    return model, optimizer, scheduler, DataPosition(), Counters(spec_hash=f"hash-{seed}")


def train(model, optimizer, scheduler, data, counters, steps: int, rank: int) -> None:
    for _ in range(steps):
        generator = torch.Generator().manual_seed(1000 * rank + counters.step)
        x = torch.randn(4, 6, generator=generator)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        data.advance()
        counters.step += 1
        counters.samples += 4


def snapshot(model, optimizer, scheduler, data, counters, rng: dict) -> dict:
    """Plain copies of everything a checkpoint must restore (what the test compares)."""
    module = model.module if hasattr(model, "module") else model
    return {
        "model": {k: v.clone() for k, v in module.state_dict().items()},
        "optim": _clone(optimizer.state_dict()),
        "scheduler": _clone(scheduler.state_dict()),
        "data": data.state_dict(),
        "counters": counters.state_dict(),
        "rng": rng,
    }


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two snapshots differ (tensors compared bit-exact, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if hasattr(a, "__array__") or hasattr(b, "__array__"):
        import numpy as np

        return [] if np.array_equal(a, b) else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def state_of(model, optimizer, scheduler, data, counters) -> dict:
    return {"app": ModelAndOptimizer(model, optimizer), "scheduler": scheduler, "data": data, "counters": counters}


def roundtrip(uri: str, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    result: dict = {"rank": rank}
    for mode in ("sync", "async"):
        objects = build(seed=0, distributed=True)
        train(*objects, steps=3, rank=rank)
        ck = Checkpointer(uri=uri, job=JOB, stage=mode, keep=3, keep_every=None, async_save=mode == "async",
                          rank=rank, world_size=world)
        torch.manual_seed(77 + rank)  # distinct per-rank generators, as the runtime has them
        rng = rng_state()
        expected = snapshot(*objects, rng=rng)
        started = time.perf_counter()
        ck.save(3, state_of(*objects), {"rng": rng})
        result[f"{mode}_save_s"] = time.perf_counter() - started
        train(*objects, steps=2, rank=rank)  # changes weights while an async upload may still run
        ck.wait()
        if rank == 0:
            torch.save(expected, out / f"expected-{mode}.pt")
        fresh = build(seed=1, distributed=True)
        reader = Checkpointer(uri=uri, job=JOB, stage=mode, keep=3, keep_every=None, async_save=False,
                              rank=rank, world_size=world)
        step, rank_state = reader.load(state_of(*fresh))
        got = snapshot(*fresh, rng=rank_state["rng"] if rank_state else None)
        result[mode] = {"step": step, "latest": reader.latest_committed(), "diff": differences(expected, got)}
        ck.close()
        reader.close()
    (out / f"result-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def load1(uri: str, out: Path) -> None:
    """World size 1 (no process group) reading a checkpoint written by 2 DDP ranks."""
    result = {}
    for mode in ("sync", "async"):
        expected = torch.load(out / f"expected-{mode}.pt", weights_only=False)
        fresh = build(seed=2, distributed=False)
        ck = Checkpointer(uri=uri, job=JOB, stage=mode, keep=3, keep_every=None, async_save=False,
                          rank=0, world_size=1)
        step, rank_state = ck.load(state_of(*fresh))
        got = snapshot(*fresh, rng=expected["rng"])
        result[mode] = {"step": step, "rank_state": rank_state, "diff": differences(expected, got)}
    (out / "load1.json").write_text(json.dumps(result))


def killmid(uri: str, out: Path) -> None:
    """Commit step 1, then die (by the test's SIGKILL) in the middle of uploading step 2."""
    objects = build(seed=0, distributed=False)
    ck = Checkpointer(uri=uri, job=JOB, stage="kill", keep=5, keep_every=None, async_save=True,
                      rank=0, world_size=1)
    ck.save(1, state_of(*objects))
    ck.wait()
    real_put = storage.Location.put_file

    def put_then_hang(self, local, path):
        real_put(self, local, path)
        if "step-000000002" in path:
            (out / "uploading").write_text(path)
            time.sleep(600)  # the test kills us here, with one file of step 2 uploaded

    storage.Location.put_file = put_then_hang
    with torch.no_grad():
        for p in objects[0].parameters():
            p.add_(1.0)
    ck.save(2, state_of(*objects))
    time.sleep(600)


if __name__ == "__main__":
    scenario, uri, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    {"roundtrip": roundtrip, "load1": load1, "killmid": killmid}[scenario](uri, out)
