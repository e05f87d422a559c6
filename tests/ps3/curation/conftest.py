"""Raw synthetic inputs for curation tests, and the stages run in-process (no Ray).

The pipeline's own logic (planning, committing, resuming, counting failures) is tested by
feeding it `in_process_stream`, which calls the very stage functions and actor classes
the Ray adapter schedules; `tests/ps3/tasks/test_curate.py` runs them through real Ray Data.
"""

from __future__ import annotations

import os

import pytest

from ps3.curation.actors import Caption, DocumentText, Segment
from ps3.curation.config import CurationConfig
from ps3.curation.stages import read_input, select_boxes
from ps3.data import synth

SMALL = synth.SynthConfig(scene_size=(1024, 1280), doc_long_side=(1024, 1280))


@pytest.fixture(scope="session")
def tesseract():
    """Tesseract's OCR; fails, not skips, without it, unless PS3_ALLOW_NO_TESSERACT=1, so a CI
    image that lost the Debian package cannot pass silently."""
    from ps3.curation.models.ocr import TesseractOcr, TesseractUnavailable, check_tesseract

    try:
        check_tesseract("eng")
    except TesseractUnavailable as exc:
        if os.environ.get("PS3_ALLOW_NO_TESSERACT") == "1":
            pytest.skip(str(exc))
        pytest.fail(f"{exc} (set PS3_ALLOW_NO_TESSERACT=1 to skip)")
    return TesseractOcr()


@pytest.fixture(scope="session")
def raw_inputs(tmp_path_factory) -> dict:
    """4 scenes as JPEG files, 4 document pages as two 2-page PDFs, boxes only in truth.jsonl."""
    root = tmp_path_factory.mktemp("raw")
    return synth.generate_raw(f"file://{root}", 4, seed=3, pages_per_pdf=2, config=SMALL)


def curation_config(output: str, raw: dict, **overrides) -> CurationConfig:
    params = {
        "output": output,
        "sources": [{"name": "scene", "kind": "natural", "uri": raw.get("scene")},
                    {"name": "document", "kind": "document", "uri": raw.get("document")}],
        "masks": {"generator": "classical"}, "captions": {"captioner": "ocr"}, "samplesPerShard": 2,
    }
    params.update(overrides)
    return CurationConfig.model_validate(params)


_ACTORS: dict = {}


def in_process_stream(rows: list[dict], kind: str, config: CurationConfig):
    """The Ray adapter's stages, one row at a time in this process (actors built once per config)."""
    def actor(cls):
        key = (cls, config.model_dump_json())
        if key not in _ACTORS:
            _ACTORS[key] = cls(config)
        return _ACTORS[key]

    for row in rows:
        row = read_input(row, config)
        if kind == "natural":
            row = actor(Segment)([row])[0]
            row = select_boxes(row, config)
            row = actor(Caption)([row])[0]
        else:
            row = actor(DocumentText)([row])[0]
        yield row
