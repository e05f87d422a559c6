"""The three ps3-platform dashboards: GPU utilisation, training, node pools.

Joins (documented in ops/README.md):
  - GPU series (DCGM exporter, `namespace`/`pod` of the pod holding the GPU, `node` of
    the exporter) meet jobs through the recording rule `ps3:pod_job_info`, built from
    kube-state-metrics' kube_pod_labels (labels ps3_job, ps3_stage).
  - Nodes meet pools through `ps3:node_pool_info{pool=...}`, rendered by the Helm chart
    from its `pools` value (one rule per pool nodeSelector).
  - Training series (ps3_*) carry `job`/`stage` themselves.
Counters that only exist once something happened (bad samples) are written as
`... or 0 * <always-present series>` so a healthy job shows a zero line, not "No data".
"""

from __future__ import annotations

from grafana_json import Panel, Query, Row, Variable, dashboard

RATE = "$__rate_interval"
TRAIN = 'namespace=~"$namespace", job=~"$job", stage=~"$stage"'
BY_STAGE = "(namespace, job, stage)"
STAGE_LEGEND = "{{job}}/{{stage}}"
JOBINFO = 'ps3:pod_job_info{namespace=~"$namespace", ps3_job=~"$job", ps3_stage=~"$stage"}'
JOIN = f"* on (namespace, pod) group_left (ps3_job, ps3_stage) {JOBINFO}"
GPU_BY = "(namespace, ps3_job, ps3_stage)"
GPU_LEGEND = "{{ps3_job}}/{{ps3_stage}}"
GPU_LEGEND_PER_GPU = "{{node}} GPU {{gpu}} ({{ps3_job}}/{{ps3_stage}})"
POOL = 'ps3:node_pool_info{pool=~"$pool"}'
POOL_JOIN = f"* on (node) group_left (pool) {POOL}"


def job_variables() -> list[Variable]:
    """namespace -> job -> stage, each narrowing the next (values from the training series)."""
    return [
        Variable("namespace", "Namespace", "label_values(ps3_step, namespace)"),
        Variable("job", "Job", 'label_values(ps3_step{namespace=~"$namespace"}, job)'),
        Variable("stage", "Stage", 'label_values(ps3_step{namespace=~"$namespace", job=~"$job"}, stage)'),
    ]


def _per_job(metric: str, agg: str = "avg", scale: str = "") -> Query:
    return Query(f"{agg} by {GPU_BY} ({metric} {JOIN}){scale}", GPU_LEGEND)


def _per_gpu(metric: str) -> Query:
    return Query(f"{metric} {JOIN}", GPU_LEGEND_PER_GPU)


def gpu_dashboard() -> dict:
    per_job = Row("Per job stage", (
        Panel("GPU utilisation", (_per_job("DCGM_FI_DEV_GPU_UTIL"),), "percent",
              description="Mean DCGM_FI_DEV_GPU_UTIL over the GPUs of each job stage (coarse: a kernel ran)."),
        Panel("SM active", (_per_job("DCGM_FI_PROF_SM_ACTIVE"),), "percentunit",
              description="Share of cycles with at least one warp on an SM: the honest utilisation signal."),
        Panel("Tensor pipe active", (_per_job("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"),), "percentunit",
              description="Share of cycles the tensor cores were busy."),
        Panel("GPU memory used", (_per_job("DCGM_FI_DEV_FB_USED", "sum", " * 1048576"),), "bytes",
              description="Framebuffer in use, summed over the stage's GPUs (DCGM reports MiB)."),
        Panel("Power draw", (_per_job("DCGM_FI_DEV_POWER_USAGE", "sum"),), "watt"),
        Panel("GPUs in use", (Query(f"count by {GPU_BY} (DCGM_FI_DEV_GPU_UTIL {JOIN})", GPU_LEGEND),),
              "short", kind="stat"),
    ))
    per_gpu = Row("Per node and GPU", (
        Panel("GPU utilisation per GPU", (_per_gpu("DCGM_FI_DEV_GPU_UTIL"),), "percent"),
        Panel("SM active per GPU", (_per_gpu("DCGM_FI_PROF_SM_ACTIVE"),), "percentunit"),
        Panel("Tensor pipe active per GPU", (_per_gpu("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"),), "percentunit"),
        Panel("GPU memory used per GPU", (Query(
            f"(DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)) {JOIN}",
            GPU_LEGEND_PER_GPU),), "percentunit"),
        Panel("Power draw per GPU", (_per_gpu("DCGM_FI_DEV_POWER_USAGE"),), "watt"),
        Panel("GPU utilisation per node", (Query(
            f"avg by (node, ps3_job, ps3_stage) (DCGM_FI_DEV_GPU_UTIL {JOIN})",
            "{{node}} ({{ps3_job}}/{{ps3_stage}})"),), "percent", kind="table"),
    ))
    return dashboard("ps3-gpu-utilisation", "PS3 platform / GPU utilisation",
                     "DCGM exporter GPU metrics per job, stage, node and GPU.", job_variables(), (per_job, per_gpu))


