"""Document pages -> (box, caption) pairs, as the paper builds them from IDL and PDFA (appendix A).

Pages are PDFs rendered at 150 DPI (or images). Their words come from Tesseract or from OCR
the source ships (`parse_ocr_json`). IDL-like sources give one random sentence per box with
its text; PDFA-like ones a run of 15 consecutive words, their union box and joined text.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pypdfium2 as pdfium
from PIL import Image

from ps3.curation.models.ocr import Word
from ps3.curation.types import Box

#: A rendered page larger than this is refused: a poster-sized page at 150 DPI would hold
#: an actor's memory for a page the pre-training crops (1K-4K) could never use whole.
MAX_PAGE_PIXELS = 64_000_000


class DocumentError(ValueError):
    """A PDF or an OCR JSON that cannot be read; the stage records it per item."""


# ---- PDF -----------------------------------------------------------------------------------

def _open_pdf(data: bytes) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise DocumentError(f"cannot open PDF ({len(data)} bytes): {exc}") from None


def pdf_page_count(data: bytes) -> int:
    pdf = _open_pdf(data)
    try:
        return len(pdf)
    finally:
        pdf.close()


def render_pdf_page(data: bytes, page: int, dpi: int = 150) -> Image.Image:
    """Page `page` (0-based) as an RGB image at `dpi` (a US letter page at 150 DPI: 1275x1650).

    The size is round(points * dpi / 72), so a page saved at some DPI renders back at its
    pixel size; pdfium rounds up, adding a blank pixel row or column on float error.
    """
    pdf = _open_pdf(data)
    try:
        if not 0 <= page < len(pdf):
            raise DocumentError(f"PDF has {len(pdf)} pages, no page {page}")
        try:
            handle = pdf[page]
            width, height = (max(1, round(v * dpi / 72)) for v in handle.get_size())
        except pdfium.PdfiumError as exc:
            raise DocumentError(f"cannot load page {page}: {exc}") from None
        if width * height > MAX_PAGE_PIXELS:
            raise DocumentError(f"page {page} renders to {width}x{height} px at {dpi} DPI, "
                                f"over {MAX_PAGE_PIXELS} pixels")
        try:
            image = handle.render(scale=dpi / 72).to_pil().convert("RGB")
        except pdfium.PdfiumError as exc:
            raise DocumentError(f"cannot render page {page}: {exc}") from None
        return image.crop((0, 0, width, height)) if image.size != (width, height) else image
    finally:
        pdf.close()


# ---- OCR JSON ------------------------------------------------------------------------------

def parse_ocr_json(raw: bytes, page: int | None = None) -> list[Word]:
    """Words of the OCR JSON shipped beside a page (`<input>.ocr.json`), in reading order.

    Formats (boxes are [x0, y0, x1, y1] in pixels of the image, or of the page rendered at
    the configured DPI):

    - word level (PDFA-like): {"words": [{"text": "Total", "box": [...], "line": 3}, ...]};
      `line` is optional, without it lines are found from the boxes;
    - sentence level (IDL-like): {"lines": [{"text": "Total due 12.00", "box": [...]}, ...]};
      a line's words get boxes split from its box by character count (exact for the line,
      approximate for a word), so either sampling mode works on either source;
    - a PDF's pages: {"pages": [<one of the above>, ...]}, `page` picks one (0-based).
    """
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DocumentError(f"OCR JSON is not JSON: {exc}") from None
    if isinstance(doc, dict) and "pages" in doc:
        pages = doc["pages"]
        if page is None or not isinstance(pages, list) or not 0 <= page < len(pages):
            raise DocumentError(f"OCR JSON 'pages' has no page {page}")
        doc = pages[page]
    if isinstance(doc, dict) and isinstance(doc.get("words"), list):
        words = [_word(item, f"words[{i}]", i) for i, item in enumerate(doc["words"])]
        words = [w for w in words if w.text]
        return words if all("line" in item for item in doc["words"]) else _infer_lines(words)
    if isinstance(doc, dict) and isinstance(doc.get("lines"), list):
        lines = [_word(item, f"lines[{i}]", i) for i, item in enumerate(doc["lines"])]
        return [w for line in lines for w in _split_line(line)]
    raise DocumentError("OCR JSON needs a 'words' or 'lines' list (or 'pages' of them)")


def _word(item, where: str, index: int) -> Word:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise DocumentError(f"OCR JSON {where}: expected an object with a 'text' string")
    box = item.get("box")
    if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
            or box[0] > box[2] or box[1] > box[3]):
        raise DocumentError(f"OCR JSON {where}.box: expected [x0, y0, x1, y1] with x0<=x1, y0<=y1, got {box!r}")
    line = item.get("line", index)
    if not isinstance(line, int):
        raise DocumentError(f"OCR JSON {where}.line: expected an integer, got {line!r}")
    return Word(item["text"].strip(), tuple(float(v) for v in box), line=line)


def _split_line(line: Word) -> list[Word]:
    x0, y0, x1, y1 = line.box
    per_char = (x1 - x0) / max(1, len(line.text))
    words, start = [], 0
    for text in line.text.split():
        start = line.text.index(text, start)
        box = (x0 + start * per_char, y0, x0 + (start + len(text)) * per_char, y1)
        words.append(Word(text, box, line=line.line))
        start += len(text)
    return words


def _infer_lines(words: list[Word]) -> list[Word]:
    """Number lines from geometry: a word starts a new line when it does not sit beside the
    previous one (its vertical centre outside that word's span, or it lies to its left)."""
    out, line = [], 0
    for prev, word in zip([None, *words], words):
        if prev is not None:
            centre = (word.box[1] + word.box[3]) / 2
            if not prev.box[1] <= centre <= prev.box[3] or word.box[0] < prev.box[0]:
                line += 1
        out.append(Word(word.text, word.box, word.conf, line=line))
    return out


# ---- sampling ------------------------------------------------------------------------------

def _union(words: Sequence[Word]) -> Box:
    return (min(w.box[0] for w in words), min(w.box[1] for w in words),
            max(w.box[2] for w in words), max(w.box[3] for w in words))


def sentence_boxes(words: Sequence[Word]) -> list[tuple[Box, str]]:
    """(box, text) of each line, in reading order: the sentence units of IDL-like sampling."""
    groups: dict[tuple[int, int, int], list[Word]] = {}
    for word in words:
        groups.setdefault(word.line_key, []).append(word)
    return [(_union(g), " ".join(w.text for w in g)) for g in groups.values()]


def _run_starts(words: Sequence[Word], run_length: int) -> list[int]:
    """Starts of runs that stay in one block, so a box never spans two columns."""
    return [s for s in range(len(words) - run_length + 1)
            if words[s].block == words[s + run_length - 1].block]


def sample_document_boxes(words: Sequence[Word], mode: Literal["sentence", "words"], count: int, *,
                          run_length: int = 15, rng: np.random.Generator) -> tuple[list[Box], list[str]]:
    """Up to `count` (box, caption) pairs of a page, in reading order; deterministic given `rng`.

    sentence: `count` distinct random lines. words: `count` non-overlapping runs of
    `run_length` consecutive words; a page with fewer words than a run gives none.
    """
    if mode == "sentence":
        lines = sentence_boxes(words)
        picked = sorted(rng.choice(len(lines), min(count, len(lines)), replace=False)) if lines else []
        return [lines[i][0] for i in picked], [lines[i][1] for i in picked]
    if mode != "words":
        raise ValueError(f"mode must be 'sentence' or 'words', got {mode!r}")
    taken: list[int] = []
    for start in rng.permutation(_run_starts(words, run_length)):
        if all(abs(int(start) - t) >= run_length for t in taken):
            taken.append(int(start))
            if len(taken) == count:
                break
    runs = [words[s:s + run_length] for s in sorted(taken)]
    return [_union(r) for r in runs], [" ".join(w.text for w in r) for r in runs]


# ---- OCR quality on synthetic pages --------------------------------------------------------

def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def ocr_word_recall(n_docs: int, seed: int, config=None, ocr=None) -> float:
    """Share of the labelled words of `n_docs` synthetic pages that OCR of the whole page finds.

    A word counts as found when the same string is read with a box overlapping its line's box
    (each read word matches one labelled word). `config` is a `SynthConfig` (default: pages of
    1024-2048 px, kept small for speed); `ocr` anything with `.words(image)` (default Tesseract).
    """
    from ps3.curation.models.ocr import TesseractOcr
    from ps3.data import synth

    config = config or synth.SynthConfig(doc_long_side=(1024, 2048))
    ocr = ocr or TesseractOcr()
    found = total = 0
    for i in range(n_docs):
        data, _, record = synth.sample("document", seed, i, config)
        read = ocr.words(Image.open(io.BytesIO(data)))
        for box, caption in zip(record.boxes, record.captions):
            want = Counter(caption.split())
            got = Counter(w.text for w in read if _overlaps(w.box, box))
            found += sum(min(n, got[text]) for text, n in want.items())
            total += sum(want.values())
    return found / total if total else 0.0
