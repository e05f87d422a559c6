"""`synth_vqa`: the VILA-HD quickstart's data, questions that only high resolution answers.

Writes `{output}/train/qa`, `{output}/train/grounding`, `{output}/eval/qa` (conversation
shards with their indexes, eval from its own random stream), optionally a 4KPro-format
benchmark (`{output}/eval/4kpro/`), and `{output}/texts.txt`, the text a tiny tokenizer is
trained on, with `ps3.vila_hd.synth`. Rank 0 writes; other ranks
have nothing to do. A finished run leaves `{output}/_synth_vqa.json` naming its params, so
a restarted or repeated stage with the same params returns at once instead of redrawing
every 4K scene (about 0.3 s each on one core).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator

from ps3.data.fs import filesystem
from ps3.data.synth import SynthConfig
from ps3.vila_hd.synth import BENCHMARK_FILE, generate_vqa, write_benchmark
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import TaskParams, parse_params

DONE_NAME = "_synth_vqa.json"


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


def _range_within(value: tuple, lowest, highest=None) -> tuple:
    """A [low, high] param with lowest <= low <= high (<= highest), or a ValueError saying so."""
    low, high = value
    if not lowest <= low <= high or highest is not None and high > highest:
        bound = f" <= {highest}" if highest is not None else ""
        raise ValueError(f"must be [low, high] with {lowest} <= low <= high{bound}, got {list(value)}")
    return value


def _done(output: str, params: SynthVqaParams) -> dict | None:
    """The counts of an earlier finished run with the same params, else None."""
    fs, path = filesystem(output)
    try:
        record = json.loads(fs.cat_file(f"{path}/{DONE_NAME}"))
    except (FileNotFoundError, ValueError):
        return None
    return record["counts"] if record.get("params") == params.model_dump(mode="json") else None


def build(ctx: RunContext) -> TaskState:
    params: SynthVqaParams = parse_params(SynthVqaParams, ctx)
    out = params.output.rstrip("/")

    def run() -> dict:
        if ctx.rank != 0:
            return {}
        finished = _done(out, params)
        if finished is not None:
            ctx.log.info("synthetic VQA already written under %s with these params: %s", out, finished)
            return finished
        fs, path = filesystem(out)
        if fs.exists(f"{path}/{DONE_NAME}"):  # another run's: it must not vouch for half-rewritten sources
            fs.rm(f"{path}/{DONE_NAME}")
        cfg = SynthConfig(scene_size=params.scene_size, sign_fraction=params.sign_fraction, signs=params.signs)
        counts = generate_vqa(out, train=params.train_samples, eval=params.eval_samples,
                              grounding=params.grounding_samples, seed=params.seed, cfg=cfg,
                              samples_per_shard=params.samples_per_shard,
                              shuffle_options=params.shuffle_options, question=params.question)
        if params.benchmark_samples:
            counts[BENCHMARK_FILE] = write_benchmark(out, params.benchmark_samples, seed=params.seed, cfg=cfg,
                                                     shuffle_options=params.shuffle_options,
                                                     question=params.question)
        ctx.log.info("wrote synthetic VQA sources %s and %s/texts.txt", counts, out)
        if params.tiny_llm:
            _write_tiny_llm(out, params)
        # written last: its presence means every source is complete
        fs.pipe_file(f"{path}/{DONE_NAME}",
                     json.dumps({"params": params.model_dump(mode="json"), "counts": counts}).encode())
        return counts

    return TaskState(run=run)


def _write_tiny_llm(output: str, params: SynthVqaParams) -> None:
    """A tiny random Qwen2 + a tokenizer that covers every text of the data, in {output}/llm."""
    from ps3.vila_hd.llm import build_tiny_llm
    from ps3.vila_hd.synth import TEXTS_NAME

    fs, path = filesystem(output)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols:
        raise TaskSetupError(f"spec params.tinyLlm needs a file:// output, got {output}")
    texts = fs.cat_file(f"{path}/{TEXTS_NAME}").decode().splitlines()
    width = params.tiny_llm_hidden_size
    build_tiny_llm(f"{path}/llm", texts, hidden_size=width, num_layers=params.tiny_llm_layers,
                   intermediate_size=2 * width, seed=params.seed)
