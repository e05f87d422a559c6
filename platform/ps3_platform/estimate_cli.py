"""`platformctl estimate`: per stage, what a spec will cost before it is submitted.

The numbers come from `ps3_platform.estimate` (the stage's model built on the meta device,
its FLOPs counted and one micro-batch's memory traced); this module adds the flags and
renders them: a rich table with one column per stage, or `-o json`.
"""

from __future__ import annotations

import argparse
import json

from rich import box
from rich.console import Console
from rich.table import Table

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the estimate package imports torch; building the CLI's parser (validate) must not
    from ps3_platform.estimate import StageEstimate

GIB = 2**30


def add_estimate_options(p: argparse.ArgumentParser) -> None:
    """The flags of `platformctl estimate` beside the shared spec options."""
    p.add_argument("--pool", default=None,
                   help="estimate every stage on this pool instead of its own (same nodes and processes)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation the step time and GPU-hours assume (default 0.4)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def run_estimate(job, pools, args: argparse.Namespace) -> int:
    """Estimate every stage of a loaded, checked job and print the result."""
    from ps3_platform.estimate import USABLE_MEMORY_FRACTION, estimate_job

    estimates = estimate_job(job, pools, pool=args.pool, mfu=args.mfu)
    if args.output == "json":
        print(json.dumps({"job": job.metadata.name, "mfu": args.mfu, "usableMemoryFraction": USABLE_MEMORY_FRACTION,
                          "stages": [e.to_dict() for e in estimates]}, indent=2))
    else:
        print_estimates(job.metadata.name, estimates, args.mfu)
    return 0


# ---- rendering ------------------------------------------------------------------------------
def _count(value: float | None) -> str:
    """1.03 B, 531 K: parameter and FLOP counts at a glance."""
    if value is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _gib(value: int | None) -> str:
    """GiB, or MiB below one GiB (a tiny model's figures would all read 0.00 GiB)."""
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def _rows(e: StageEstimate) -> list[tuple[str, str]]:
    """(label, value) of one stage, in the order the table shows them."""
    from ps3_platform.estimate import USABLE_MEMORY_FRACTION

    m = e.memory
    fits = "-" if e.fits is None else ("yes" if e.fits else "NO")
    return [
        ("task / pool", f"{e.task} / {e.pool}"),
        ("ranks, micro-batch x accumulation", f"{e.world_size}, {e.micro_batch} x {e.accumulation}"),
        ("parameters (trainable)", f"{_count(e.parameters)} ({_count(e.trainable)})"),
        ("FLOPs per sample / per step", f"{_count(e.flops_per_sample)} / {_count(e.flops_per_step)}"),
        ("memory per rank: parameters", _gib(m.parameters)),
        ("  gradients held", _gib(m.gradients)),
        ("  optimizer state", _gib(m.optimizer)),
        ("  activations (traced)", _gib(m.activations)),
        ("  FSDP gathered blocks", _gib(m.gathered)),
        ("  peak", _gib(m.total)),
        ("GPU memory (usable)", "-" if e.gpu_memory_bytes is None else
         f"{_gib(e.gpu_memory_bytes)} ({_gib(int(e.gpu_memory_bytes * USABLE_MEMORY_FRACTION))})"),
        ("fits / largest micro-batch that fits", f"{fits} / {'-' if e.max_micro_batch is None else e.max_micro_batch}"),
        ("step time", "-" if e.step_seconds is None else f"{e.step_seconds:.3g} s"),
        (f"steps, GPU-hours at MFU {e.mfu:g}", f"{e.steps}, {'-' if e.gpu_hours is None else f'{e.gpu_hours:,.1f}'}"),
        ("cost", "-" if e.cost is None else f"{e.cost:,.2f} ({e.price_per_gpu_hour:g}/GPU-hour)"),
    ]


def print_estimates(job_name: str, estimates: list[StageEstimate], mfu: float, console: Console | None = None) -> None:
    """One column per estimated stage; stages without numbers get a line each below."""
    console = console or Console(width=160)
    estimated = [e for e in estimates if e.note is None]
    if estimated:
        table = Table(title=f"{job_name}: estimate per stage (step time at MFU {mfu:g})", box=box.SIMPLE_HEAVY)
        table.add_column("")
        for e in estimated:
            table.add_column(e.stage, justify="right")
        rows = [_rows(e) for e in estimated]
        for i, (label, _) in enumerate(rows[0]):
            table.add_row(label, *(r[i][1] for r in rows))
        console.print(table)
    for e in estimates:
        if e.note is not None:
            console.print(f"{e.stage}: {e.note}", highlight=False)
