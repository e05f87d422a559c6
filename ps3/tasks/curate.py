"""`curate`: raw images and documents -> PS3 pre-training shards (paper section 2.1, appendix A).

The stage's workers form one Ray cluster (`ps3.curation.ray_cluster`) and rank 0 drives
the pipeline (`ps3.curation.pipeline`). Progress goes where a training stage's does: a
line in `metrics.jsonl` (images done of total, images/s; what `platformctl status`
shows), `ps3_curate_*` metrics, and at the end the per-source summary in
`curation.json` beside them and in `{output}/_curation/summary.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

from ps3.curation.config import CurationConfig, check_params
from ps3.curation.inputs import InputError
from ps3.curation.pipeline import Progress, curate, plan_inputs
from ps3.data.fs import filesystem, join
from ps3_platform.runtime.metrics import JsonlLog
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState
from ps3_platform.spec.models import CURATION_RECORD


DONE_FLAG = "_curation/driver-done"


def _reporter(ctx: RunContext, log: JsonlLog):
    """Progress to metrics, to metrics.jsonl (local status) and, at every committed shard, to the
    log as `N/T images R images/s`, which the Kubernetes backend's status reads from rank 0's pod."""
    metrics = ctx.metrics
    counted: Counter = Counter()  # progress.failures already added to ps3_curate_failures_total

    def report(progress: Progress, source: str | None, outcomes: dict | None) -> None:
        rate = progress.images_per_s
        metrics.get("ps3_curate_images_planned").set(progress.total)
        metrics.get("ps3_curate_images_done").set(progress.done)
        metrics.get("ps3_curate_images_per_second").set(rate)
        for outcome in (outcomes or {}).values():
            metrics.get("ps3_curate_images_total", source=source, outcome=outcome["status"]).inc()
            if outcome["status"] == "written":
                metrics.get("ps3_curate_boxes_total", source=source).inc(outcome["boxes"])
        # by kind, from the one count the log and metrics.jsonl show too: inputs that failed at
        # listing (pdf_error, read_error), skipped inputs, boxes dropped for want of a caption
        new = progress.failures - counted
        for kind, n in new.items():
            metrics.get("ps3_curate_failures_total", kind=kind).inc(n)
        counted.update(new)
        if outcomes is not None:
            ctx.log.info("curate %d/%d images %.3f images/s", progress.done, progress.total, rate)
        log.write({"step": progress.done, "total": progress.total, "loss": None, "unit": "images",
                   "samples_per_s": round(rate, 3), "step_seconds": round(1 / rate, 4) if rate > 0 else None,
                   "failures": dict(progress.failures)})

    return report


def _check_tesseract(config: CurationConfig) -> None:
    """OCR runs in Ray actors; without Tesseract they would die with a traceback each."""
    if config.captions.captioner != "ocr" and not any(
            s.kind == "document" and s.ocr == "tesseract" for s in config.sources):
        return
    from ps3.curation.models.ocr import TesseractUnavailable, check_tesseract

    try:
        check_tesseract(config.documents.lang)
    except TesseractUnavailable as exc:
        raise TaskSetupError(str(exc)) from None


def _outcome_flag(config: CurationConfig):
    """How rank 0 tells the other ranks that the pipeline ended: "ok" or "failed" under the output."""
    fs, path = filesystem(join(config.output, DONE_FLAG))

    def read() -> str | None:
        try:
            return fs.cat_file(path).decode().strip() or None
        except FileNotFoundError:
            return None

    def write(state: str | None) -> None:
        if state is None:
            if fs.exists(path):
                fs.rm(path)
            return
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, state.encode())

    return read, write


def build(ctx: RunContext) -> TaskState:
    problems = check_params(ctx.params, remote=True)  # validate's checks, plus weights on object storage
    if problems:
        path, message = problems[0]
        raise TaskSetupError(f"spec params.{'.'.join(str(p) for p in path)}: {message}")
    config = CurationConfig.model_validate(ctx.params)
    _check_tesseract(config)
    res = ctx.stage.resources
    gpus = res.gpus_per_node // res.nproc
    if gpus and config.workers.gpus_per_actor == 0:  # the pool has GPUs: put the models on them
        config.workers.gpus_per_actor = 1.0
    read_outcome, write_outcome = _outcome_flag(config)
    env_cpus = int(os.environ.get("PS3_CURATE_CPUS", 0))
    cpus = env_cpus or (None if res.nproc == 1 else max(1, (os.cpu_count() or 2) // res.nproc))
    temp_dir = os.environ.get("PS3_RAY_TMP") or tempfile.gettempdir() + f"/ray-{ctx.job[:20]}"

    def drive() -> dict:
        """Rank 0, once Ray is up: plan, curate, say how it ended (the other ranks wait for that)."""
        from ps3.curation.ray_adapter import ResourceError

        log = JsonlLog(ctx.run_dir / "metrics.jsonl")
        try:
            summary = curate(config, plan_inputs(config), Progress(report=_reporter(ctx, log)))
        except (InputError, ResourceError) as exc:  # an unreachable source, pools that cannot be placed
            write_outcome("failed")
            raise TaskSetupError(str(exc)) from None
        except BaseException:
            write_outcome("failed")
            raise
        write_outcome("ok")
        log.write({"event": "completed", "step": sum(s["inputs"] for s in summary["sources"].values())})
        log.close()
        (ctx.run_dir / CURATION_RECORD).write_text(json.dumps(summary, indent=2, sort_keys=True))
        _record(ctx, summary)
        ctx.log.info("curation summary: %s", json.dumps(summary, sort_keys=True))
        return summary

    def run() -> dict:
        from ps3.curation import ray_cluster

        ray_cluster.disable_implicit_auth()
        if ctx.world_size == 1:
            with ray_cluster.embedded(cpus, gpus, temp_dir):
                return drive()
        try:
            if ctx.rank == 0:
                write_outcome(None)  # before the head starts: no node can read last run's outcome
                with ray_cluster.head(ctx.world_size, ctx.local_rank, res.nproc, cpus, gpus, temp_dir):
                    return drive()
            ray_cluster.join(ctx.local_rank, res.nproc, cpus, gpus, temp_dir, read_outcome)
            return {}
        except ray_cluster.RayClusterError as exc:  # retryable (a restart re-forms the cluster): exit 1, one line
            ctx.log.error("%s", exc)
            raise SystemExit(1) from None

    return TaskState(run=run)


def _record(ctx: RunContext, summary: dict) -> None:
    """The summary beside the stage's checkpoints, where `platformctl status` on a cluster
    reads it (the run directory is the pod's own). A store that refuses it costs only that."""
    import fsspec

    uri = f"{ctx.record_uri}/{CURATION_RECORD}"
    try:
        with fsspec.open(uri, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
    except (OSError, ValueError) as exc:
        ctx.log.warning("could not write the curation summary to %s: %s", uri, exc)
