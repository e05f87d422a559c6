"""Human-readable status output (rich tables); `-o json` bypasses all of this."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich import box
from rich.console import Console
from rich.table import Column, Table

from .base import JobStatus

EVAL_LABELS = {
    "retrieval_r1": "local retrieval R@1 (high-res, trained)",
    "retrieval_r1_lowres": "local retrieval R@1 (low-res features only)",
    "retrieval_r1_untrained": "local retrieval R@1 (untrained model)",
    "recall_topdown": "patch-selection recall, top-down",
    "recall_bottomup": "patch-selection recall, bottom-up",
    "recall_random": "patch-selection recall, random",
}

#: The key the data loader counts retried reads under, beside its skips (`RETRY_COUNT_KEY` in
#: ps3/data/retry.py; the control plane does not import the science package).
READ_RETRIES = "read_retries"


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def progress_printer() -> Callable[[JobStatus], None]:
    """What `submit --wait` prints while it waits: the progress line, each time it changes."""
    last = ""

    def show(status: JobStatus) -> None:
        nonlocal last
        line = progress_line(status)
        if line != last:
            print(line, flush=True)
            last = line

    return show


def _data_trouble(failures: dict, skipped: str) -> str:
    """' (3 bad samples skipped, 8 read retries)', or '' when reads were clean.

    The loader counts reads retried through a storage outage beside its skips, in the same
    counts: a retried read still delivered its sample, so adding it to the skips would show
    an outage that lost nothing as lost data.
    """
    bad = sum(n for kind, n in failures.items() if kind != READ_RETRIES)
    retries = failures.get(READ_RETRIES, 0)
    parts = [f"{bad} {skipped}"] if bad else []
    if retries:
        parts.append(f"{retries} read {'retry' if retries == 1 else 'retries'}")
    return f" ({', '.join(parts)})" if parts else ""


def progress_line(status: JobStatus) -> str:
    """One line per job for `submit --wait`: phase, then each stage's step, rate and troubles."""
    parts = [f"{status.name}: {status.phase}"]
    for stage in status.stages:
        if stage.phase == "Running" and stage.step is not None and stage.unit == "images":
            parts.append(f"{stage.name} {stage.step}/{stage.total_steps} images {_fmt(stage.samples_per_s, '.2f')} "
                         f"images/s ETA {_eta(stage.eta_s)}" + _data_trouble(stage.failures, "skipped"))
        elif stage.phase == "Running" and stage.message.startswith("stalled"):
            parts.append(f"{stage.name} {stage.message}")
        elif stage.phase == "Running" and stage.step is not None:
            parts.append(f"{stage.name} step {stage.step}/{stage.total_steps} loss {_fmt(stage.loss, '.4f')} "
                         f"{_fmt(stage.samples_per_s, '.1f')} samples/s ETA {_eta(stage.eta_s)}"
                         + _data_trouble(stage.failures, "bad samples skipped"))
        elif stage.message.startswith("waiting:"):
            parts.append(f"{stage.name} {stage.phase}, {stage.message}")
        else:
            parts.append(f"{stage.name} {stage.phase}")
        if stage.storage:
            parts.append(f"{stage.name} {stage.storage}")
    return " | ".join(parts)


