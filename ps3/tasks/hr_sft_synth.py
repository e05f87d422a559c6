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
from pydantic import Field, field_validator, model_validator

from ps3.data import DataSourceError
from ps3.vila_hd.hr_synth import SettingsMismatch, synthesize

from .common import TaskParams, parse_params


class HrSftSynthParams(TaskParams):
    input: str | None = Field(None, description="Conversation shard source (with index.json) to read.")
    llava_json: str | None = Field(None, description="A LLaVA JSON list to read instead of `input`.")
    image_root: str | None = Field(None, description="Directory the LLaVA items' image paths are relative to.")
    output: str = Field(description="Shard directory to write (with its index).")
    canvas_size: tuple[int, int] = Field((4096, 4096), description="Canvas (width, height) in pixels.")
    paste_side: tuple[int, int] = Field((1024, 1536), description="Range of the pasted image's long side; the "
                                                                  "paper's 1K-1.5K on a 4K canvas.")
    seed: int = Field(0, description="Output is a pure function of (seed, input).")
    samples_per_shard: int = Field(1000, ge=1)
    source: str = Field("hr_sft", description="Source name recorded in every sample.")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of the canvases.")
    max_samples: int | None = Field(None, ge=1, description="Use only the first this many input samples.")
    threads: int | None = Field(None, ge=1, description="Canvases made at once (default: the cores this worker "
                                                        "may use); one core makes about 12 a second at 4096x4096.")

    @field_validator("canvas_size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"must be two positive sides, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _one_input_and_a_fitting_paste(self) -> HrSftSynthParams:
        """Pydantic reports these as one-line spec errors before anything is read."""
        if (self.input is None) == (self.llava_json is None):
            raise ValueError("give exactly one of input (conversation shards) or llavaJson (with imageRoot)")
        if self.llava_json is not None and self.image_root is None:
            raise ValueError("llavaJson needs imageRoot, the directory its image paths are relative to")
        if self.input is not None and self.image_root is not None:
            raise ValueError("imageRoot goes with llavaJson only; conversation shards hold their images")
        low, high = self.paste_side
        if not 1 <= low <= high <= min(self.canvas_size):
            raise ValueError(f"pasteSide must be [low, high] with 1 <= low <= high <= the canvas's shorter side "
                             f"{min(self.canvas_size)}, got {list(self.paste_side)}")
        return self


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
