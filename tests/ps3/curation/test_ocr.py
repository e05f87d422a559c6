"""Tesseract wrapper: words land where they were drawn, crops caption to their text, and a
missing install says which Debian package to add."""

from __future__ import annotations

import os
import re

import pytesseract
import pytest
from PIL import Image, ImageDraw, ImageFont

from ps3.curation.models import Captioner
from ps3.curation.models.ocr import OcrCaptioner, TesseractOcr, TesseractUnavailable, Word, ocr_words
from ps3.curation.types import CaptionError, CaptionRequest

LINES = [("invoice total amount", (40, 40)), ("payment received today", (40, 120))]


pytestmark = pytest.mark.usefixtures("tesseract")


@pytest.fixture(scope="module")
def page() -> tuple[Image.Image, dict[str, tuple]]:
    """A small white page with two lines of text, and each drawn word's box."""
    image = Image.new("RGB", (640, 200), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=28)
    boxes = {}
    for text, (x, y) in LINES:
        for word in text.split():
            boxes[word] = draw.textbbox((x, y), word, font=font)
            draw.text((x, y), word, fill="black", font=font)
            x = draw.textbbox((x, y), word + " ", font=font)[2]
    return image, boxes


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_words_land_on_the_drawn_words(page):
    image, drawn = page
    words = ocr_words(image)
    assert [w.text for w in words] == [w for text, _ in LINES for w in text.split()]
    for word in words:
        assert _iou(word.box, drawn[word.text]) > 0.6, (word, drawn[word.text])
        assert 0 <= word.conf <= 100
    first, second = {w.line_key for w in words[:3]}, {w.line_key for w in words[3:]}
    assert len(first) == len(second) == 1 and first != second


def test_words_are_frozen_and_blank_pages_give_none():
    assert ocr_words(Image.new("RGB", (200, 100), "white")) == []
    with pytest.raises(AttributeError):
        Word("a", (0, 0, 1, 1)).text = "b"


def test_provenance_names_the_engine():
    ocr = TesseractOcr(lang="eng")
    assert ocr.provenance["name"] == "tesseract" and ocr.provenance["lang"] == "eng"
    assert re.match(r"\d+\.\d+", ocr.provenance["version"])
    assert ocr.provenance["version"] == str(pytesseract.get_tesseract_version())


def test_missing_binary_names_the_package(monkeypatch):
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(TesseractUnavailable, match="install the Debian package tesseract-ocr") as info:
        TesseractOcr()
    assert "\n" not in str(info.value)
    with pytest.raises(TesseractUnavailable):
        ocr_words(Image.new("RGB", (10, 10), "white"))


def test_missing_language_names_its_package():
    with pytest.raises(TesseractUnavailable, match="language 'xx_yy'.*tesseract-ocr-xx-yy"):
        TesseractOcr(lang="eng+xx_yy")


def test_captioner_reads_the_crop(page):
    image, drawn = page
    captioner = OcrCaptioner()
    assert isinstance(captioner, Captioner) and captioner.provenance["name"] == "tesseract"
    line = [drawn[w] for w in LINES[1][0].split()]
    box = (line[0][0] - 4, line[0][1] - 4, line[-1][2] + 4, line[-1][3] + 4)
    word = drawn["total"]
    assert captioner.caption([CaptionRequest(image, box), CaptionRequest(image, word)]) == [LINES[1][0], "total"]


def test_captioner_refuses_global_and_empty_regions(page):
    image, _ = page
    captioner = OcrCaptioner()
    with pytest.raises(ValueError, match="no global captions"):
        captioner.caption([CaptionRequest(image, None)])
    with pytest.raises(CaptionError, match="no text"):
        captioner.caption([CaptionRequest(image, (500, 150, 630, 195))])


def test_ocr_leaves_the_environment_as_it_found_it(monkeypatch):
    """The one-thread limit is for Tesseract only: left behind, later torch workers livelock."""
    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    ocr_words(Image.new("RGB", (200, 60), "white"))
    assert "OMP_THREAD_LIMIT" not in os.environ
