"""What each task accepts in a stage's `params`: one typed model per task, importable without torch.

`platformctl validate`, `render` and `submit` check every stage's params against its task's
model (`check_params`), so a misspelt or mistyped key is a FILE:LINE error with a
did-you-mean before anything starts, not a worker that exits when its pod comes up. The
tasks parse the same models when they start (`ps3.tasks.common.parse_params`).
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ps3.vila_hd.params import DEFAULT_INSTRUCTION, DEFAULT_PROMPT, LOOK_CLOSE_MODES, VilaHDParams

#: The paper's cap on high-res patches per image at pre-training (section 2.3).
PAPER_MAX_SELECTED = 2560


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class NoopParams(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    dim: int = Field(16, ge=1, le=4096)
    step_seconds: float = Field(0.0, ge=0)
    nan_at_steps: list[int] = Field(default_factory=list)


class SynthParams(TaskParams):
    output: str = Field(description="URI to write the sources under (train/, eval/, tokenizer.json).")
    samples: int = Field(200, ge=1, description="Training samples per kind.")
    eval_samples: int = Field(64, ge=0, description="Held-out samples per kind.")
    seed: int = 0
    kinds: list[Literal["scene", "document"]] = Field(default_factory=lambda: ["scene", "document"])
    max_side: int | None = Field(None, ge=256, description="Cap on the long side (default: up to 4096).")
    layout: str = Field("shards", pattern="^(shards|raw)$",
                        description="shards: PS3 training shards; raw: plain image files and PDFs without "
                                    "boxes (what `curate` takes in), boxes kept aside in truth.jsonl.")
    pages_per_pdf: int = Field(0, ge=0, description="raw layout: bind document pages into PDFs of this many pages.")
    sign_words: bool = Field(True, description="Scene signs carry a word ('... sign reading cat'); off for models "
                                               "too small to read, whose captions are then colour + shape.")
    sign_size: tuple[float, float] = Field(
        (0.042, 0.05), description="Scene signs' side as a share of the long side, [low, high]. The tiny preset's "
                                   "64 px low-res view shows a sign's colour from about 0.1 (6 px; at 0.05 it is a "
                                   "3 px blob), its shape only in the high-res views either way.")

    @field_validator("sign_size")
    @classmethod
    def _sign_size(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _range_within(value, 0.01, 0.2)


class LowresPretrainParams(TaskParams):
    crop_context: tuple[float, float] = Field(
        (1.5, 16.0), description="Local pairs show a crop around their box this many box sides wide, drawn "
                                 "log-uniformly from [low, high]: from the object filling the view to the object "
                                 "in a wide context, as web photos show things (global pairs: the whole image).")
    contrastive_exchange: Literal["ring", "all_gather"] = Field(
        "ring", description="How ranks share texts for the sigmoid loss (as ps3_pretrain's).")

    @field_validator("crop_context")
    @classmethod
    def _crop_context(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _range_within(value, 1.0)


class PretrainParams(TaskParams):
    contrastive_weight: float = Field(1.0, ge=0, description="Weight of the local+global sigmoid contrast.")
    contrastive_exchange: Literal["ring", "all_gather"] = Field(
        "ring", description="How ranks share texts for the sigmoid loss: world-1 ring shifts of one block each "
                            "(least memory), or one all-gather (fewest collectives); same loss and gradients.")
    bce_weight: float = Field(1.0, ge=0, description="Weight of BCE between selection maps and boxes.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of DICE between selection maps and boxes.")
    topdown_weight: float = Field(1.0, ge=0, description="Weight of the top-down (caption-prompted) box loss.")
    bottomup_weight: float = Field(1.0, ge=0, description="Weight of the bottom-up (prior) box loss.")
    max_selected_patches: int | None = Field(
        None, ge=1, le=PAPER_MAX_SELECTED, description="High-res patches per image (default: the preset's)."
    )
    max_tokens_per_micro_batch: int = Field(
        32 * (729 + PAPER_MAX_SELECTED),
        ge=1, description="Vision tokens one forward may hold (micro-batch x (low-res + selected)); "
                          "the default is the paper's 32 images per H100.",
    )


class EvalParams(TaskParams):
    batches: int = Field(4, ge=1, description="Held-out batches to evaluate.")
    batch_size: int = Field(32, ge=2, description="Images per batch (the retrieval gallery size).")
    pictures: int = Field(4, ge=0, description="Held-out pairs drawn with their top-down and bottom-up selection "
                                               "maps (run directory, pictures/).")


def _range_within(value: tuple, lowest, highest=None) -> tuple:
    """A [low, high] param with lowest <= low <= high (<= highest), or a ValueError saying so."""
    low, high = value
    if not lowest <= low <= high or highest is not None and high > highest:
        bound = f" <= {highest}" if highest is not None else ""
        raise ValueError(f"must be [low, high] with {lowest} <= low <= high{bound}, got {list(value)}")
    return value


class SynthVqaParams(TaskParams):
    output: str = Field(description="URI to write under (train/qa, train/grounding, eval/qa, texts.txt).")
    question: Literal["mark", "shape"] = Field(
        "mark", description="What the questions ask of the named sign: the colour of the dot at its centre "
                            "(mark) or its shape; both need high resolution (ps3.vila_hd.synth).")
    train_samples: int = Field(1000, ge=1, description="Training questions.")
    eval_samples: int = Field(200, ge=0, description="Held-out questions (0: no eval source).")
    grounding_samples: int = Field(500, ge=0, description="Grounding samples (selection loss only; 0: none).")
    benchmark_samples: int = Field(0, ge=0, description="Held-out questions written as a 4KPro-format benchmark "
                                                        "(eval/4kpro/questions.jsonl + images) for vila_hd_eval.")
    seed: int = Field(0, description="Seed of every stream; eval's stream differs from training's for any seed.")
    scene_size: tuple[int, int] = Field((2048, 4096), description="Range of a scene's long side in pixels; "
                                                                  "below about 1K, 256 px shows the whole scene.")
    sign_fraction: tuple[float, float] = Field(
        (0.042, 0.05), description="Range of a sign's side over the scene's long side. The tiny preset's top "
                                   "scale (256 px) shows a 0.045 sign in 12 px, under two patches: 0.08-0.1 "
                                   "puts its dot in a patch of its own.")
    signs: tuple[int, int] = Field((3, 4), description="Range of signs per scene (each of its own colour up to "
                                                       "four); 1 makes the named sign the only one.")
    samples_per_shard: int = Field(100, ge=1, description="Samples per tar shard.")
    shuffle_options: bool = Field(True, description="Options in a shuffled order per question (false: one "
                                                    "fixed order, so a letter names an answer).")
    tiny_llm: bool = Field(False, description="Also write {output}/llm: a random tiny Qwen2 whose tokenizer "
                                              "is trained on texts.txt (the quickstart's LLM; file:// only).")
    tiny_llm_hidden_size: int = Field(64, ge=8, description="Width of that tiny Qwen2.")
    tiny_llm_layers: int = Field(2, ge=1, description="Decoder layers of that tiny Qwen2.")

    @field_validator("scene_size")
    @classmethod
    def _ordered_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        """A sign spans ~4.5% of the long side: under 256 px it is a few pixels at any scale."""
        return _range_within(value, 256)

    @field_validator("signs")
    @classmethod
    def _sign_count(cls, value: tuple[int, int]) -> tuple[int, int]:
        """A question names its sign by a colour no other sign has: at most four signs."""
        return _range_within(value, 1, 4)

    @field_validator("sign_fraction")
    @classmethod
    def _fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        """Four signs and their word plates must fit a scene without overlapping."""
        return _range_within(value, 0.01, 0.2)


class ImportLlavaParams(TaskParams):
    json_uri: str = Field(description="The LLaVA JSON list (id, image, conversations, optional box/boxes).")
    image_root: str = Field(description="Directory the items' image paths are relative to.")
    output: str = Field(description="Shard directory to write (with its index).")
    source: str = Field("llava", description="Source name recorded in every sample.")
    samples_per_shard: int = Field(1000, ge=1)


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


class BenchmarkParams(TaskParams):
    name: str = Field(description="Name in the results (e.g. 4kpro, vstar).")
    format: Literal["4kpro", "vstar", "vstar_lmms"] = Field(
        description="4kpro: JSONL (image, question, options, answer, category, bucket[, box]); vstar: per-category "
                    "folders of images + JSON annotations; vstar_lmms: lmms-eval's JSONL/parquet (text, label).")
    uri: str = Field(description="The JSONL/parquet file, or the V* root folder.")
    categories: list[str] | None = Field(None, description="Allowed categories (default: the benchmark's own).")
    limit: int | None = Field(None, ge=1, description="Score only the first N usable questions.")


class VilaHDEvalParams(TaskParams):
    benchmarks: list[BenchmarkParams] = Field(min_length=1)
    llm: str | None = Field(None, description="The LLM directory, when checkpoint.initFrom is a stage's checkpoint "
                                              "rather than an exported model.")
    prompt_head: Literal["linear", "mlp"] = "linear"
    modes: list[Literal[LOOK_CLOSE_MODES]] = Field(  # type: ignore[valid-type]
        ["after_prompt"], description="Selection modes to compare (after_prompt: top-down, after_image: bottom-up, "
                                      "random: chance).")
    patch_fractions: list[float] | None = Field(
        None, description="Shares of the preset's high-res patches to select (0: low-res only); default: the "
                          "budget below.")
    num_look_close: int | Literal["all"] = 1
    num_token_look_close: int | None = Field(None, ge=0)
    select_num_each_scale: list[int] | None = None
    smooth_selection_prob: bool = False
    dynamic_resolution: bool = False
    answer: Literal["generate", "options"] = Field(
        "generate", description="generate: greedy free text, the letter extracted from it; options: the option "
                                "letter the model scores highest (for models too small to answer in words).")
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    instruction: str = Field(DEFAULT_INSTRUCTION, description="Appended to every question and its options.")
    pictures: int = Field(4, ge=0, description="Questions per benchmark drawn with their selected patches.")

    @field_validator("patch_fractions")
    @classmethod
    def _shares(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not 0.0 <= f <= 1.0 for f in value)):
            raise ValueError(f"must be a non-empty list of shares in [0, 1], got {value}")
        return value



#: Each task's params model (`curate` checks its own: `ps3.curation.config.check_params`).
PARAM_MODELS: dict[str, type[BaseModel]] = {
    "noop": NoopParams,
    "sleep": NoopParams,
    "synth_data": SynthParams,
    "lowres_pretrain": LowresPretrainParams,
    "ps3_pretrain": PretrainParams,
    "ps3_eval": EvalParams,
    "synth_vqa": SynthVqaParams,
    "import_llava": ImportLlavaParams,
    "vila_hd": VilaHDParams,
    "hr_sft_synth": HrSftSynthParams,
    "selection_data": SelectionDataParams,
    "vila_hd_eval": VilaHDEvalParams,
}


def check_params(task: str, params: dict) -> list[tuple[tuple, str]]:
    """Problems with a stage's params as (path inside params, message); [] when they parse."""
    model = PARAM_MODELS.get(task)
    if model is None:
        return []
    try:
        model.model_validate(params)
    except ValidationError as exc:
        return [(tuple(e["loc"]), _message(model, e)) for e in exc.errors()]
    return []


def _message(model: type[BaseModel], error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "extra_forbidden" or len(error["loc"]) != 1:
        return message
    known = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(error["loc"][0]), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown param ({hint})"
