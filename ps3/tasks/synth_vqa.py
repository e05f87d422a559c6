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


from ps3.data.fs import filesystem
from ps3.data.synth import SynthConfig
from ps3.vila_hd.synth import BENCHMARK_FILE, generate_vqa, write_benchmark
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import parse_params
from .params import SynthVqaParams

DONE_NAME = "_synth_vqa.json"


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
