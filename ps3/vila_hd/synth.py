"""Synthetic high-resolution VQA for the VILA-HD quickstart: questions only high resolution answers.

The scenes are `ps3.data.synth`'s: 3-4 small signs of distinct colours. A sign's colour
survives the 64 px low-res view, which is what lets the LLM's top-down prompt find the sign a
question names by colour; what the question asks needs the high-res patches there:

- `mark` (the quickstart's): every sign carries a dot of one of four colours at its centre,
  a third of its side across: a few pixels at 256 px, about one at 64 px, where it only
  tints the sign. "What colour is the dot on the red sign?" Colour is what a patch token
  keeps wherever the dot falls in its patch, so a tiny model learns it from hundreds of
  questions.
- `shape`: "What shape is the red sign?" (accuracy 0.42 at 64 px vs 0.80 at 256 px from
  pixels, chance 0.25). A shape spread over two or three patches at a random offset is a
  skill of its own: a probe on the tiny PS3's tokens at the sign stays near chance after
  600 questions, while a crop aligned to the sign gives 0.96 (docs/benchmarks.md).

Three sources, in the conversation format of `ps3.vila_hd`:

    {uri}/train/qa          multiple choice about the named sign, (A)-(D), answer a letter
    {uri}/train/grounding   "Look at the red sign." with the sign's box: token-selection loss only
    {uri}/eval/qa           as train/qa, from its own random stream, so no scene repeats training
    {uri}/eval/4kpro/       questions.jsonl + images/: held-out questions in 4KPro's multiple-choice
                            format (`write_benchmark`), for the `vila_hd_eval` stage
    {uri}/texts.txt         every text a tokenizer must cover (a tiny tokenizer is trained on it)

Every sample is a pure function of (seed, split, kind, sample number), like `ps3.data.synth`.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from collections.abc import Iterator

import numpy as np

from ps3.data.fs import filesystem, join
from ps3.data.shards import SIDECAR_SUFFIX
from ps3.data.writer import ShardWriter
from PIL import Image, ImageDraw

from ps3.data.synth import SIGN_COLOURS, SIGN_SHAPES, SynthConfig, encode, make_scene

LETTERS = ("A", "B", "C", "D")
QUESTIONS = ("mark", "shape")
#: A mark's colours: none is a sign's, so the dot never reads as the sign itself.
MARK_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
MARK_FRACTION = 0.33  # dot diameter / sign side
IMAGE = "<image>"
QA_SOURCE = "synth_qa"
GROUNDING_SOURCE = "synth_grounding"
TEXTS_NAME = "texts.txt"
DEFAULT_CONFIG = SynthConfig()  # the 4K setting

#: Random-stream numbers, apart from `ps3.data.synth`'s (0, 1 for its kinds) and from each
#: other: eval draws other scenes than training for every seed, not just for unlucky ones.
_STREAMS = {("train", "qa"): 100, ("train", "grounding"): 101, ("eval", "qa"): 102, ("eval", "grounding"): 103,
            ("benchmark", "qa"): 104}
#: Where `write_benchmark` puts its 4KPro-format file, under the output directory.
BENCHMARK_FILE = "eval/4kpro/questions.jsonl"

Sample = tuple[str, dict, list[tuple[str, bytes]]]


def shape_question(colour: str, options: list[str]) -> str:
    """The multiple-choice prompt (without the image placeholder) for the sign of `colour`."""
    lines = [f"What shape is the {colour} sign?"]
    lines += [f"({letter}) {shape}" for letter, shape in zip(LETTERS, options)]
    return "\n".join([*lines, "Answer with the option's letter."])


def mark_question(colour: str, options: list[str]) -> str:
    """The multiple-choice prompt asking the colour of the dot on the sign of `colour`."""
    lines = [f"What colour is the dot on the {colour} sign?"]
    lines += [f"({letter}) {mark}" for letter, mark in zip(LETTERS, options)]
    return "\n".join([*lines, "Answer with the option's letter."])


def look_prompt(colour: str) -> str:
    """The grounding prompt: names the sign whose box the selection should cover."""
    return f"Look at the {colour} sign."


def _rng(seed: int, split: str, kind: str, i: int) -> np.random.Generator:
    if (split, kind) not in _STREAMS:
        raise ValueError(f"split {split!r} must be one of 'train', 'eval'")
    return np.random.default_rng([seed, _STREAMS[split, kind], i])


def _scene_sign(rng: np.random.Generator, cfg: SynthConfig, *, marks: bool = False):
    """One scene and one of its signs whose colour no other sign has: (image, box, colour,
    shape, mark), with `marks` a dot on every sign (the mark is None without).

    Signs share colours only when a config asks for more than four; such a colour would
    not name one sign, so only uniquely coloured signs are asked about.
    """
    image, boxes, captions, _ = make_scene(rng, cfg)
    dots = _draw_marks(rng, image, boxes) if marks else [None] * len(boxes)
    colours = [caption.split()[0] for caption in captions]
    unique = [n for n, colour in enumerate(colours) if colours.count(colour) == 1]
    if not unique:
        raise ValueError(f"cfg.signs={cfg.signs}: no sign has a colour of its own to name it by")
    n = unique[int(rng.integers(len(unique)))]
    colour, shape = captions[n].split()[:2]
    return image, [float(v) for v in boxes[n]], colour, shape, dots[n]


def _draw_marks(rng: np.random.Generator, image, boxes) -> list[str]:
    """A dot of a random mark colour at the centre of each sign's shape square; their names.
    (A sign's box is its shape square over its word plate: the square's side is the box's width;
    every shape covers the square's centre.)"""
    draw, names = ImageDraw.Draw(image), []
    for x0, y0, x1, _ in boxes:
        name = str(rng.choice(list(MARK_COLOURS)))
        side = x1 - x0
        cx, cy, r = (x0 + x1) / 2, y0 + side / 2, side * MARK_FRACTION / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=MARK_COLOURS[name])
        names.append(name)
    return names