def print_status(status: JobStatus, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{status.name}[/bold] ({status.kind}, {status.backend}): [bold]{status.phase}[/bold]")
    if status.message:
        console.print(status.message, soft_wrap=True)
    table = Table("STAGE", "PHASE", "STEP", "LOSS", "SAMPLES/S", "ETA", "RESTARTS")
    for s in status.stages:
        step = f"{s.step}/{s.total_steps}" if s.step is not None else f"-/{_fmt(s.total_steps)}"
        if s.unit == "images":
            step += " images"
        phase = "Running (stalled)" if s.phase == "Running" and s.message.startswith("stalled") else s.phase
        table.add_row(s.name, phase, step, _fmt(s.loss, ".4f"), _fmt(s.samples_per_s, ".1f"), _eta(s.eta_s),
                      str(s.restarts))
    console.print(table)
    for s in status.stages:
        if s.phase == "Running" and s.message.startswith("stalled") or s.message.startswith("waiting:"):
            console.print(f"{s.name}: {s.message}", soft_wrap=True)
        if s.storage:
            console.print(f"{s.name}: {s.storage}", soft_wrap=True)
        if s.restart_to_first_step_s is not None or s.lost_steps:
            console.print(f"{s.name}: last restart: first step {_fmt(s.restart_to_first_step_s, '.1f')} s after "
                          f"the worker started, {_fmt(s.lost_steps)} steps recomputed", soft_wrap=True)
    if status.eval:
        print_eval(status.eval, console)
    for stage, summary in status.curation.items():
        print_curation(stage, summary, console)
    if status.checkpoints:
        console.print(f"checkpoints: {status.checkpoints}", soft_wrap=True)


def print_eval(evaluation: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table("EVALUATION", "VALUE", title="evaluation (held-out shards)")
    for key, value in evaluation.items():
        if isinstance(value, float):
            table.add_row(EVAL_LABELS.get(key, key), f"{value:.3f}")
        elif isinstance(value, int):
            table.add_row(EVAL_LABELS.get(key, key), str(value))
    if table.row_count:
        console.print(table)
    if isinstance(evaluation.get("pictures"), str):
        console.print(f"selection maps (top-down vs bottom-up): {evaluation['pictures']}", soft_wrap=True)
    if evaluation.get("sweep"):
        print_sweep(evaluation, console)


def print_sweep(evaluation: dict, console: Console) -> None:
    """A vila_hd_eval stage's results: one row per benchmark and selection setting (paper tables 7-8)."""
    # short headers and no folding: the table fits an 80-column terminal
    table = Table(*(Column(h, no_wrap=True) for h in ("BENCHMARK", "SETTING", "%PATCH", "ACC", "RECALL",
                                                      "TOK/IMG", "MS/Q", "N")),
                  title="benchmarks by selection setting", box=box.SIMPLE_HEAD)
    for row in evaluation["sweep"]:
        table.add_row(row["benchmark"], row["setting"], f"{row['patches_pct']:.1f}", f"{row['accuracy']:.3f}",
                      _fmt(row["recall"], ".3f"), f"{row['tokens_per_image']:.0f}",
                      f"{1000 * row['latency_s_per_question']:.1f}", str(row["n"]))
    console.print(table)
    for name, bench in evaluation.get("benchmarks", {}).items():
        problems = bench.get("problems", {})
        if problems.get("count"):
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(problems.get("by_kind", {}).items()))
            console.print(f"{name}: {problems['count']} questions not scored ({kinds}); listed in eval.json",
                          soft_wrap=True)
    console.print(f"plot: {evaluation['sweep_plot']}", soft_wrap=True)


def print_curation(stage: str, summary: dict, console: Console | None = None) -> None:
    """A curate stage's output per source: the columns of the PS3 paper's table 9."""
    console = console or Console()
    table = Table("SOURCE", "KIND", "IMAGES", "BOXES/IMAGE", "MEAN BOX (px)", "CAPTIONS/IMAGE", "SKIPPED",
                  title=f"curation ({stage})")
    for name, s in summary.get("sources", {}).items():
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(s.get("skipped", {}).items())) or "-"
        table.add_row(name, s["kind"], str(s["images"]), f"{s['boxes_per_image']:.2f}",
                      f"{s['mean_box_w']:.0f}x{s['mean_box_h']:.0f}", f"{s['captions_per_image']:.2f}", skipped)
    console.print(table)
    if summary.get("failures"):
        console.print("skipped inputs by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["failures"].items())))


def print_list(jobs: list[JobStatus], console: Console | None = None) -> None:
    console = console or Console()
    table = Table("NAME", "KIND", "BACKEND", "PHASE", "STAGES")
    for job in jobs:
        table.add_row(job.name, job.kind, job.backend, job.phase,
                      ", ".join(f"{s.name}:{s.phase}" for s in job.stages))
    console.print(table)


def print_summary(status: JobStatus, spec_file: str, console: Console | None = None) -> None:
    """What `submit --wait` ends with: the result, the evaluation, where things are, what next."""
    console = console or Console()
    console.print()
    print_status(status, console)
    console.print(f"logs: platformctl logs {status.name} [--stage S] [--rank R]", soft_wrap=True)
    what, spec = (("VILA-HD training", "jobs/vila_hd_4k.yaml") if status.name.startswith("vila-hd")
                  else ("pre-training", "jobs/ps3_4k.yaml"))
    console.print(f"run the same {what} on a cluster: platformctl render {spec} "
                  f"(then platformctl submit {spec} --backend kubernetes)", soft_wrap=True)
