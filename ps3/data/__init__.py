"""PS3 pre-training data: shards in object storage -> the tensors of one PS3 step.

- `shards`, `index`, `check`: webdataset shards with offset tables, per-source
  `index.json` (`build_index`), and the validator (`check_source`).
"""

from .check import check_source
from .index import DataSourceError, SourceIndex, build_index, read_index
from .records import BAD_REASONS, BadSample, Record
from .shards import ShardWriter

__all__ = [
    "BAD_REASONS",
    "BadSample",
    "DataSourceError",
    "Record",
    "ShardWriter",
    "SourceIndex",
    "build_index",
    "check_source",
    "read_index",
]
