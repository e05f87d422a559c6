"""Job specs: pydantic models, YAML loading with positions, pool-aware validation."""

from .batch import BatchPlan, BatchPlanError, plan_batch, splits_evenly
from .load import LoadedSpec, SpecError, SpecIssue, load, load_text, resolved, spec_hash
from .models import (
    API_VERSION,
    KNOWN_TASKS,
    JobSpec,
    Pipeline,
    Stage,
    StageBody,
    TrainingJob,
    image_of,
    stages_of,
    storage_of,
)
from .pools import POOLS_CONFIGMAP, POOLS_KEY, Pool, PoolConfig, PoolConfigError, load_pools, parse_pools
from .validate import check_against_pools

__all__ = [
    "API_VERSION", "KNOWN_TASKS", "BatchPlan", "BatchPlanError", "JobSpec", "LoadedSpec", "Pipeline",
    "Pool", "PoolConfig", "PoolConfigError", "POOLS_CONFIGMAP", "POOLS_KEY", "SpecError", "SpecIssue",
    "Stage", "StageBody", "TrainingJob", "check_against_pools", "image_of", "load", "load_pools",
    "load_text", "parse_pools", "plan_batch", "resolved", "splits_evenly", "spec_hash", "stages_of", "storage_of",
]