def _sample(key: str, image, conversation: tuple[str, str], box: list[float], kind: str, source: str,
            cfg: SynthConfig, **extra) -> Sample:
    """Pack one conversation sample: `K.json` per the contract, `K.0.jpg` the image."""
    question, answer = conversation
    meta = {"conversations": [{"from": "human", "value": f"{IMAGE}\n{question}"},
                              {"from": "gpt", "value": answer}],
            "boxes": [box], "kind": kind, "source": source, "id": key, **extra}
    return key, meta, [("0.jpg", encode(image, "jpg", cfg.quality))]


def vqa_sample(seed: int, i: int, cfg: SynthConfig = DEFAULT_CONFIG, *, split: str = "train",
               shuffle_options: bool = True, question: str = "shape") -> Sample:
    """Sample `i` of the `question` stream ("shape" or "mark"): (key, meta, [("0.jpg", bytes)]).

    The options are all four answers in a shuffled order, so the letter carries no prior and
    the answer cannot be read off the option position. `shuffle_options=False` keeps them in
    one fixed order, so a letter names an answer: what a tiny LLM trained for minutes can
    learn (matching an answer to its place in a shuffled list is a skill of its own).
    """
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    rng = _rng(seed, split, "qa", i)
    image, box, colour, shape, mark = _scene_sign(rng, cfg, marks=question == "mark")
    answers = SIGN_SHAPES if question == "shape" else tuple(MARK_COLOURS)
    shuffled = [str(s) for s in rng.permutation(answers)]  # drawn either way: the same scenes
    options = shuffled if shuffle_options else list(answers)
    ask = shape_question if question == "shape" else mark_question
    letter = LETTERS[options.index(shape if question == "shape" else mark)]
    return _sample(f"{split}-qa-{i:08d}", image, (ask(colour, options), letter), box, "qa",
                   QA_SOURCE, cfg, answer=letter, options=options, category=question)


