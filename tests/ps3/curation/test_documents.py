"""Document side of curation: PDF pages render at the asked DPI, OCR JSON is read or refused
by name, and boxes are sampled as in the paper (one sentence; 15 consecutive words)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ps3.curation.documents import (
    DocumentError,
    ocr_word_recall,
    parse_ocr_json,
    pdf_page_count,
    render_pdf_page,
    sample_document_boxes,
    sentence_boxes,
)
from ps3.curation.models.ocr import Word
from ps3.data import synth


def _pdf(*pages: Image.Image, resolution: float = 100.0) -> bytes:
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", resolution=resolution, save_all=True, append_images=list(pages[1:]))
    return buf.getvalue()


def _grid(lines: int, per_line: int, blocks: int = 1) -> list[Word]:
    """Words w0, w1, ... on `lines` lines of `per_line` words, 20 px apart, split into blocks."""
    words = []
    for n in range(lines * per_line):
        line, col = divmod(n, per_line)
        box = (col * 50.0, line * 20.0, col * 50.0 + 40, line * 20.0 + 12)
        words.append(Word(f"w{n}", box, 90.0, block=line * blocks // lines, line=line))
    return words


# ---- PDF ----------------------------------------------------------------------------------

def test_pages_render_at_the_asked_dpi():
    red, blue = Image.new("RGB", (300, 200), (220, 20, 20)), Image.new("RGB", (200, 400), (20, 20, 220))
    data = _pdf(red, blue, resolution=100.0)  # 3 x 2 in and 2 x 4 in
    assert pdf_page_count(data) == 2
    first, second = render_pdf_page(data, 0, dpi=150), render_pdf_page(data, 1, dpi=72)
    assert first.mode == "RGB" and first.size == (450, 300)
    assert render_pdf_page(data, 0, dpi=72).size == (216, 144)
    assert second.size == (144, 288)
    r, g, b = np.asarray(second)[144, 72].tolist()
    assert b > 150 and r < 80  # page 1 is the blue one


@pytest.mark.parametrize("data", [b"", b"not a pdf at all", b"%PDF-1.4\n%garbage"])
def test_unreadable_pdf_is_a_document_error(data):
    with pytest.raises(DocumentError, match="cannot open PDF"):
        pdf_page_count(data)
    with pytest.raises(DocumentError):
        render_pdf_page(data, 0)


def test_missing_page_is_a_document_error():
    with pytest.raises(DocumentError, match="1 pages, no page 3"):
        render_pdf_page(_pdf(Image.new("RGB", (50, 50), "white")), 3)


# ---- OCR JSON ------------------------------------------------------------------------------

def test_word_json_keeps_order_and_lines():
    raw = json.dumps({"words": [{"text": "Total", "box": [10, 10, 60, 30], "line": 0},
                                {"text": " ", "box": [60, 10, 62, 30], "line": 0},
                                {"text": "due", "box": [70, 10, 100, 30], "line": 0},
                                {"text": "Paid", "box": [10, 40, 50, 60], "line": 1}]}).encode()
    words = parse_ocr_json(raw)
    assert [w.text for w in words] == ["Total", "due", "Paid"]
    assert sentence_boxes(words) == [((10.0, 10.0, 100.0, 30.0), "Total due"), ((10.0, 40.0, 50.0, 60.0), "Paid")]


def test_word_json_without_lines_finds_them_from_boxes():
    items = [{"text": t, "box": b} for t, b in [("a", [0, 0, 10, 10]), ("b", [15, 1, 25, 11]), ("c", [0, 20, 10, 30])]]
    lines = sentence_boxes(parse_ocr_json(json.dumps({"words": items}).encode()))
    assert [text for _, text in lines] == ["a b", "c"]


def test_line_json_splits_words_inside_the_line_box():
    raw = json.dumps({"lines": [{"text": "ab cd", "box": [0, 0, 50, 10]}, {"text": "ef", "box": [0, 20, 20, 30]}]})
    words = parse_ocr_json(raw.encode())
    assert [(w.text, w.box) for w in words[:2]] == [("ab", (0.0, 0.0, 20.0, 10.0)), ("cd", (30.0, 0.0, 50.0, 10.0))]
    assert sentence_boxes(words) == [((0.0, 0.0, 50.0, 10.0), "ab cd"), ((0.0, 20.0, 20.0, 30.0), "ef")]


def test_paged_json_picks_the_page():
    raw = json.dumps({"pages": [{"lines": [{"text": "one", "box": [0, 0, 9, 9]}]},
                                {"lines": [{"text": "two", "box": [0, 0, 9, 9]}]}]}).encode()
    assert [w.text for w in parse_ocr_json(raw, page=1)] == ["two"]
    with pytest.raises(DocumentError, match="no page 2"):
        parse_ocr_json(raw, page=2)


@pytest.mark.parametrize("raw, match", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "'words' or 'lines'"),
    (b'{"words": [{"box": [0, 0, 1, 1]}]}', r"words\[0\]: expected an object with a 'text'"),
    (b'{"words": [{"text": "a", "box": [0, 0, 1]}]}', r"words\[0\]\.box"),
    (b'{"lines": [{"text": "a", "box": [5, 0, 1, 1]}]}', r"lines\[0\]\.box"),
    (b'{"words": [{"text": "a", "box": [0, 0, 1, 1], "line": "x"}]}', r"words\[0\]\.line"),
])
def test_malformed_json_names_what_is_wrong(raw, match):
    with pytest.raises(DocumentError, match=match):
        parse_ocr_json(raw)


# ---- sampling ------------------------------------------------------------------------------

def test_sentence_mode_samples_distinct_lines():
    words = _grid(lines=10, per_line=4)
    lines = sentence_boxes(words)
    boxes, captions = sample_document_boxes(words, "sentence", 4, rng=np.random.default_rng(0))
    assert len(set(captions)) == 4 and all((b, c) in lines for b, c in zip(boxes, captions))
    again = sample_document_boxes(words, "sentence", 4, rng=np.random.default_rng(0))
    other = sample_document_boxes(words, "sentence", 4, rng=np.random.default_rng(1))
    assert again == (boxes, captions) and other != again
    assert len(sample_document_boxes(words[:8], "sentence", 4, rng=np.random.default_rng(0))[0]) == 2


def test_words_mode_samples_runs_of_consecutive_words():
    words = _grid(lines=20, per_line=6)
    texts = [w.text for w in words]
    boxes, captions = sample_document_boxes(words, "words", 4, run_length=15, rng=np.random.default_rng(3))
    assert len(captions) == 4
    starts = [texts.index(c.split()[0]) for c in captions]
    assert all(b - a >= 15 for a, b in zip(starts, starts[1:]))  # reading order, no overlap
    for start, box, caption in zip(starts, boxes, captions):
        run = words[start:start + 15]
        assert caption == " ".join(texts[start:start + 15])
        assert box == (min(w.box[0] for w in run), min(w.box[1] for w in run),
                       max(w.box[2] for w in run), max(w.box[3] for w in run))
    assert sample_document_boxes(words, "words", 4, rng=np.random.default_rng(3)) == (boxes, captions)
    assert sample_document_boxes(words, "words", 4, rng=np.random.default_rng(4)) != (boxes, captions)


def test_word_runs_stay_in_one_block_and_need_enough_words():
    words = _grid(lines=8, per_line=4, blocks=2)  # two blocks of 16 words
    for seed in range(10):
        _, captions = sample_document_boxes(words, "words", 4, rng=np.random.default_rng(seed))
        assert 1 <= len(captions) <= 2
        assert all(int(c.split()[0][1:]) // 16 == int(c.split()[-1][1:]) // 16 for c in captions)
    assert sample_document_boxes(words[:14], "words", 4, rng=np.random.default_rng(0)) == ([], [])


# ---- with Tesseract ------------------------------------------------------------------------

def test_ocr_finds_the_labelled_words_of_synthetic_pages(tesseract):
    config = synth.SynthConfig(doc_long_side=(1024, 1200))
    assert ocr_word_recall(2, seed=0, config=config, ocr=tesseract) >= 0.8


def test_rendered_pdf_page_gives_sentence_boxes(tesseract):
    """A synthetic page saved as a PDF at 150 DPI comes back the same size, and its OCR lines
    include the labelled ones, at the same place."""
    config = synth.SynthConfig(doc_long_side=(1024, 1024), texture=False)
    data, _, record = synth.sample("document", 5, 0, config)
    page = Image.open(io.BytesIO(data)).convert("RGB")
    image = render_pdf_page(_pdf(page, resolution=150.0), 0, dpi=150)
    assert image.size == page.size
    lines = dict((text, box) for box, text in sentence_boxes(tesseract.words(image)))
    for box, caption in zip(record.boxes, record.captions):
        assert caption in lines
        assert np.allclose(lines[caption], box, atol=4)
