"""`synth_data`: synthetic 4K training and held-out shards, plus a tokenizer for them.

Writes `{output}/train/{document,scene}` and `{output}/eval/{document,scene}` (disjoint
seeds) with the generator of `ps3.data.synth`, and `{output}/tokenizer.json`, a word-level
tokenizer over the generator's closed vocabulary, so the quickstart needs no download.
"""

from __future__ import annotations

import itertools


from ps3.data import synth
from ps3.model import train_tiny_tokenizer
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import parse_params
from .params import SynthParams


def vocabulary_captions() -> list[str]:
    """Every word the generator can write, as captions (the tokenizer's training text)."""
    signs = [synth.sign_caption(c, s, w) for c, s, w in itertools.product(
        synth.SIGN_COLOURS, synth.SIGN_SHAPES, (*synth.SIGN_WORDS, None))]
    scenes = [f"a {c} {s} and a {c} {s} on a {b} background"
              for c, s, b in itertools.product(synth.COLOURS, synth.LARGE_SHAPES, synth.BACKGROUNDS)]
    return signs + scenes + [" ".join(synth.DOC_WORDS)]


def _config(params: SynthParams) -> synth.SynthConfig:
    signs = dict(sign_words=params.sign_words, sign_fraction=tuple(params.sign_size))
    if params.max_side is None:
        return synth.SynthConfig(**signs)
    cap = params.max_side
    return synth.SynthConfig(scene_size=(min(2048, cap), cap), doc_long_side=(min(1024, cap), cap), **signs)


def build(ctx: RunContext) -> TaskState:
    params: SynthParams = parse_params(SynthParams, ctx)
    unknown = set(params.kinds) - set(synth.KINDS)
    if unknown:
        raise TaskSetupError(f"spec params.kinds: unknown {sorted(unknown)}; choose from {list(synth.KINDS)}")
    out = params.output.rstrip("/")

    def run() -> dict:
        if ctx.rank != 0:
            return {}
        config = _config(params)
        if params.layout == "raw":
            written = {"raw": synth.generate_raw(f"{out}/raw", params.samples, params.seed, params.kinds,
                                                 pages_per_pdf=params.pages_per_pdf, config=config)}
            train_tiny_tokenizer(vocabulary_captions(), f"{out}/tokenizer.json")
            ctx.log.info("wrote raw synthetic inputs %s and %s/tokenizer.json", written, out)
            return written
        written = {"train": synth.generate(f"{out}/train", params.samples, params.seed, params.kinds, config=config)}
        if params.eval_samples:
            written["eval"] = synth.generate(f"{out}/eval", params.eval_samples, params.seed + 1_000_003,
                                             params.kinds, config=config)
        train_tiny_tokenizer(vocabulary_captions(), f"{out}/tokenizer.json")
        ctx.log.info("wrote synthetic sources %s and %s/tokenizer.json", written, out)
        return written

    return TaskState(run=run)
