"""`hr_sft_synth`: high-res SFT data made from low-res VQA (PS3 paper, figure 8 right).

Reads a conversation source (or a LLaVA JSON plus its images) and writes each one-image
sample again with its image pasted at a random size and spot of a 4K solid-colour canvas,
boxed where it lies (`ps3.vila_hd.hr_synth`). Scheduled like every data stage so a
Pipeline can make its high-res SFT mix before training on it. Rank 0 writes; a restarted
stage resumes at the first uncommitted shard. The counts go to `{run_dir}/hr_sft_synth.json`.
"""

from __future__ import annotations

import json
import os

from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from ps3.data import DataSourceError
from ps3.vila_hd.hr_synth import SettingsMismatch, synthesize

from .common import parse_params
from .params import HrSftSynthParams


def build(ctx: RunContext) -> TaskState:
    params: HrSftSynthParams = parse_params(HrSftSynthParams, ctx)

    def run() -> dict:
        if ctx.rank != 0:
            return {}
        field, uri = ("input", params.input) if params.input is not None else ("llavaJson", params.llava_json)
        try:
            summary = synthesize(params.output, input=params.input, llava_json=params.llava_json,
                                 image_root=params.image_root, canvas_size=params.canvas_size,
                                 paste_side=params.paste_side, seed=params.seed,
                                 samples_per_shard=params.samples_per_shard, source=params.source,
                                 quality=params.quality, max_samples=params.max_samples,
                                 threads=params.threads or len(os.sched_getaffinity(0)))
        except DataSourceError as exc:
            raise TaskSetupError(f"spec params.{field} {uri}: {exc}") from None
        except SettingsMismatch as exc:
            raise TaskSetupError(f"spec params.output {params.output}: {exc}") from None
        (ctx.run_dir / "hr_sft_synth.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        ctx.log.info("wrote %d high-res SFT samples in %d shards to %s (%d resumed); skipped by kind: %s",
                     summary["written"], summary["shards"], params.output, summary["resumed_shards"],
                     json.dumps(summary["skipped"], sort_keys=True))
        return summary

    return TaskState(run=run)
