"""Multiple-choice benchmarks in their public layouts, read into one `Question` form, and scored.

Three layouts (`../shared/reference/vila_hd_reference.md` section 7):

- `4kpro`: a JSONL file, one question per line: {"id", "image" (a path relative to the file,
  or a URI), "question", "options": [...], "answer" (a letter, or the option's text),
  "category", "bucket"? (1K/2K/4K; from the image's long side when absent), "box"? or
  "boxes"? ([x0, y0, x1, y1] in image pixels)}. Scored overall, per category, per bucket.
- `vstar`: V*-Bench as its authors ship it, one folder per category (direct_attributes,
  relative_position) of images, each with a JSON beside it: {"question", "options" (the
  correct one first), "bbox": [[x, y, w, h], ...], "target_object": [...]}. The options are
  put in an order drawn from the question's id, the same on every run, so the answer is
  not always (A).
- `vstar_lmms`: lmms-eval's form of V*, JSONL or parquet rows of {"image" (path, or the
  image itself), "text" (the question with "(A) ..." options inline, maybe an instruction
  after them), "label" (a letter), "category", "question_id"}. It carries no boxes.

A line or file that cannot be scored is a `Problem` (where it came from, what is wrong),
never a crash and never a question: a run reports how many there were and the first of
them. Only a benchmark that cannot be read at all (no such file, nothing parseable) raises
`BenchmarkError`.
"""

from __future__ import annotations

import io
import json
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from ps3.data.fs import filesystem

from .params import DEFAULT_INSTRUCTION
from .synth import resolution_bucket

LETTERS = "ABCDEFGH"
FORMATS = ("4kpro", "vstar", "vstar_lmms")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
MAX_LISTED_PROBLEMS = 20
_BOX_SLACK = 1.0  # px: annotation tools round outwards


class BenchmarkError(ValueError):
    """The benchmark cannot be read at all: nothing to score."""


@dataclass(frozen=True)
class Problem:
    where: str  # "questions.jsonl:12", "direct_attributes/sa_1.json"
    kind: str  # bad_json, missing_field, bad_options, answer_not_option, unknown_category, image_decode, bad_box
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.detail}"


@dataclass
class Question:
    qid: str
    benchmark: str  # its format
    image: str | bytes  # a URI, or the image itself (parquet rows carry it)
    question: str  # without the options
    options: list[str]
    answer: str  # the right option's letter
    category: str
    bucket: str | None = None  # resolution bucket; filled from the image when the benchmark has none
    boxes: list[list[float]] = field(default_factory=list)  # [x0, y0, x1, y1] in image pixels
    line: str = ""  # where it was read from, for problems found later


