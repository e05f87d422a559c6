"""`selection_data`: PS3 pre-training boxes + local captions -> grounding QA (paper figure 8, left).

The data of VILA-HD's selection stage: one grounding sample per (box, caption) of PS3
pre-training shards (`ps3.vila_hd.selection_data`), with boxes too small for the stage's
preset to select dropped. Scheduled like every data stage so a Pipeline can make it before
training on it. Rank 0 writes; a restarted stage resumes at the first uncommitted shard.
The counts go to `{run_dir}/selection_data.json`.
"""

from __future__ import annotations

import json


from ps3.model import get_preset
from ps3.vila_hd.selection_data import InputUnreadable, LLMUnavailable, make_selection_data
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import parse_params, preset_for
from .params import SelectionDataParams

#: The preset whose top scale judges box sizes when the stage names none: VILA-HD's 4K encoder.
DEFAULT_PRESET = "ps3-4k-siglip"


def build(ctx: RunContext) -> TaskState:
    params: SelectionDataParams = parse_params(SelectionDataParams, ctx)
    preset = preset_for(ctx) if ctx.stage.model.preset else get_preset(DEFAULT_PRESET)

    def run() -> dict:
        if ctx.rank != 0:
            return {}
        try:
            summary = make_selection_data(
                params.inputs, params.output, preset, samples_per_shard=params.samples_per_shard,
                source=params.source, seed=params.seed, llm=params.llm, prompt=params.prompt,
                min_box_patches=params.min_box_patches, max_samples=params.max_samples)
        except InputUnreadable as exc:
            where = exc.position
            raise TaskSetupError(f"spec params.inputs[{where}] {params.inputs[where]}: {exc}") from None
        except LLMUnavailable as exc:
            raise TaskSetupError(f"spec params.llm {params.llm}: {exc}") from None
        (ctx.run_dir / "selection_data.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        ctx.log.info("wrote %d grounding samples from %d images in %d shards to %s (%d resumed, %d LLM "
                     "fallbacks); dropped by kind: %s", summary["written"], summary["images"], summary["shards"],
                     params.output, summary["resumed_shards"], summary["llm_fallback"],
                     json.dumps(summary["dropped"], sort_keys=True))
        return summary

    return TaskState(run=run)

