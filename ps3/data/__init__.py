"""PS3 pre-training data: shards in object storage -> the tensors of one PS3 step.

Modules, one job each:
- `fs`: fsspec access; S3 endpoint/credentials from the environment.
- `records`: a sample's json, its validation and the bad-sample reasons.
- `shards`: webdataset tar writer (`ShardWriter`), tar scanning, per-shard offset tables.
- `index`: per-source `index.json` (`build_index`, `read_index`, `SourceIndex`).
- `check`: the validator (`check_source`).
- `synth`: synthetic documents and sign scenes (`generate`, `python -m ps3.data.synth`).
- `sampling`: per-source balanced global batch planning (`BatchPlanner`).
- `decode`, `views`: fast 4K decode, scale views, GT maps, teacher-forced patches.
- `batches`, `loader`: micro-batch assembly (uint8 pixels) and the resumable `PS3Loader`;
  `normalize_images` turns a batch's pixels into model input once it is on the device.
"""

from .batches import IMAGE_KEYS, normalize_images
from .check import check_source
from .index import DataSourceError, SourceIndex, build_index, read_index
from .loader import DataSource, LoaderConfig, PS3Loader, build_loader
from .records import BAD_REASONS, BadSample, Record
from .sampling import BatchPlanner, SamplingError, SourceInfo
from .writer import ShardWriter
from .views import ViewConfig, normalize_pixels


def __getattr__(name: str):
    """`generate`/`SynthConfig` load ps3.data.synth on first use, so that
    `python -m ps3.data.synth` does not find the module half-imported (runpy warning)."""
    if name in ("SynthConfig", "generate"):
        from . import synth

        return getattr(synth, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BAD_REASONS",
    "IMAGE_KEYS",
    "BadSample",
    "BatchPlanner",
    "DataSource",
    "DataSourceError",
    "LoaderConfig",
    "PS3Loader",
    "Record",
    "SamplingError",
    "ShardWriter",
    "SourceIndex",
    "SourceInfo",
    "SynthConfig",
    "ViewConfig",
    "build_index",
    "build_loader",
    "check_source",
    "generate",
    "normalize_images",
    "normalize_pixels",
    "read_index",
]
