"""The settings of a curation run, as the `curate` task's params give them (camelCase in YAML).

Defaults are the paper's (appendix A): SAM's table 10, boxes of 1/5 of the short side,
four boxes per image, Qwen2-VL at max_pixels 256·28·28, documents rendered at 150 DPI,
15-word runs for PDFA-like sources.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

#: Our wording of the appendix's intent: describe the crop in its context, every object and text.
LOCAL_PROMPT = (
    "The second picture is a close-up taken from the first one. Using the first picture only as context, "
    "describe what the close-up shows in one or two sentences: name every object and read out any text in it, "
    "with colours, shapes and where things are relative to each other. Leave out the background (sky, weather) "
    "and anything that is outside the close-up. Do not remark on missing text."
)
GLOBAL_PROMPT = (
    "Describe this picture in two or three sentences: name every foreground object and read out any text, "
    "with colours, shapes and where things are relative to each other. Leave out the background (sky, "
    "weather). Do not remark on missing text."
)


class CurationModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class SourceConfig(CurationModel):
    name: str = Field(description="Output source name (a directory under params.output).")
    kind: Literal["natural", "document"] = Field(description="natural: masks + captions; document: OCR boxes.")
    uri: str = Field(description="Directory or glob of images/PDFs, or a directory of webdataset shards.")
    index: str | None = Field(None, description="A file listing input URIs, one per line (instead of listing uri).")
    format: Literal["files", "webdataset"] = "files"
    document_mode: Literal["sentence", "words"] = Field(
        "words", description="document boxes: one sentence per box (IDL-like) or runs of words (PDFA-like).")
    ocr: Literal["tesseract", "json"] = Field(
        "tesseract", description="document words from Tesseract, or from <input>.ocr.json beside each input.")


class MaskConfig(CurationModel):
    generator: Literal["classical", "sam"] = Field("classical", description="sam needs checkpoint.")
    checkpoint: str | None = Field(None, description="SAM weights (.pth), a path or URI; never downloaded.")
    model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    points_per_side: int = Field(24, ge=1)
    points_per_batch: int = Field(128, ge=1)
    crop_n_layers: int = Field(1, ge=0)
    crop_n_points_downscale_factor: int = Field(1, ge=1)
    pred_iou_thresh: float = Field(0.6, ge=0, le=1)
    stability_score_thresh: float = Field(0.85, ge=0, le=1)
    min_mask_region_area: int = Field(0, ge=0, le=0, description="Table 10's 0; SAM's hole filling (> 0) "
                                                                  "needs OpenCV, which the image leaves out.")
    work_side: int = Field(1024, ge=64, description="Masks are kept at this long side (compact between stages).")

    @model_validator(mode="after")
    def _weights(self) -> MaskConfig:
        if self.generator == "sam" and not self.checkpoint:
            raise ValueError("masks.generator sam needs masks.checkpoint (a SAM .pth path or URI)")
        return self


class BoxConfig(CurationModel):
    #: The 1.5:1 box of the same area has a long side of fraction * sqrt(1.5): it must fit the image.
    fraction: float = Field(0.2, gt=0, le=round(1 / 1.5 ** 0.5, 4),
                            description="Box side as a fraction of the image's short side (at most 0.8165).")
    top_k: int = Field(4, ge=1, description="Non-overlapping boxes kept per image.")
    min_box_px: int = Field(28, ge=1, description="Images whose box side would be smaller are skipped.")


class CaptionConfig(CurationModel):
    captioner: Literal["qwen2-vl", "ocr"] = "qwen2-vl"
    model: str | None = Field(None, description="Qwen2-VL model directory, a path or URI; never downloaded.")
    local_prompt: str = LOCAL_PROMPT
    global_prompt: str = GLOBAL_PROMPT
    global_captions: bool = Field(True, description="Caption the whole image too (natural images only).")
    max_pixels: int = Field(256 * 28 * 28, ge=28 * 28)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(8, ge=1, description="Caption requests per model call.")
    retries: int = Field(2, ge=0, description="Retries of a failed or timed-out caption before its box is dropped.")
    timeout_s: float = Field(300.0, gt=0, description="Longest one caption call may take.")

    @model_validator(mode="after")
    def _weights(self) -> CaptionConfig:
        if self.captioner == "qwen2-vl" and not self.model:
            raise ValueError("captions.captioner qwen2-vl needs captions.model (a Qwen2-VL directory or URI)")
        return self


class DocumentConfig(CurationModel):
    dpi: int = Field(150, ge=36, le=600, description="PDF pages are rendered at this resolution.")
    boxes_per_page: int = Field(4, ge=1)
    run_length: int = Field(15, ge=1, description="Words per box in words mode (PDFA-like).")
    lang: str = "eng"


class WorkerConfig(CurationModel):
    """Ray actor pools; GPUs are only requested when the stage's pool has them."""

    masks: int = Field(1, ge=1, description="Mask generator actors.")
    captions: int = Field(1, ge=1, description="Captioner (and OCR) actors.")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="Set from resources.gpusPerNode by the task when 0.")


class CurationConfig(CurationModel):
    output: str = Field(description="URI; each source is written to {output}/{source name}.")
    sources: list[SourceConfig] = Field(min_length=1)
    masks: MaskConfig = Field(default_factory=MaskConfig)
    boxes: BoxConfig = Field(default_factory=BoxConfig)
    captions: CaptionConfig = Field(default_factory=lambda: CaptionConfig(captioner="ocr"))
    documents: DocumentConfig = Field(default_factory=DocumentConfig)
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    samples_per_shard: int = Field(100, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _unique(self) -> CurationConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        return self


def check_params(params: dict, *, remote: bool = False) -> list[tuple[tuple, str]]:
    """Problems with a `curate` stage's params, as (path inside params, message): the spec's
    shape first, then the weights it names, which must exist before any work starts.

    `platformctl validate` checks weights on local paths only: object storage may be out of
    reach (or slow to say so) from where a spec is written, so remote weights are checked by
    every worker at start (`remote=True`), still before any work.
    """
    from pydantic import ValidationError

    try:
        config = CurationConfig.model_validate(params)
    except ValidationError as exc:
        return [(tuple(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    from .models import WeightsError
    from .models.weights import check_weights

    problems = []
    wanted = [(("masks", "checkpoint"), config.masks.checkpoint if config.masks.generator == "sam" else None),
              (("captions", "model"), config.captions.model if config.captions.captioner == "qwen2-vl" else None)]
    for path, uri in wanted:
        if uri is None or (not remote and "://" in uri and not uri.startswith("file://")):
            continue
        try:
            check_weights(uri)
        except WeightsError as exc:
            problems.append((path, str(exc)))
    return problems
