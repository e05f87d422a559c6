"""Job spec models (`apiVersion: ps3.platform/v1`).

The spec is Kubernetes-shaped (apiVersion/kind/metadata/spec) and closed: every model
forbids unknown keys, so a typo is an error rather than a silently ignored field. YAML keys
are camelCase like Kubernetes objects; Python attributes are snake_case. The JSON Schema
printed by `platformctl schema` is generated from these models, so there is no second
schema to drift.

Checks that need platform configuration (does the pool exist, how many GPUs it has) live
in `validate.py`, not here: these models are pure.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_VERSION = "ps3.platform/v1"

#: Tasks the runtime knows. Kept here (not imported from `ps3.tasks`) so validating a
#: spec never imports torch; a test checks this list against the task registry.
KNOWN_TASKS = ("noop", "sleep", "synth_data", "curate", "lowres_pretrain", "ps3_pretrain", "ps3_eval", "synth_vqa",
               "import_llava", "vila_hd", "hr_sft_synth", "selection_data", "vila_hd_eval")
#: Tasks whose workers form a Ray cluster: their pods name the Ray ports (`ps3_platform.ports`).
RAY_TASKS = ("curate",)
#: An evaluating stage's results (`eval.json`): in its run directory and, copied by the runtime,
#: beside its checkpoints (`{checkpoint.uri}/{job}/{stage}/`) where a cluster's `status` reads them.
EVAL_RECORD = "eval.json"
#: A training stage's progress, written by rank 0 beside its checkpoints at each log interval (step,
#: loss, ETA, last commit, restarts and their cost): what a cluster's `status` shows of it.
PROGRESS_RECORD = "progress.json"
#: A curate stage's summary, written beside its checkpoints (`{checkpoint.uri}/{job}/{stage}/`)
#: and in its run directory; `platformctl status` shows it on either backend.
CURATION_RECORD = "curation.json"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
# Names that look like credentials: the spec must name a Secret instead.
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY)", re.IGNORECASE)


def _dns_label(value: str) -> str:
    if len(value) > 50 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 50 characters"
        )
    return value


#: Placeholder for the run's directory in URIs (local backend), e.g. file://{run}/data.
RUN_PLACEHOLDER = "{run}"


def _uri(value: str) -> str:
    if value.startswith(f"file://{RUN_PLACEHOLDER}/"):
        return value
    if not _URI.match(value):
        raise ValueError(f"{value!r} is not a URI: expected an fsspec URL such as s3://bucket/path or file:///abs/path")
    if value.startswith("file://") and not value.startswith("file:///"):
        raise ValueError(f"{value!r}: file URIs need an absolute path, e.g. file:///data/shards")
    return value


def expand_run_placeholder(stage: "Stage", run_root: str) -> "Stage":
    """The stage with `{run}` in every string replaced by the run directory."""
    text = stage.model_dump_json(by_alias=True).replace(RUN_PLACEHOLDER, run_root.rstrip("/"))
    return type(stage).model_validate_json(text)


def _quantity(value: str | int | float) -> str:
    text = str(value)
    if not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
    return text


def _known_task(value: str) -> str:
    if value not in KNOWN_TASKS:
        close = difflib.get_close_matches(value, KNOWN_TASKS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(KNOWN_TASKS)}"
        raise ValueError(f"unknown task {value!r}; {hint}")
    return value


def _no_credentials(env: dict[str, str]) -> dict[str, str]:
    for key in env:
        if _SECRET_ENV.search(key):
            raise ValueError(f"{key!r} looks like a credential: name a Secret in spec.storage.credentialsSecret")
    return env


Name = Annotated[str, AfterValidator(_dns_label)]
Uri = Annotated[str, AfterValidator(_uri)]
Quantity = Annotated[str | int | float, AfterValidator(_quantity)]


class SpecModel(BaseModel):
    """Base: camelCase keys in YAML, unknown keys rejected, values checked on assignment."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
    )


class Metadata(SpecModel):
    name: Name = Field(description="Job name; also the Kubernetes object name prefix.")
    namespace: str | None = Field(None, description="Namespace; default: the kubeconfig's current one.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")


