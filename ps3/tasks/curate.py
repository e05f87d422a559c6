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

from ps3.curation.config import CurationConfig, check_params
from ps3.curation.inputs import InputError
from ps3.curation.pipeline import Progress, curate, plan_inputs
from ps3.data.fs import filesystem, join
from ps3_platform.runtime.metrics import JsonlLog
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState


DONE_FLAG = "_curation/driver-done"


def _reporter(ctx: RunContext, log: JsonlLog):
    metrics = ctx.metrics

    def report(progress: Progress, source: str | None, outcomes: dict | None) -> None:
        rate = progress.images_per_s
        metrics.get("ps3_curate_images_planned").set(progress.total)
        metrics.get("ps3_curate_images_done").set(progress.done)
        metrics.get("ps3_curate_images_per_second").set(rate)
        for outcome in (outcomes or {}).values():
            metrics.get("ps3_curate_images_total", source=source, outcome=outcome["status"]).inc()
            if outcome["status"] == "written":
                metrics.get("ps3_curate_boxes_total", source=source).inc(outcome["boxes"])
            else:
                metrics.get("ps3_curate_failures_total", kind=outcome["reason"]).inc()
        log.write({"step": progress.done, "total": progress.total, "loss": None, "unit": "images",
                   "samples_per_s": round(rate, 3), "step_seconds": round(1 / rate, 4) if rate > 0 else None,
                   "failures": dict(progress.failures)})

    return report


def build(ctx: RunContext) -> TaskState:
    problems = check_params(ctx.params, remote=True)  # validate's checks, plus weights on object storage
    if problems:
        path, message = problems[0]
        raise TaskSetupError(f"spec params.{'.'.join(str(p) for p in path)}: {message}")
    config = CurationConfig.model_validate(ctx.params)
    gpus = ctx.stage.resources.gpus_per_node
    if gpus and config.workers.gpus_per_actor == 0:  # the pool has GPUs: put the models on them
        config.workers.gpus_per_actor = 1.0
    done_fs, done_path = filesystem(join(config.output, DONE_FLAG))
    plan = None
    if ctx.rank == 0:  # an unreachable or empty source fails here, before Ray starts
        try:
            plan = plan_inputs(config)
        except InputError as exc:
            raise TaskSetupError(str(exc)) from None

    def run() -> dict:
        from ps3.curation.ray_cluster import ray_cluster

        if ctx.rank == 0 and done_fs.exists(done_path):
            done_fs.rm(done_path)
        cpus = int(os.environ.get("PS3_CURATE_CPUS", 0)) or max(1, (os.cpu_count() or 2) // ctx.stage.resources.nproc)
        temp_dir = os.environ.get("PS3_RAY_TMP") or tempfile.gettempdir() + f"/ray-{ctx.job[:20]}"
        with ray_cluster(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank, num_cpus=cpus,
                         num_gpus=gpus // ctx.stage.resources.nproc, temp_dir=temp_dir,
                         done=lambda: done_fs.exists(done_path)) as driver:
            if not driver:
                return {}
            log = JsonlLog(ctx.run_dir / "metrics.jsonl")
            try:
                summary = curate(config, plan, Progress(report=_reporter(ctx, log)))
            finally:
                done_fs.makedirs(done_path.rsplit("/", 1)[0], exist_ok=True)
                done_fs.pipe_file(done_path, b"done")
            log.write({"event": "completed", "step": sum(s["inputs"] for s in summary["sources"].values())})
            log.close()
        (ctx.run_dir / "curation.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        ctx.log.info("curation summary: %s", json.dumps(summary, sort_keys=True))
        return summary

    return TaskState(run=run)