def grounding_sample(seed: int, i: int, cfg: SynthConfig = DEFAULT_CONFIG, *, split: str = "train",
                     marks: bool = False) -> Sample:
    """Sample `i` of the grounding stream: a sign named by colour and its box (`marks`: scenes
    with dots on the signs, as the mark questions' are).

    The answer (the shape word) keeps the conversation well-formed; grounding samples
    train only the token selection, so it is never a language target.
    """
    rng = _rng(seed, split, "grounding", i)
    image, box, colour, shape, _ = _scene_sign(rng, cfg, marks=marks)
    return _sample(f"{split}-grounding-{i:08d}", image, (look_prompt(colour), shape), box, "grounding",
                   GROUNDING_SOURCE, cfg)


def vocabulary_texts() -> list[str]:
    """Every text the samples can hold, one per line, for training a tokenizer.

    Both kinds of prompt over every colour and option order (2 x 96 + 4 of them), then the
    answers and the bare words. The `<image>` placeholder is left out: it becomes the image
    token, never text.
    """
    questions = []
    for ask, answers in ((shape_question, SIGN_SHAPES), (mark_question, tuple(MARK_COLOURS))):
        orders = itertools.permutations(answers)
        questions += [ask(c, list(p)) for c, p in itertools.product(SIGN_COLOURS, orders)]
    looks = [look_prompt(c) for c in SIGN_COLOURS]
    words = [*SIGN_SHAPES, *MARK_COLOURS]
    options = [f"({letter}) {word}" for letter, word in itertools.product(LETTERS, words)]
    return [*questions, *looks, *options, *LETTERS, *words, *SIGN_COLOURS]


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
                 shuffle_options: bool = True, question: str = "shape") -> dict[str, int]:
    """Write the train/qa, train/grounding and eval/qa sources and texts.txt under `uri`;
    `question` is what the QA asks (the grounding scenes carry marks when it is "mark").

    A source asked for 0 samples is not written. Returns {"train/qa": count, ...} for the
    sources written, the counts read back from their indexes.
    """
    plan = {("train", "qa"): train, ("train", "grounding"): grounding, ("eval", "qa"): eval}
    makers = {"qa": (functools.partial(vqa_sample, shuffle_options=shuffle_options, question=question), QA_SOURCE),
              "grounding": (functools.partial(grounding_sample, marks=question == "mark"), GROUNDING_SOURCE)}
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


def resolution_bucket(width: int, height: int) -> str:
    """4KPro's resolution buckets, by the image's long side."""
    side = max(width, height)
    return "4K" if side >= 3000 else "2K" if side >= 1500 else "1K"


def write_benchmark(uri: str, n: int, *, seed: int = 0, cfg: SynthConfig = DEFAULT_CONFIG,
                    shuffle_options: bool = True, question: str = "shape") -> int:
    """`n` held-out questions (their own random stream) as a 4KPro-format benchmark under
    `uri`/eval/4kpro: questions.jsonl (image, question, options, answer, category, bucket,
    box) and the images beside it. Returns the number written."""
    fs, path = filesystem(uri)
    root = f"{path}/{BENCHMARK_FILE}".rsplit("/", 1)[0]
    fs.makedirs(f"{root}/images", exist_ok=True)
    lines = []
    for i in range(n):
        key, meta, [(_, image)] = vqa_sample(seed, i, cfg, split="benchmark", shuffle_options=shuffle_options,
                                             question=question)
        fs.pipe_file(f"{root}/images/{key}.jpg", image)
        width, height = _size(image)
        ask = meta["conversations"][0]["value"].split("\n")[1]  # "<image>", the question, its options...
        lines.append({"id": key, "image": f"images/{key}.jpg", "question": ask, "options": meta["options"],
                      "answer": meta["answer"], "category": meta["category"],
                      "bucket": resolution_bucket(width, height), "box": meta["boxes"][0]})
    fs.pipe_file(f"{path}/{BENCHMARK_FILE}", "".join(json.dumps(line) + "\n" for line in lines).encode())
    return len(lines)


def _size(image: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(image)).size
