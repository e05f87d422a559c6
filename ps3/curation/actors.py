"""Stateful stages: a model loaded once per Ray actor, applied to batches of rows.

Each class is a Ray Data callable class (state in `__init__`, work in `__call__`); tests call
them directly on a list of rows. Models come from `models/` and are built from the run's
config on the actor, never on the driver, so the driver needs neither weights nor a GPU.
"""

from __future__ import annotations

import concurrent.futures
import logging

import pandas as pd

from .config import CaptionConfig, CurationConfig, MaskConfig
from .types import CaptionError
from .stages import attach_captions, caption_requests, document_text, is_failed, segment

log = logging.getLogger(__name__)


def build_mask_generator(config: MaskConfig, device: str):
    if config.generator == "sam":
        from .models.sam import SamMaskGenerator

        return SamMaskGenerator(
            config.checkpoint, model_type=config.model_type, points_per_side=config.points_per_side,
            points_per_batch=config.points_per_batch, crop_n_layers=config.crop_n_layers,
            crop_n_points_downscale_factor=config.crop_n_points_downscale_factor,
            pred_iou_thresh=config.pred_iou_thresh, stability_score_thresh=config.stability_score_thresh,
            min_mask_region_area=config.min_mask_region_area, work_side=config.work_side, device=device)
    from .models.classical import ClassicalSegmenter

    return ClassicalSegmenter(work_side=config.work_side)


def build_captioner(config: CaptionConfig, device: str, lang: str = "eng"):
    if config.captioner == "qwen2-vl":
        from .models.qwen2_vl import Qwen2VLCaptioner

        return Qwen2VLCaptioner(config.model, local_prompt=config.local_prompt, global_prompt=config.global_prompt,
                                max_pixels=config.max_pixels, max_new_tokens=config.max_new_tokens, device=device)
    from .models.ocr import OcrCaptioner

    return OcrCaptioner(lang=lang)


def _rows(batch: pd.DataFrame | list[dict]) -> list[dict]:
    return batch.to_dict("records") if isinstance(batch, pd.DataFrame) else list(batch)


def _frame(rows: list[dict], like) -> pd.DataFrame | list[dict]:
    return pd.DataFrame(rows, columns=list(rows[0])) if isinstance(like, pd.DataFrame) else rows


class Segment:
    def __init__(self, config: CurationConfig, device: str = "cpu"):
        self.generator = build_mask_generator(config.masks, device)

    def __call__(self, batch):
        rows = [segment(row, self.generator) for row in _rows(batch)]
        return _frame(rows, batch)


class CaptionCalls:
    """Captioner calls in batches, each bounded by a timeout and retried.

    A batch that fails is retried request by request, so one bad request costs only its
    own box; a request the captioner declines (`CaptionError`, e.g. OCR finds no text) is
    dropped at once, and errors and timeouts alike are retried `retries` times, then the box
    is dropped. A call that times out cannot be interrupted (a model forward holds no
    cancellation point): its thread is abandoned and the retry runs on a fresh one.
    """

    def __init__(self, captioner, config: CaptionConfig):
        self.captioner, self.config = captioner, config
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.errors = 0

    def _call(self, requests: list) -> list[str]:
        future = self._pool.submit(self.captioner.caption, requests)
        try:
            return future.result(timeout=self.config.timeout_s)
        except concurrent.futures.TimeoutError:
            self._pool.shutdown(wait=False)
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            raise TimeoutError(f"caption call took over {self.config.timeout_s:g} s") from None

    def captions(self, requests: list) -> list[str | None]:
        out: list[str | None] = []
        for start in range(0, len(requests), self.config.batch_size):
            chunk = requests[start:start + self.config.batch_size]
            try:
                out += self._call(chunk)
            except Exception:  # noqa: BLE001 - any captioner failure: retry one by one
                out += [self._one(r) for r in chunk]
        return out

    def _one(self, request) -> str | None:
        for attempt in range(self.config.retries + 1):
            try:
                return self._call([request])[0]
            except CaptionError:  # an answer ("no text in this box"), not a fault: retrying cannot help
                return None
            except Exception as exc:  # noqa: BLE001 - a caption is dropped, never the pipeline
                self.errors += 1
                log.warning("caption attempt %d/%d failed: %s: %s", attempt + 1, self.config.retries + 1,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


class Caption:
    def __init__(self, config: CurationConfig, device: str = "cpu"):
        self.config = config
        captioner = build_captioner(config.captions, device, config.documents.lang)
        self.calls = CaptionCalls(captioner, config.captions)
        self.global_ok = config.captions.captioner != "ocr"  # OCR reads text regions, it cannot describe a scene

    def __call__(self, batch):
        rows = _rows(batch)
        live = [i for i, row in enumerate(rows) if not is_failed(row)]
        per_row = [caption_requests(rows[i], self.config, global_ok=self.global_ok) for i in live]
        flat = self.calls.captions([r for requests in per_row for r in requests])
        for i, requests in zip(live, per_row):
            mine, flat = flat[:len(requests)], flat[len(requests):]
            rows[i] = attach_captions(rows[i], mine, self.calls.captioner.provenance)
        return _frame(rows, batch)


class DocumentText:
    def __init__(self, config: CurationConfig, device: str = "cpu"):
        from .models.ocr import TesseractOcr

        self.config = config
        self.ocr = TesseractOcr(lang=config.documents.lang)

    def __call__(self, batch):
        rows = [document_text(row, self.config, self.ocr) for row in _rows(batch)]
        return _frame(rows, batch)
