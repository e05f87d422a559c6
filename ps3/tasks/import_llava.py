"""`import_llava`: LLaVA-format JSON + images -> VILA-HD conversation shards, as a data stage.

The same converter as `ps3.vila_hd.conversations.import_llava`, scheduled like every stage
so a Pipeline can import its SFT data before training on it (locally or on a cluster, from
any fsspec URI). Rank 0 converts; bad items are counted by kind, logged with their id and
written to `{run_dir}/import.json` with the count written.
"""

from __future__ import annotations

import json


from ps3.data import DataSourceError
from ps3.vila_hd.conversations import import_llava
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import parse_params
from .params import ImportLlavaParams


def build(ctx: RunContext) -> TaskState:
    params: ImportLlavaParams = parse_params(ImportLlavaParams, ctx)

    def run() -> dict:
        if ctx.rank != 0:
            return {}
        try:
            summary = import_llava(params.json_uri, params.image_root, params.output,
                                   samples_per_shard=params.samples_per_shard, source=params.source)
        except (DataSourceError, FileNotFoundError, ValueError) as exc:
            raise TaskSetupError(f"spec params.jsonUri {params.json_uri}: {exc}") from None
        (ctx.run_dir / "import.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        ctx.log.info("imported %d conversations into %s; skipped by kind: %s", summary["written"], params.output,
                     json.dumps(summary["skipped"], sort_keys=True))
        return summary

    return TaskState(run=run)
