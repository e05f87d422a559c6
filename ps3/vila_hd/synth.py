"""Synthetic high-resolution VQA for the VILA-HD quickstart: questions only high resolution answers.

The scenes are `ps3.data.synth`'s: 3-4 small signs of distinct colours. A sign's colour
survives the 64 px low-res view but its shape needs about 256 px (measured in
`ps3.data.synth`: shape accuracy 0.42 at 64 px vs 0.80 at 256 px, chance 0.25). So a
question names a sign by its colour (answerable from the low-res view, which is what lets
the LLM's top-down prompt find it) and asks its shape (answerable only from high-res
patches there). Three sources, in the conversation format of `ps3.vila_hd`:

    {uri}/train/qa          multiple choice: "What shape is the red sign?" (A)-(D), answer a letter
    {uri}/train/grounding   "Look at the red sign." with the sign's box: token-selection loss only
    {uri}/eval/qa           as train/qa, from its own random stream, so no scene repeats training
    {uri}/texts.txt         every text a tokenizer must cover (a tiny tokenizer is trained on it)

Every sample is a pure function of (seed, split, kind, sample number), like `ps3.data.synth`.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator

import numpy as np

from ps3.data.fs import filesystem, join
from ps3.data.shards import SIDECAR_SUFFIX, ShardWriter
from ps3.data.synth import SIGN_COLOURS, SIGN_SHAPES, SynthConfig, encode, make_scene

LETTERS = ("A", "B", "C", "D")
IMAGE = "<image>"
QA_SOURCE = "synth_qa"
GROUNDING_SOURCE = "synth_grounding"
TEXTS_NAME = "texts.txt"
DEFAULT_CONFIG = SynthConfig()  # the 4K setting

#: Random-stream numbers, apart from `ps3.data.synth`'s (0, 1 for its kinds) and from each
#: other: eval draws other scenes than training for every seed, not just for unlucky ones.
_STREAMS = {("train", "qa"): 100, ("train", "grounding"): 101, ("eval", "qa"): 102, ("eval", "grounding"): 103}

Sample = tuple[str, dict, list[tuple[str, bytes]]]


def shape_question(colour: str, options: list[str]) -> str:
    """The multiple-choice prompt (without the image placeholder) for the sign of `colour`."""
    lines = [f"What shape is the {colour} sign?"]
    lines += [f"({letter}) {shape}" for letter, shape in zip(LETTERS, options)]
    return "\n".join([*lines, "Answer with the option's letter."])


def look_prompt(colour: str) -> str:
    """The grounding prompt: names the sign whose box the selection should cover."""
    return f"Look at the {colour} sign."


def _rng(seed: int, split: str, kind: str, i: int) -> np.random.Generator:
    if (split, kind) not in _STREAMS:
        raise ValueError(f"split {split!r} must be one of 'train', 'eval'")
    return np.random.default_rng([seed, _STREAMS[split, kind], i])


def _scene_sign(rng: np.random.Generator, cfg: SynthConfig):
    """One scene and one of its signs whose colour no other sign has: (image, box, colour, shape).

    Signs share colours only when a config asks for more than four; such a colour would
    not name one sign, so only uniquely coloured signs are asked about.
    """
    image, boxes, captions, _ = make_scene(rng, cfg)
    colours = [caption.split()[0] for caption in captions]
    unique = [n for n, colour in enumerate(colours) if colours.count(colour) == 1]
    if not unique:
        raise ValueError(f"cfg.signs={cfg.signs}: no sign has a colour of its own to name it by")
    n = unique[int(rng.integers(len(unique)))]
    colour, shape = captions[n].split()[:2]
    return image, [float(v) for v in boxes[n]], colour, shape


def _sample(key: str, image, conversation: tuple[str, str], box: list[float], kind: str, source: str,
            cfg: SynthConfig, **extra) -> Sample:
    """Pack one conversation sample: `K.json` per the contract, `K.0.jpg` the image."""
    question, answer = conversation
    meta = {"conversations": [{"from": "human", "value": f"{IMAGE}\n{question}"},
                              {"from": "gpt", "value": answer}],
            "boxes": [box], "kind": kind, "source": source, "id": key, **extra}
    return key, meta, [("0.jpg", encode(image, "jpg", cfg.quality))]


def vqa_sample(seed: int, i: int, cfg: SynthConfig = DEFAULT_CONFIG, *, split: str = "train",
               shuffle_options: bool = True) -> Sample:
    """Sample `i` of the shape question stream: (key, meta, [("0.jpg", bytes)]).

    The options are all four shapes in a shuffled order, so the letter carries no prior and
    the answer cannot be read off the option position. `shuffle_options=False` keeps them in
    one fixed order, so a letter names a shape: what a tiny LLM trained for minutes can learn
    (matching a shape to its place in a shuffled list is a skill of its own).
    """
    rng = _rng(seed, split, "qa", i)
    image, box, colour, shape = _scene_sign(rng, cfg)
    shuffled = [str(s) for s in rng.permutation(SIGN_SHAPES)]  # drawn either way: the same scenes
    options = shuffled if shuffle_options else list(SIGN_SHAPES)
    letter = LETTERS[options.index(shape)]
    return _sample(f"{split}-qa-{i:08d}", image, (shape_question(colour, options), letter), box, "qa",
                   QA_SOURCE, cfg, answer=letter, options=options, category="shape")


def grounding_sample(seed: int, i: int, cfg: SynthConfig = DEFAULT_CONFIG, *, split: str = "train") -> Sample:
    """Sample `i` of the grounding stream: a sign named by colour and its box.

    The answer (the shape word) keeps the conversation well-formed; grounding samples
    train only the token selection, so it is never a language target.
    """
    rng = _rng(seed, split, "grounding", i)
    image, box, colour, shape = _scene_sign(rng, cfg)
    return _sample(f"{split}-grounding-{i:08d}", image, (look_prompt(colour), shape), box, "grounding",
                   GROUNDING_SOURCE, cfg)


def vocabulary_texts() -> list[str]:
    """Every text the samples can hold, one per line, for training a tokenizer.

    All prompts over every colour and option order (96 + 4 of them), then the answers
    and the bare words. The `<image>` placeholder is left out: it becomes the image
    token, never text.
    """
    orders = itertools.permutations(SIGN_SHAPES)
    questions = [shape_question(c, list(p)) for c, p in itertools.product(SIGN_COLOURS, orders)]
    looks = [look_prompt(c) for c in SIGN_COLOURS]
    options = [f"({letter}) {shape}" for letter, shape in itertools.product(LETTERS, SIGN_SHAPES)]
    return [*questions, *looks, *options, *LETTERS, *SIGN_SHAPES, *SIGN_COLOURS]


def _clear_shards(uri: str) -> None:
    """Remove an earlier run's shards and index from a source directory.

    The index lists every tar in the directory, so a rerun writing fewer shards would
    otherwise index stale ones beside its own. Only the writer's own files are touched.
    """
    fs, path = filesystem(uri)
    if not fs.isdir(path):
        return
    for name in fs.ls(path, detail=False):
        base = name.rsplit("/", 1)[-1]
        if base == "index.json" or base.startswith("shard-") and base.endswith((".tar", ".tar" + SIDECAR_SUFFIX)):
            fs.rm(name)


def _write_source(uri: str, source: str, samples: Iterator[Sample], samples_per_shard: int) -> int:
    """Write conversation samples as `K.json` + `K.<n>.<ext>` members; returns the indexed count."""
    _clear_shards(uri)
    writer = ShardWriter(uri, source, samples_per_shard=samples_per_shard)
    for key, meta, images in samples:
        writer.write_members(key, {"json": json.dumps(meta).encode(), **dict(images)})
    return writer.close()["samples"]  # close() runs ps3.data.index.build_index over the shards


def generate_vqa(uri: str, *, train: int, eval: int, grounding: int, seed: int = 0,
                 cfg: SynthConfig = DEFAULT_CONFIG, samples_per_shard: int = 100,
                 shuffle_options: bool = True) -> dict[str, int]:
    """Write the train/qa, train/grounding and eval/qa sources and texts.txt under `uri`.

    A source asked for 0 samples is not written. Returns {"train/qa": count, ...} for the
    sources written, the counts read back from their indexes.
    """
    plan = {("train", "qa"): train, ("train", "grounding"): grounding, ("eval", "qa"): eval}
    makers = {"qa": (functools.partial(vqa_sample, shuffle_options=shuffle_options), QA_SOURCE),
              "grounding": (grounding_sample, GROUNDING_SOURCE)}
    counts = {}
    for (split, kind), n in plan.items():
        if n <= 0:
            continue
        make, source = makers[kind]
        samples = (make(seed, i, cfg, split=split) for i in range(n))
        counts[f"{split}/{kind}"] = _write_source(join(uri, split, kind), source, samples, samples_per_shard)
    fs, path = filesystem(uri)
    fs.pipe_file(f"{path}/{TEXTS_NAME}", ("\n".join(vocabulary_texts()) + "\n").encode())
    return counts
