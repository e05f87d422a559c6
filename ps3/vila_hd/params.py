"""A `vila_hd` stage's params: importable without torch, so `platformctl validate` checks them
(a misspelt trainable unit fails there, not on a cluster after the image is pulled)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

#: How the high-res patches are chosen: top-down from the LLM's prompt, bottom-up from PS3's
#: prior, or at random (evaluation's floor).
LOOK_CLOSE_MODES = ("after_prompt", "after_image", "random")
#: What evaluation appends to a multiple-choice question (lmms-eval's wording).
DEFAULT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
#: Asks an LLM for a question that needs the captioned region (`selection_data`); `{caption}` is filled in.
DEFAULT_PROMPT = (
    "A large, detailed image contains a small region described as: \"{caption}\".\n"
    "Write one question a person might ask about the image that can only be answered by looking "
    "closely at that region. Reply with the question alone, on one line."
)
#: What a stage can train, by name (`params.trainable`).
MODULES = ("projector", "embeddings", "prompt_head", "selection", "vision", "llm")


class VilaHDParams(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    llm: str = Field(description="Qwen2-family LLM directory (config, weights, tokenizer with a chat template).")
    vision_from: str | None = Field(None, description="A ps3_pretrain stage's checkpoint URL (first stage only).")
    trainable: list[Literal[MODULES]] = Field(  # type: ignore[valid-type]
        description=f"What this stage trains, of {', '.join(MODULES)}; the rest is frozen.")
    prompt_head: Literal["linear", "mlp"] = "linear"
    look_close_mode: Literal["after_prompt", "after_image"] = "after_prompt"
    num_look_close: int | Literal["all"] = Field(1, description="Looks of the preset's patches per image.")
    num_token_look_close: int | None = Field(None, ge=0, description="High-res patches per image (wins over looks).")
    select_num_each_scale: list[int] | None = Field(None, description="Per-look patches per high-res scale.")
    smooth_selection_prob: bool = False
    dynamic_resolution: bool = Field(False, description="4K: images under the midpoint of the top two scales skip the top one.")
    gt_forced_selection: bool = Field(False, description="Select each image's box cells first.")
    lm_loss_weight: float = Field(1.0, ge=0)
    selection_loss_weight: float = Field(0.0, ge=0, description="Token-selection loss (BCE + Dice on the box map).")
    max_text_tokens: int = Field(1024, ge=16, description="Context beyond the image tokens, which grow with the budget.")
    eval_batches: int = Field(0, ge=0, description="Batches of data.evalSources to score after training.")
    export_to: str | None = Field(None, description="Write the trained model here as an HF-style directory "
                                                    "(config.json, llm/, vision_tower/, mm_projector/).")

    @field_validator("trainable")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(MODULES)}")
        return value