class _Skip(Exception):
    """One line or file is unusable: becomes a Problem."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def read_benchmark(uri: str, format: str, *, categories: Sequence[str] | None = None
                   ) -> tuple[list[Question], list[Problem]]:
    """(questions, problems) of the benchmark at `uri` in `format` (one of `FORMATS`).

    `categories` limits the allowed categories (V*'s two by default for `vstar`); a question
    of another category is a problem, not silently dropped.
    """
    readers = {"4kpro": _read_4kpro, "vstar": _read_vstar, "vstar_lmms": _read_vstar_lmms}
    if format not in readers:
        raise BenchmarkError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    if categories is None and format == "vstar":
        categories = VSTAR_CATEGORIES
    questions, problems = readers[format](uri.rstrip("/"))
    if categories is not None:
        allowed = set(categories)
        for q in [q for q in questions if q.category not in allowed]:
            problems.append(Problem(q.line, "unknown_category", f"{q.category!r} is not one of {sorted(allowed)}"))
        questions = [q for q in questions if q.category in allowed]
    seen: set[str] = set()
    unique = []
    for q in questions:
        if q.qid in seen:
            problems.append(Problem(q.line, "duplicate_id", f"id {q.qid!r} seen before"))
        else:
            seen.add(q.qid)
            unique.append(q)
    return unique, problems


# -- 4KPro ------------------------------------------------------------------------------------

def _questions(uri: str, rows: Iterable[tuple[int, dict]], make, problems: list[Problem]
               ) -> tuple[list[Question], list[Problem]]:
    """Each numbered row as a Question by `make(uri, number, row)`, or a Problem at its line."""
    questions = []
    for number, row in rows:
        try:
            questions.append(make(uri, number, row))
        except _Skip as exc:
            problems.append(Problem(_where(uri, number), exc.kind, exc.detail))
    return questions, problems


def _read_4kpro(uri: str) -> tuple[list[Question], list[Problem]]:
    problems: list[Problem] = []
    return _questions(uri, _json_rows(uri, _read_lines(uri), problems), _4kpro_question, problems)


def _4kpro_question(uri: str, number: int, row: dict) -> Question:
    _require(row, "image", "question", "options", "answer", "category")
    options = _options(row["options"])
    answer = _answer_letter(row["answer"], options)
    raw_boxes = row.get("boxes", [row["box"]] if row.get("box") is not None else [])
    boxes = [_xyxy(box) for box in _list(raw_boxes, "boxes")]
    bucket = row.get("bucket")
    return Question(qid=str(row.get("id", number)), benchmark="4kpro", image=_beside(uri, str(row["image"])),
                    question=str(row["question"]).strip(), options=options, answer=answer,
                    category=str(row["category"]), bucket=None if bucket is None else str(bucket), boxes=boxes,
                    line=_where(uri, number))


# -- V* as its authors ship it ---------------------------------------------------------------

def _read_vstar(root: str) -> tuple[list[Question], list[Problem]]:
    fs, path = filesystem(root)
    if not fs.isdir(path):
        raise BenchmarkError(f"{root} is not a folder of V* category folders")
    questions, problems = [], []
    folders = sorted(p for p in fs.ls(path, detail=False) if fs.isdir(p))
    for folder in folders:
        category = folder.rstrip("/").rsplit("/", 1)[-1]
        files = sorted(fs.ls(folder, detail=False))
        images = {f.rsplit(".", 1)[0]: f for f in files if f.lower().endswith(IMAGE_EXTS)}
        for annotation in (f for f in files if f.endswith(".json")):
            where = f"{category}/{annotation.rsplit('/', 1)[-1]}"
            try:
                questions.append(_vstar_question(fs, annotation, category, images, where, root))
            except _Skip as exc:
                problems.append(Problem(where, exc.kind, exc.detail))
    if not questions and not problems:
        raise BenchmarkError(f"{root} holds no category folders with JSON annotations")
    return questions, problems


def _vstar_question(fs, annotation: str, category: str, images: dict[str, str], where: str,
                    root: str) -> Question:
    try:
        row = json.loads(fs.cat_file(annotation))
    except ValueError as exc:
        raise _Skip("bad_json", str(exc)) from None
    if not isinstance(row, dict):
        raise _Skip("bad_json", "not an object")
    _require(row, "question", "options")
    stem = annotation.rsplit(".", 1)[0]
    if stem not in images:
        raise _Skip("image_decode", f"no image beside it ({stem.rsplit('/', 1)[-1]}.jpg/.png/...)")
    qid = f"{category}/{stem.rsplit('/', 1)[-1]}"
    ordered = _options(row["options"])
    options = _shuffled(ordered, qid)  # the authors list the right option first
    boxes = [_xywh(box) for box in _list(row.get("bbox", []), "bbox")]
    protocol = root.split("://", 1)[0] + "://" if "://" in root else ""
    return Question(qid=qid, benchmark="vstar", image=protocol + images[stem], question=str(row["question"]).strip(),
                    options=options, answer=LETTERS[options.index(ordered[0])], category=category, boxes=boxes,
                    line=where)


def _shuffled(options: list[str], qid: str) -> list[str]:
    """The options in an order that depends only on the question's id."""
    order = list(options)
    random.Random(zlib.crc32(qid.encode())).shuffle(order)
    return order


# -- V* as lmms-eval ships it ----------------------------------------------------------------

_INLINE_OPTION = re.compile(r"\(([A-H])\)\s*")


def _read_vstar_lmms(uri: str) -> tuple[list[Question], list[Problem]]:
    problems: list[Problem] = []
    if uri.endswith(".parquet"):
        rows = enumerate(_parquet_rows(uri), start=1)
    else:
        rows = _json_rows(uri, _read_lines(uri), problems)
    return _questions(uri, rows, _lmms_question, problems)


def _lmms_question(uri: str, number: int, row: dict) -> Question:
    _require(row, "image", "text", "label", "category")
    question, options = split_inline_options(str(row["text"]))
    if len(options) < 2:
        raise _Skip("bad_options", "fewer than two '(A) ...' options in the text")
    image = row["image"]
    if isinstance(image, dict):  # parquet's image struct: {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    if not isinstance(image, (bytes, str)) or not image:
        raise _Skip("missing_field", "image holds neither bytes nor a path")
    return Question(qid=str(row.get("question_id", number)), benchmark="vstar_lmms",
                    image=image if isinstance(image, bytes) else _beside(uri, image), question=question,
                    options=options, answer=_answer_letter(row["label"], options), category=str(row["category"]),
                    line=_where(uri, number))


def split_inline_options(text: str) -> tuple[str, list[str]]:
    """("question", ["option", ...]) of a text with "(A) ..." options inline.

    What follows the last option on a line of its own (lmms-eval appends an instruction)
    is dropped; the question is everything before "(A)".
    """
    parts = _INLINE_OPTION.split(text)
    question, options = parts[0].strip(), []
    for i, (letter, body) in enumerate(zip(parts[1::2], parts[2::2])):
        if letter != LETTERS[i]:
            break  # "(C)" after "(A)": not an option list any more
        options.append(body.split("\n", 1)[0].strip() if i == len(parts[1::2]) - 1 else body.strip())
    return question, options


def _parquet_rows(uri: str) -> Iterable[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError("reading parquet needs pyarrow (pip install pyarrow)") from None
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as stream:
            return pq.read_table(stream).to_pylist()
    except FileNotFoundError:
        raise BenchmarkError(f"{uri} does not exist") from None
    except Exception as exc:  # pyarrow raises its own kinds for a file that is not parquet  # noqa: BLE001
        raise BenchmarkError(f"{uri} is not a readable parquet file: {exc}") from None


# -- Shared parsing --------------------------------------------------------------------------

def _read_lines(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise BenchmarkError(f"{uri} does not exist") from None
    except IsADirectoryError:
        raise BenchmarkError(f"{uri} is a folder, not a JSONL file") from None
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{uri} is not UTF-8 text: {exc}") from None


def _json_rows(uri: str, lines: list[str], problems: list[Problem]) -> Iterable[tuple[int, dict]]:
    """(line number, object) of the JSONL lines that parse; the others become problems."""
    parsed = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            problems.append(Problem(_where(uri, number), "bad_json", str(exc)))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(_where(uri, number), "bad_json", "not an object"))
            continue
        parsed += 1
        yield number, row
    if not parsed and problems:
        raise BenchmarkError(f"{uri}: no line is a JSON object (first: {problems[0]})")


def _where(uri: str, number: int) -> str:
    return f"{uri.rsplit('/', 1)[-1]}:{number}"


def _require(row: dict, *names: str) -> None:
    missing = [n for n in names if row.get(n) in (None, "")]
    if missing:
        raise _Skip("missing_field", f"no {', '.join(missing)}")


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise _Skip("bad_box", f"{name} is not a list")
    return value


def _options(value) -> list[str]:
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS):
        raise _Skip("bad_options", f"options must be a list of 2 to {len(LETTERS)}, got {value!r}"[:200])
    return [str(v).strip() for v in value]


def _answer_letter(answer, options: list[str]) -> str:
    """The right option's letter, from a letter ("B", "(B)") or the option's own text."""
    text = str(answer).strip()
    letter = text.strip("()").upper()
    if len(letter) == 1 and letter in LETTERS:
        if LETTERS.index(letter) < len(options):
            return letter
        raise _Skip("answer_not_option", f"answer {text!r} but only {len(options)} options")
    matches = [i for i, option in enumerate(options) if option.lower() == text.lower()]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise _Skip("answer_not_option", f"answer {text!r} is neither a letter nor one of the options")


def _xyxy(box) -> list[float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise _Skip("bad_box", f"box {box!r} is not [x0, y0, x1, y1]") from None
    if not (x1 > x0 and y1 > y0):
        raise _Skip("bad_box", f"box {box!r} has no area")
    return [x0, y0, x1, y1]


def _xywh(box) -> list[float]:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise _Skip("bad_box", f"bbox {box!r} is not [x, y, w, h]") from None
    return _xyxy([x, y, x + w, y + h])


def _beside(uri: str, image: str) -> str:
    """An image path relative to the benchmark file, or the URI/absolute path as given."""
    if "://" in image or image.startswith("/"):
        return image
    return f"{uri.rsplit('/', 1)[0]}/{image}" if "/" in uri else image


# -- Images, prompts, letters, scores --------------------------------------------------------

def check_image(question: Question, data: bytes | None) -> Problem | None:
    """A problem if the image cannot be decoded or a box falls outside it; else None (and the
    question's bucket filled from the image's size when the benchmark gave none)."""
    if data is None:
        return Problem(question.line, "image_decode", f"cannot read {_short(question.image)}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except Exception as exc:  # PIL raises many kinds for a bad file  # noqa: BLE001
        return Problem(question.line, "image_decode", f"{_short(question.image)}: {exc}")
    for box in question.boxes:
        x0, y0, x1, y1 = box
        if x0 < -_BOX_SLACK or y0 < -_BOX_SLACK or x1 > width + _BOX_SLACK or y1 > height + _BOX_SLACK:
            return Problem(question.line, "bad_box", f"box {box} outside the {width}x{height} image")
    if question.bucket is None:
        question.bucket = resolution_bucket(width, height)
    return None


def _short(image: str | bytes) -> str:
    return f"<{len(image)} image bytes>" if isinstance(image, bytes) else image


def problems_summary(problems: Sequence[Problem]) -> dict:
    """What a run reports of its problems: the count by kind and the first few, located."""
    return {"count": len(problems), "by_kind": dict(Counter(p.kind for p in problems)),
            "first": [str(p) for p in problems[:MAX_LISTED_PROBLEMS]]}


def prompt_text(question: Question, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The question as the model reads it: the question, one "(A) option" line each, the instruction."""
    lines = [question.question, *(f"({LETTERS[i]}) {o}" for i, o in enumerate(question.options))]
    return "\n".join(lines + ([instruction] if instruction else []))


_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-H])(?:[)\].:,]|\s*$)")
_NAMED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*[(\[]?([A-H])(?![A-Za-z])")
_BRACKETED_LETTER = re.compile(r"\(([A-H])\)")
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")


def extract_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer gives, or None when it gives none (or several).

    In order: a leading letter ("B", "(B) white", "B."), a named one ("the answer is B"), a
    bracketed one ("... (B) ..."), an option's text said in full (exactly one option, the
    longest when one contains another), a lone capital letter (only one distinct, and not
    the article "A" opening a sentence).
    """
    valid = LETTERS[:len(options)]
    for pattern in (_LEADING_LETTER, _NAMED_LETTER, _BRACKETED_LETTER):
        match = pattern.search(text)
        if match and match.group(1) in valid:
            return match.group(1)
    said = [i for i, option in enumerate(options)
            if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", text, re.IGNORECASE)]
    if said:
        longest = max(said, key=lambda i: len(options[i]))
        if all(options[i].lower() in options[longest].lower() for i in said):
            return valid[longest]
        return None
    lone = {m.group(1) for m in _LONE_LETTER.finditer(text) if m.group(1) in valid and not _article(text, m)}
    return lone.pop() if len(lone) == 1 else None


def _article(text: str, match: re.Match) -> bool:
    """"A" opening a sentence before a lower-case word ("A red sign."): a word, not a letter."""
    opens = not text[:match.start()].strip() or text[:match.start()].rstrip()[-1] in ".!?"
    return match.group(1) == "A" and opens and re.match(r"\s+[a-z]", text[match.end():]) is not None


def score(records: Sequence[tuple[Question, str | None]]) -> dict:
    """Accuracy overall, per category and per resolution bucket; `no_letter` counts answers
    that named no option (scored wrong, as lmms-eval does)."""
    def accuracy(pairs: list[tuple[Question, str | None]]) -> dict:
        right = sum(q.answer == letter for q, letter in pairs)
        return {"accuracy": round(right / len(pairs), 4) if pairs else 0.0, "n": len(pairs)}

    def grouped(key) -> dict:
        groups: dict[str, list] = {}
        for q, letter in records:
            if key(q) is not None:
                groups.setdefault(key(q), []).append((q, letter))
        return {name: accuracy(pairs) for name, pairs in sorted(groups.items())}

    return {**accuracy(list(records)), "correct": sum(q.answer == letter for q, letter in records),
            "no_letter": sum(letter is None for _, letter in records),
            "per_category": grouped(lambda q: q.category), "per_bucket": grouped(lambda q: q.bucket)}
