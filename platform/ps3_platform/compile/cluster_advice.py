"""Things that compile fine but will not work as the user expects on a cluster.

Not errors: `render` must work for specs written for the local backend (quickstart),
and the same spec is valid there. `platformctl submit --backend kubernetes` prints these.
"""

from __future__ import annotations

from ps3_platform.spec import JobSpec, stages_of


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
    return warnings
