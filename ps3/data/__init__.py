"""PS3 pre-training data: shards in object storage -> the tensors of one PS3 step.

- `shards`, `index`, `check`: webdataset shards with offset tables, per-source
  `index.json` (`build_index`), and the validator (`check_source`).
- `synth`: synthetic documents and scenes (`generate`, `python -m ps3.data.synth`).
"""

from .check import check_source
from .index import DataSourceError, SourceIndex, build_index, read_index
from .records import BAD_REASONS, BadSample, Record
from .shards import ShardWriter
from .synth import SynthConfig, generate

__all__ = [
    "BAD_REASONS",
    "BadSample",
    "DataSourceError",
    "Record",
    "ShardWriter",
    "SourceIndex",
    "SynthConfig",
    "build_index",
    "check_source",
    "generate",
    "read_index",
]
