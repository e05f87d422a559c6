"""Tesseract OCR through pytesseract: words with boxes for document pages, text for crops.

Documents get their (box, caption) pairs from OCR (paper appendix A: IDL sentence boxes,
PDFA word boxes); where a source ships no OCR, Tesseract stands in for it. The binary is a
system package, so its absence is reported once, by name, instead of as a subprocess error.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import numpy as np
import pytesseract
from PIL import Image, ImageOps

from ps3.curation.types import Box, CaptionError, CaptionRequest

# Tesseract's OpenMP threads oversubscribe the CPUs as soon as several pages run at once
# (Ray actors): 5x slower on 2 cores here, worse on more (tesseract-ocr/tesseract#3109).
# Parallelism comes from running pages side by side, so each process gets one thread.
# pytesseract passes os.environ to the subprocess and takes no env of its own, so the limit is
# set around each call only: left in os.environ it would reach every process started later
# (torch's OpenMP workers under it livelock in gloo collectives).
_THREADS_ENV = "OMP_THREAD_LIMIT"
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_thread():
    with _ENV_LOCK:
        before = os.environ.get(_THREADS_ENV)
        os.environ.setdefault(_THREADS_ENV, "1")
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_THREADS_ENV, None)


class TesseractUnavailable(RuntimeError):
    """The tesseract binary, or its data for a language, is not installed."""


@dataclass(frozen=True)
class Word:
    """One OCR word: `box` is (x0, y0, x1, y1) in image pixels.

    `block`, `par`, `line` are Tesseract's layout numbers (or a source's line number), kept
    so words can be regrouped into lines and runs never jump between blocks or columns.
    `conf` is Tesseract's 0-100 confidence, None where a source gave none.
    """

    text: str
    box: Box
    conf: float | None = None
    block: int = 0
    par: int = 0
    line: int = 0

    @property
    def line_key(self) -> tuple[int, int, int]:
        return self.block, self.par, self.line


def _debian_package(lang: str) -> str:
    return "tesseract-ocr-" + lang.lower().replace("_", "-")


def check_tesseract(lang: str = "eng") -> str:
    """Tesseract's version, after checking the binary runs and knows every `lang` ("eng+deu")."""
    try:
        version = str(pytesseract.get_tesseract_version())
        installed = set(pytesseract.get_languages())
    except pytesseract.TesseractNotFoundError:
        raise TesseractUnavailable(
            f"tesseract binary not found ({pytesseract.pytesseract.tesseract_cmd!r}): "
            f"install the Debian package tesseract-ocr and {_debian_package(lang.split('+')[0])}") from None
    missing = [part for part in lang.split("+") if part not in installed]
    if missing:
        raise TesseractUnavailable(
            f"tesseract has no data for language {missing[0]!r}: install the Debian package "
            f"{_debian_package(missing[0])}")
    return version


def text_height(image: Image.Image) -> float | None:
    """Typical height in px of a line of text (ascender to descender), or None if unsure.

    Rows holding dark pixels form one run per text line; the median run is the line height.
    Runs under 4 px are rules or noise. Columns whose lines do not align merge their runs,
    which overestimates the height: the safe side, since it only skips upscaling.
    """
    gray = np.asarray(image.convert("L"), dtype=np.int16)
    background, ink = float(np.median(gray)), float(np.percentile(gray, 0.5))
    if background - ink < 60:  # no dark-on-light text to measure
        return None
    rows = ((gray < (background + ink) / 2).sum(axis=1) >= 2).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], rows, [0]])))
    runs = edges[1::2] - edges[::2]
    runs = runs[runs >= 4]
    return float(np.median(runs)) if len(runs) else None


def ocr_words(image: Image.Image, lang: str = "eng", psm: int = 3, timeout_s: float = 120,
              scale: float = 1.0) -> list[Word]:
    """Every word Tesseract reads in `image`, in its reading order, boxes in `image` pixels.

    psm 3 (automatic layout) suits whole pages; a crop of a line or paragraph reads better with
    6 (one uniform block). `scale` > 1 upsamples first (small text, see `TesseractOcr`).
    Layout rows (conf -1) and empty words are dropped.
    """
    image = image.convert("RGB")
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    try:
        with _one_thread():
            data = pytesseract.image_to_data(image, lang=lang, config=f"--psm {psm}",
                                             output_type=pytesseract.Output.DICT, timeout=timeout_s)
    except pytesseract.TesseractNotFoundError:
        check_tesseract(lang)  # raises the one-line message
        raise
    words = []
    for i, text in enumerate(data["text"]):
        conf = float(data["conf"][i])
        if conf < 0 or not text.strip():
            continue
        x, y, w, h = (int(data[k][i]) / scale for k in ("left", "top", "width", "height"))
        words.append(Word(text.strip(), (x, y, x + w, y + h), conf,
                          int(data["block_num"][i]), int(data["par_num"][i]), int(data["line_num"][i])))
    return words


class TesseractOcr:
    """Page OCR for the document stage; checks the install once, when the actor starts.

    Pages whose text is under `text_px` high are upsampled to it first (at most `max_scale`):
    Tesseract merges words and stretches their boxes to the line spacing on ~10 px text,
    which is what 10-point print is at the paper's 150 DPI. On synthetic pages (1-2K px)
    this raised line boxes with IoU > 0.7 against the truth from 69% to 94% (1.3 -> 3.1 s/page).
    """

    def __init__(self, lang: str = "eng", psm: int = 3, timeout_s: float = 120, text_px: int = 24,
                 max_scale: float = 3.0):
        version = check_tesseract(lang)
        self.lang, self.psm, self.timeout_s = lang, psm, timeout_s
        self.text_px, self.max_scale = text_px, max_scale
        self.provenance = {"name": "tesseract", "version": version, "lang": lang, "psm": psm, "text_px": text_px}

    def scale_for(self, image: Image.Image) -> float:
        height = text_height(image)
        return 1.0 if height is None else float(np.clip(self.text_px / height, 1.0, self.max_scale))

    def words(self, image: Image.Image) -> list[Word]:
        return ocr_words(image, self.lang, self.psm, self.timeout_s, scale=self.scale_for(image))


class OcrCaptioner:
    """A Captioner whose local caption is the text read in the region: for text regions only.

    Crops are padded with white, since Tesseract misreads glyphs that touch the border; small
    text is upsampled as for pages.
    """

    def __init__(self, lang: str = "eng", psm: int = 6, pad: int = 8, timeout_s: float = 60):
        self.ocr = TesseractOcr(lang, psm, timeout_s)
        self.pad = pad
        self.provenance = {**self.ocr.provenance, "input": "crop"}

    def caption(self, requests: list[CaptionRequest]) -> list[str]:
        return [self._caption(request) for request in requests]

    def _caption(self, request: CaptionRequest) -> str:
        if request.box is None:
            raise ValueError("OcrCaptioner writes no global captions: OCR reads text regions, not scenes")
        x0, y0, x1, y1 = (round(v) for v in request.box)
        crop = request.image.convert("RGB").crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
        crop = ImageOps.expand(crop, border=self.pad, fill=(255, 255, 255))
        text = " ".join(word.text for word in self.ocr.words(crop))
        if not text:
            raise CaptionError(f"OCR read no text in box {tuple(round(v) for v in request.box)}")
        return text