def _train(expr: str, legend: str = STAGE_LEGEND) -> Query:
    return Query(expr, legend)


def _rate_ratio(num: str, den: str) -> str:
    return (f"sum by {BY_STAGE} (rate({num}{{{TRAIN}}}[{RATE}]))\n  / "
            f"sum by {BY_STAGE} (rate({den}{{{TRAIN}}}[{RATE}]))")


def _throughput_row() -> Row:
    buckets = f"rate(ps3_step_seconds_bucket{{{TRAIN}}}[{RATE}])"
    p90 = f"histogram_quantile(0.9, sum by (namespace, job, stage, le) ({buckets}))"
    return Row("Throughput", (
        Panel("Samples per second", (_train(f"sum by {BY_STAGE} (rate(ps3_samples_total{{{TRAIN}}}[{RATE}]))"),),
              "short", description="Samples consumed per second, summed over ranks."),
        Panel("Tokens per second", (_train(f"max by {BY_STAGE} (ps3_tokens_per_second{{{TRAIN}}})"),), "short"),
        Panel("Step time", (_train(_rate_ratio("ps3_step_seconds_sum", "ps3_step_seconds_count"),
                                   "mean {{job}}/{{stage}}"),
                            _train(p90, "p90 {{job}}/{{stage}}")), "s"),
        Panel("Data-wait share", (_train(_rate_ratio("ps3_data_wait_seconds_total", "ps3_step_seconds_sum")),),
              "percentunit", description="Share of step time spent waiting for the data loader (alert: > 25%)."),
        Panel("MFU", (_train(f"avg by {BY_STAGE} (ps3_mfu{{{TRAIN}}})"),), "percentunit",
              description="Model FLOPs utilisation estimate against the device's peak."),
        Panel("Progress", (_train(f"max by {BY_STAGE} (ps3_step{{{TRAIN}}})\n  / "
                                  f"max by {BY_STAGE} (ps3_total_steps{{{TRAIN}}})"),), "percentunit", kind="stat"),
    ))


def _optimisation_row() -> Row:
    return Row("Optimisation", (
        Panel("Loss", (_train(f"avg by {BY_STAGE} (ps3_loss{{{TRAIN}}})"),), "short"),
        Panel("Learning rate", (_train(f"max by {BY_STAGE} (ps3_learning_rate{{{TRAIN}}})"),), "short"),
        Panel("Gradient norm", (_train(f"max by {BY_STAGE} (ps3_grad_norm{{{TRAIN}}})"),), "short"),
        Panel("Non-finite losses (1h)", (_train(
            f"sum by {BY_STAGE} (increase(ps3_nonfinite_loss_total{{{TRAIN}}}[1h]))"),), "short", kind="stat"),
    ))


