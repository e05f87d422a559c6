"""`selection_data`: PS3 pre-training boxes + local captions -> grounding QA (paper figure 8, left).

The data of VILA-HD's selection stage: one grounding sample per (box, caption) of PS3
pre-training shards (`ps3.vila_hd.selection_data`), with boxes too small for the stage's
preset to select dropped. Scheduled like every data stage so a Pipeline can make it before
training on it. Rank 0 writes; a restarted stage resumes at the first uncommitted shard.
The counts go to `{run_dir}/selection_data.json`.
"""

from __future__ import annotations

import json

from pydantic import Field, field_validator

from ps3.model import get_preset
from ps3.vila_hd.selection_data import DEFAULT_PROMPT, InputUnreadable, LLMUnavailable, make_selection_data
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import TaskParams, parse_params, preset_for

#: The preset whose top scale judges box sizes when the stage names none: VILA-HD's 4K encoder.
DEFAULT_PRESET = "ps3-4k-siglip"


class SelectionDataParams(TaskParams):
    inputs: list[str] = Field(min_length=1, description="PS3 pre-training shard sources (with index.json).")
    output: str = Field(description="Shard directory to write (with its index).")
    samples_per_shard: int = Field(1000, ge=1, description="Input images per output shard.")
    source: str = Field("selection_data", description="Source name recorded in every sample.")
    seed: int = Field(0, description="Template choices are a pure function of (seed, key, box).")
    llm: str | None = Field(None, description="A local Hugging Face causal LM directory to write the questions; "
                                              "templates when absent.")
    prompt: str = Field(DEFAULT_PROMPT, description="What the LLM is asked; {caption} is the region's caption.")
    min_box_patches: float = Field(1.0, ge=0, description="Drop boxes covering fewer patches at the top scale.")
    max_samples: int | None = Field(None, ge=1, description="Use only the first this many input images.")

    @field_validator("prompt")
    @classmethod
    def _names_the_caption(cls, value: str) -> str:
        if "{caption}" not in value:
            raise ValueError("must contain {caption}, where the region's caption goes")
        return value


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