class Resources(SpecModel):
    pool: str = Field(description="Node pool name from the platform configuration (Helm values or pools.yaml).")
    nodes: int = Field(1, ge=1, description="Nodes (pods) for the stage; the elastic range may differ.")
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs per node; 0 for CPU-only stages.")
    procs_per_node: int | None = Field(
        None, ge=1, le=64, description="Worker processes per node; default gpusPerNode, or 1 without GPUs."
    )
    cpu: Quantity | None = Field(None, description="CPU request per pod, e.g. '32'.")
    memory: Quantity | None = Field(None, description="Memory request per pod, e.g. '512Gi'.")
    shm_size: Quantity | None = Field(
        None, description="Size of the /dev/shm memory volume (data loader batches, checkpoint staging); "
                          "default: derived from the data settings of PS3 and VILA-HD stages "
                          "(ps3_platform.compile.shm), else 16Gi.")

    @property
    def nproc(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1


class Elastic(SpecModel):
    min_nodes: int = Field(ge=1, description="Fewest nodes the stage keeps running with.")
    max_nodes: int = Field(ge=1, description="Most nodes the stage scales up to.")
    max_restarts: int = Field(3, ge=0, description="Worker-group restarts torchrun's agent allows per pod.")

    @model_validator(mode="after")
    def _range(self) -> "Elastic":
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"minNodes ({self.min_nodes}) is greater than maxNodes ({self.max_nodes})")
        return self


class Checkpoint(SpecModel):
    uri: Uri | None = Field(None, description="Where checkpoints go; default: the local run directory.")
    interval_steps: int = Field(1000, ge=1, description="Save every N optimizer steps.")
    keep: int = Field(3, ge=1, description="Keep the newest N committed checkpoints.")
    keep_every: int | None = Field(None, ge=1, description="Also keep every checkpoint whose step is a multiple of N.")
    async_: bool = Field(False, alias="async", description="Stage in host memory and upload in the background.")
    init_from: Uri | None = Field(None, description="Start from this committed checkpoint directory (another stage's).")
    retry_budget_seconds: float = Field(
        300.0, ge=0, description="How long one save or load keeps retrying storage errors before it fails.")
    request_timeout_seconds: float = Field(
        20.0, gt=0, description="Seconds a storage request may make no progress before it is retried (and logged).")
    stop_grace_seconds: float = Field(
        10.0, ge=0, description="After SIGTERM, how long a worker waits for an upload to commit before it abandons "
                                "it and exits (keep it below the pod's termination grace period).")
    resume_step: int | None = Field(
        None, ge=1, description="Resume from this committed step instead of the newest (once: newer steps are set "
                                "aside, not deleted, and later restarts resume from the newest again).")


class Source(SpecModel):
    name: str = Field(description="Source name (used for per-source balancing and metrics).")
    uri: Uri = Field(description="Directory of webdataset shards with an index.json.")
    weight: float = Field(1.0, gt=0, description="Sampling weight; sources are drawn by weight, not by size.")


class Data(SpecModel):
    sources: list[Source] = Field(default_factory=list, description="Training sources.")
    eval_sources: list[Source] = Field(default_factory=list, description="Held-out sources for evaluation.")
    global_caption_fraction: float = Field(0.25, ge=0, le=1, description="Share of the batch that are global pairs.")
    num_workers: int = Field(2, ge=0, description="Data loader worker processes per rank.")
    seed: int = Field(0, description="Seed of the sampling order.")
    tokenizer: Uri | None = Field(None, description="Tokenizer model file (SentencePiece or tokenizers JSON).")
    read_retry_seconds: float = Field(
        300.0, ge=0,
        description="How long a data read keeps retrying storage errors (an S3 outage) before the job fails.")


class Model(SpecModel):
    preset: str | None = Field(None, description="Model preset name, e.g. ps3-4k-siglip.")
    init_from: Uri | None = Field(None, description="Weights to start from (SigLIP or PS3 checkpoint directory).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Preset fields to override.")


class Optimizer(SpecModel):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)


class Schedule(SpecModel):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class NonFinite(SpecModel):
    policy: Literal["skip", "rollback", "fail"] = Field(
        "skip", description="NaN/inf loss: skip the step (fail after maxConsecutive in a row), skip and roll "
                            "back to the last checkpoint after maxConsecutive in a row, or fail at once."
    )
    max_consecutive: int = Field(3, ge=1, description="Non-finite steps in a row before rolling back (or failing).")