def _checkpoint_row() -> Row:
    mean_save = (f"sum by {BY_STAGE} (increase(ps3_checkpoint_save_seconds_sum{{{TRAIN}}}[1h]))\n  / "
                 f"sum by {BY_STAGE} (increase(ps3_checkpoint_save_seconds_count{{{TRAIN}}}[1h]))")
    return Row("Checkpoints and restarts", (
        Panel("Checkpoint age", (
            _train(f"max by {BY_STAGE} (ps3_checkpoint_age_seconds{{{TRAIN}}})"),
            _train(f"3 * ps3_job:checkpoint_interval_seconds{{{TRAIN}}}", "alert threshold {{job}}/{{stage}}")),
              "s", description="Seconds since the last committed checkpoint; the alert fires above the threshold."),
        Panel("Checkpoint save time", (
            _train(mean_save, "mean stall {{job}}/{{stage}}"),
            _train(f"max by {BY_STAGE} (ps3_checkpoint_upload_seconds{{{TRAIN}}})", "last upload {{job}}/{{stage}}")),
              "s", description="Training stall per save (mean over 1h) and the last (async) upload time."),
        Panel("Checkpoint size", (_train(f"sum by {BY_STAGE} (ps3_checkpoint_bytes{{{TRAIN}}})"),), "bytes"),
        Panel("Checkpoint failures (1h)", (_train(
            f"sum by {BY_STAGE} (increase(ps3_checkpoint_failures_total{{{TRAIN}}}[1h]))"),), "short", kind="stat"),
        Panel("Restarts", (_train(f"max by {BY_STAGE} (ps3_restarts{{{TRAIN}}})"),), "short",
              description="Times the run resumed from a checkpoint (alert: 3 within an hour)."),
        Panel("Restart cost", (
            _train(f"max by {BY_STAGE} (ps3_restart_to_first_step_seconds{{{TRAIN}}})",
                   "to first step (s) {{job}}/{{stage}}"),
            _train(f"max by {BY_STAGE} (ps3_lost_steps{{{TRAIN}}})", "steps recomputed {{job}}/{{stage}}")),
              "short", description="After the last restart: seconds from a worker's process start to its first "
                                   "step (slowest worker), and steps done past the checkpoint it resumed from."),
        Panel("Bad samples per second", (_train(
            f"sum by (namespace, job, stage, reason) (rate(ps3_data_bad_samples_total{{{TRAIN}}}[{RATE}]))\n"
            f"  or 0 * sum by {BY_STAGE} (rate(ps3_samples_total{{{TRAIN}}}[{RATE}]))",
            "{{job}}/{{stage}} {{reason}}"),), "short", description="Samples skipped as unreadable, by reason."),
    ))


def training_dashboard() -> dict:
    return dashboard("ps3-training", "PS3 platform / Training",
                     "Throughput, optimisation, checkpoints and data health of training jobs (runtime metrics).",
                     job_variables(), (_throughput_row(), _optimisation_row(), _checkpoint_row()))


def _pool_sum(expr: str) -> str:
    return f"sum by (pool) (\n  {expr}\n  {POOL_JOIN}\n)"


ALLOCATABLE = _pool_sum('kube_node_status_allocatable{resource="nvidia_com_gpu"}')
ALLOCATED = _pool_sum('sum by (node) (\n    kube_pod_container_resource_requests{resource="nvidia_com_gpu"}\n'
                      '    * on (namespace, pod) group_left () (kube_pod_status_phase{phase="Running"} == 1)\n  )')


def pools_dashboard() -> dict:
    variables = [*job_variables(), Variable("pool", "Pool", "label_values(ps3:node_pool_info, pool)")]
    capacity = Row("Capacity", (
        Panel("GPUs allocatable vs allocated", (Query(ALLOCATABLE, "{{pool}} allocatable"),
                                                Query(ALLOCATED, "{{pool}} allocated")), "short"),
        Panel("Unallocated GPUs", (Query(f"{ALLOCATABLE}\n- ({ALLOCATED} or 0 * {ALLOCATABLE})", "{{pool}}"),),
              "short", description="Allocatable GPUs no running pod requests."),
        Panel("Allocation ratio", (Query(f"{ALLOCATED}\n/ {ALLOCATABLE}", "{{pool}}"),), "percentunit", kind="stat"),
        Panel("Allocated but idle GPUs", (Query(_pool_sum('(DCGM_FI_DEV_GPU_UTIL{pod!=""} < bool 10)'), "{{pool}}"),),
              "short", description="GPUs held by a pod yet below 10% utilisation: capacity lost to waiting jobs."),
    ))
    usage = Row("Usage", (
        Panel("GPU utilisation per pool", (Query(
            f"avg by (pool) (\n  DCGM_FI_DEV_GPU_UTIL\n  {POOL_JOIN}\n)", "{{pool}}"),), "percent"),
        Panel("GPUs of the selected jobs per pool", (Query(_pool_sum(
            'kube_pod_container_resource_requests{resource="nvidia_com_gpu", namespace=~"$namespace"}\n'
            f'  * on (namespace, pod) group_left () {JOBINFO}'), "{{pool}}"),), "short"),
    ))
    return dashboard("ps3-node-pools", "PS3 platform / Node pools",
                     "GPUs allocatable, allocated and idle per node pool (kube-state-metrics + DCGM).",
                     variables, (capacity, usage))


DASHBOARDS = {
    "ps3-gpu-utilisation.json": gpu_dashboard,
    "ps3-training.json": training_dashboard,
    "ps3-node-pools.json": pools_dashboard,
}
