"""Caption calls: failures and timeouts are retried, then only that box is dropped."""

from __future__ import annotations

import json
import time

from ps3.curation.actors import CaptionCalls
from ps3.curation.config import CaptionConfig
from ps3.curation.stages import attach_captions
from ps3.curation.types import CaptionError, CaptionRequest


class FlakyCaptioner:
    """A captioner with scripted faults (what a crashed or stuck model server does to a call)."""

    provenance = {"name": "flaky"}

    def __init__(self, fail_boxes=(), hang_boxes=(), decline_boxes=(), fail_times=99):
        self.fail_boxes, self.hang_boxes, self.decline_boxes = set(fail_boxes), set(hang_boxes), set(decline_boxes)
        self.fail_times, self.calls = fail_times, []

    def caption(self, requests):
        self.calls.append([r.box for r in requests])
        for r in requests:
            if r.box in self.hang_boxes:
                time.sleep(1.0)
            if r.box in self.decline_boxes:
                raise CaptionError(f"no text in {r.box}")
            if r.box in self.fail_boxes and sum(r.box in c for c in self.calls) <= self.fail_times:
                raise RuntimeError("CUDA error: device-side assert triggered")
        return [f"caption of {r.box}" for r in requests]


def _requests(n):
    return [CaptionRequest(image=None, box=(i, 0, i + 1, 1)) for i in range(n)]


def config(**kw):
    return CaptionConfig(captioner="ocr", batch_size=4, retries=2, timeout_s=0.3, **kw)


def test_a_batch_without_faults_is_one_call():
    captioner = FlakyCaptioner()
    out = CaptionCalls(captioner, config()).captions(_requests(3))
    assert out == [f"caption of {(i, 0, i + 1, 1)}" for i in range(3)] and len(captioner.calls) == 1


def test_a_failing_request_is_retried_and_then_dropped_alone():
    bad = (1, 0, 2, 1)
    captioner = FlakyCaptioner(fail_boxes=[bad])
    calls = CaptionCalls(captioner, config())
    out = calls.captions(_requests(3))
    assert out[1] is None and out[0] and out[2]
    assert sum(c == [bad] for c in captioner.calls) == 3  # 1 try + 2 retries
    assert calls.errors == 3


def test_a_transient_failure_recovers_on_retry():
    bad = (0, 0, 1, 1)
    out = CaptionCalls(FlakyCaptioner(fail_boxes=[bad], fail_times=2), config()).captions(_requests(2))
    assert out[0] == f"caption of {bad}"


def test_a_stuck_call_times_out_is_retried_and_then_the_box_is_dropped():
    stuck = (2, 0, 3, 1)
    captioner = FlakyCaptioner(hang_boxes=[stuck])
    calls = CaptionCalls(captioner, config())
    started = time.monotonic()
    out = calls.captions(_requests(3))
    assert out[2] is None and out[0] and out[1]
    assert sum(c == [stuck] for c in captioner.calls) == 3  # 1 try + 2 retries, each timed out
    assert calls.errors == 3
    assert time.monotonic() - started < 3


def test_a_declined_request_is_not_retried():
    declined = (0, 0, 1, 1)
    captioner = FlakyCaptioner(decline_boxes=[declined])
    out = CaptionCalls(captioner, config()).captions(_requests(2))
    assert out == [None, "caption of (1, 0, 2, 1)"] and sum(c == [declined] for c in captioner.calls) == 1


def test_dropped_boxes_are_counted_and_an_image_with_no_caption_is_skipped():
    row = {"id": "x", "shard": "s", "image": b"", "masks": b"",
           "meta": json.dumps({"kind": "natural", "boxes": [[0, 0, 1, 1], [1, 1, 2, 2]], "scores": [2.0, 1.0]})}
    kept = json.loads(attach_captions(row, ["a sign", None, "a street"], {"name": "flaky"})["meta"])
    assert kept["boxes"] == [[0, 0, 1, 1]] and kept["captions"] == ["a sign"] and kept["dropped_boxes"] == 1
    assert kept["global_caption"] == "a street"
    gone = json.loads(attach_captions(row, [None, None], {"name": "flaky"})["meta"])
    assert gone["failed"] == "no_captions"