class Train(SpecModel):
    global_batch: int = Field(8, ge=1, description="Samples per optimizer step, whatever the world size.")
    micro_batch: int | None = Field(None, ge=1, description="Most samples per rank per forward; default all.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; or give epochs and samplesPerEpoch.")
    epochs: float | None = Field(None, gt=0)
    samples_per_epoch: int | None = Field(None, ge=1)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    precision: Literal["bf16", "fp32"] = Field(
        "fp32", description="bf16: bf16 parameters and compute under fsdp (FSDP2 mixed precision), bf16 autocast "
                            "otherwise; the optimizer keeps fp32 weights either way.")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicated weights; fsdp: FSDP2 sharding of each transformer block, then the rest.")
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Dtype of the FSDP2 gradient reduce-scatter under precision bf16; bf16 halves the "
                            "traffic at some accuracy. Needs parallelism fsdp.")
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="Recompute block activations in backward to save memory: full recomputes every "
                            "transformer block, selective every other one. true and false still mean full and none.")
    compile: bool = Field(
        False, description="torch.compile each transformer block (off until measured: the first steps compile).")
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    non_finite: NonFinite = Field(default_factory=NonFinite)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_from_bool(cls, value: Any) -> Any:
        """Specs written before the modes existed said true or false."""
        if isinstance(value, bool):
            return "full" if value else "none"
        return value

    @model_validator(mode="after")
    def _length(self) -> "Train":
        if self.steps is None and (self.epochs is None) != (self.samples_per_epoch is None):
            raise ValueError("give either steps, or both epochs and samplesPerEpoch")
        return self

    @model_validator(mode="after")
    def _reduce_dtype(self) -> "Train":
        # DDP reduces in the parameters' dtype (fp32), and fp32 parameters reduce in fp32 under fsdp too.
        if self.reduce_dtype == "bf16" and (self.parallelism, self.precision) != ("fsdp", "bf16"):
            raise ValueError("reduceDtype: bf16 needs parallelism: fsdp and precision: bf16; "
                             "set train.reduceDtype: fp32 or change those two")
        return self

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None and self.samples_per_epoch is not None:
            return max(1, int(self.epochs * self.samples_per_epoch) // self.global_batch)
        return 1


class Monitoring(SpecModel):
    port: int = Field(9464, ge=1024, le=65535, description="Prometheus metrics port of every worker.")
    log_every_steps: int = Field(10, ge=1, description="Write a metrics line every N steps.")


class Storage(SpecModel):
    credentials_secret: str | None = Field(
        None, description="Kubernetes Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; locally the environment."
    )
    endpoint: str | None = Field(None, description="S3 endpoint URL for non-AWS object stores.")
    region: str | None = None


class StageBody(SpecModel):
    """What one stage runs; a TrainingJob's spec is one of these."""

    task: Annotated[str, AfterValidator(_known_task)] = Field(description=f"Task to run: one of {', '.join(KNOWN_TASKS)}.")
    image: str | None = Field(None, description="Container image (cluster backend).")
    resources: Resources = Field(default_factory=lambda: Resources(pool="cpu"))
    elastic: Elastic | None = None
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    data: Data = Field(default_factory=Data)
    model: Model = Field(default_factory=Model)
    train: Train = Field(default_factory=Train)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    env: Annotated[dict[str, str], AfterValidator(_no_credentials)] = Field(
        default_factory=dict, description="Extra environment; never credentials."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Task-specific parameters (see the task).")


class Stage(StageBody):
    name: Name = Field(description="Stage name, unique in the pipeline.")
    depends_on: list[str] = Field(default_factory=list, description="Stages that must succeed first.")


class TrainingJobSpec(StageBody):
    storage: Storage = Field(default_factory=Storage)


class PipelineSpec(SpecModel):
    image: str | None = Field(None, description="Default image for stages that give none.")
    storage: Storage = Field(default_factory=Storage)
    stages: list[Stage] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _graph(cls, stages: list[Stage]) -> list[Stage]:
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique: {', '.join(dupes)}")
        for stage in stages:
            for dep in stage.depends_on:
                if dep not in names:
                    raise ValueError(f"stage {stage.name!r} dependsOn unknown stage {dep!r}")
        cycle = find_cycle({s.name: s.depends_on for s in stages})
        if cycle:
            raise ValueError(f"dependsOn cycle: {' -> '.join(cycle)}")
        return stages


def find_cycle(graph: dict[str, list[str]]) -> list[str]:
    """Return one dependency cycle as a path (first node repeated at the end), or []."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return []


class TrainingJob(SpecModel):
    api_version: Literal["ps3.platform/v1"] = Field(alias="apiVersion")
    kind: Literal["TrainingJob"]
    metadata: Metadata
    spec: TrainingJobSpec


class Pipeline(SpecModel):
    api_version: Literal["ps3.platform/v1"] = Field(alias="apiVersion")
    kind: Literal["Pipeline"]
    metadata: Metadata
    spec: PipelineSpec


JobSpec = TrainingJob | Pipeline


def stages_of(job: JobSpec) -> list[Stage]:
    """The job's stages in dependency order (a TrainingJob is one stage named 'train')."""
    if isinstance(job, TrainingJob):
        body = job.spec.model_dump(by_alias=False, exclude={"storage"})
        return [Stage(name="train", **body)]
    order: list[Stage] = []
    done: set[str] = set()
    pending = list(job.spec.stages)
    while pending:
        for stage in pending:
            if all(d in done for d in stage.depends_on):
                order.append(stage)
                done.add(stage.name)
                pending.remove(stage)
                break
    return order


def storage_of(job: JobSpec) -> Storage:
    return job.spec.storage


def image_of(job: JobSpec, stage: Stage) -> str | None:
    if stage.image:
        return stage.image
    return job.spec.image if isinstance(job, Pipeline) else None
