"""Things that compile fine but will not work as the user expects on a cluster.

Not errors: `render` must work for specs written for the local backend (quickstart),
and the same spec is valid there. `platformctl render` and `submit --backend kubernetes`
print these; `validate` prints the sizing ones (`sizing_warnings`).
"""

from __future__ import annotations

from ps3_platform.spec import JobSpec, stages_of

from .shm import shm_warnings


def cluster_warnings(job: JobSpec) -> list[str]:
    """One line per stage setting that compiles but will not behave as expected on a cluster."""
    warnings = []
    for stage in stages_of(job):
        where = f"stage {stage.name!r}"
        if stage.checkpoint.uri is None:
            warnings.append(f"{where}: checkpoint.uri is not set, so checkpoints stay inside the pod and are lost when "
                            "it is restarted; set it to an object-store URI such as s3://bucket/checkpoints")
        elif stage.checkpoint.uri.startswith("file://"):
            warnings.append(f"{where}: checkpoint.uri {stage.checkpoint.uri} is a path inside the pod; "
                            "use an object-store URI (s3://...) so restarted pods can resume")
        for source in stage.data.sources + stage.data.eval_sources:
            if source.uri.startswith("file://"):
                warnings.append(f"{where}: data source {source.name!r} ({source.uri}) must exist inside the image")
    return warnings + sizing_warnings(job)


def sizing_warnings(job: JobSpec) -> list[str]:
    """One line per stage whose /dev/shm is too small for its data, or too large for its pod.

    `platformctl validate` prints these too: they are about the spec's own numbers.
    """
    return [warning for stage in stages_of(job) for warning in shm_warnings(stage)]
