"""The curation driver: plan inputs into shards, stream them through the stages, commit shards.

Reads top to bottom: list every source's inputs and plan them into shards; drop the shards
a previous run committed; stream the rest through Ray (`ray_adapter.stream`); as soon as
every input of a shard is back, write and commit it (`writer.write_shard`); finally write
each source's index and the run's summary (the columns of the paper's table 9).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ps3.data.fs import filesystem, join

from .config import CurationConfig
from .inputs import InputError, InputItem, SourceSpec, list_inputs, plan_shards
from .writer import committed_shards, finish_source, write_shard

log = logging.getLogger(__name__)

SUMMARY_NAME = "_curation/summary.json"


@dataclass
class Progress:
    """What a running curation reports: counts so far, and a callback for status/metrics."""

    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    done_at_start: int = 0
    failures: Counter = field(default_factory=Counter)
    #: Called with (progress, source, outcomes of the shard just committed) or (progress, None, None).
    report: Callable[[Progress, str | None, dict | None], None] = lambda progress, source, outcomes: None

    @property
    def images_per_s(self) -> float:
        return (self.done - self.done_at_start) / max(1e-6, time.monotonic() - self.started)


def source_uri(config: CurationConfig, source: str) -> str:
    return join(config.output, source)


@dataclass
class Plan:
    """Every source's inputs planned into shards, and the inputs that could not even be listed."""

    shards: dict[str, dict[str, list[InputItem]]]  # source -> shard name -> inputs
    listing_failures: list[tuple[str, str, str]]  # (input name, kind, detail)


def plan_inputs(config: CurationConfig) -> Plan:
    """List and plan every source; raises InputError (one line) when a source cannot be listed."""
    failures: list[tuple[str, str, str]] = []
    shards = {}
    for source in config.sources:
        spec = SourceSpec(source.name, source.kind, source.uri, source.index, source.format)
        shards[source.name] = plan_shards(list_inputs(spec, failures), config.samples_per_shard)
    return Plan(shards, failures)


def curate(config: CurationConfig, plan: Plan | None = None, progress: Progress | None = None,
           stream: Callable[[list[dict], str, CurationConfig], Iterable[dict]] | None = None) -> dict:
    """Curate every source of `config`; returns the summary (also written to the output)."""
    if stream is None:
        from .ray_adapter import stream
    plan = plan or plan_inputs(config)
    progress = progress or Progress()
    plans, outcomes = plan.shards, defaultdict(dict)
    for source in config.sources:
        for name, marker in committed_shards(source_uri(config, source.name)).items():
            if name in plans[source.name]:
                outcomes[source.name].update(marker["inputs"])
    for name, kind, detail in plan.listing_failures:
        progress.failures[kind] += 1
        log.warning("skipped %s: %s: %s", name, kind, detail)
    progress.total = sum(len(items) for shards in plans.values() for items in shards.values())
    progress.done = progress.done_at_start = sum(len(o) for o in outcomes.values())
    if progress.done_at_start:
        log.info("resuming: %d of %d inputs are in committed shards", progress.done, progress.total)
    progress.report(progress, None, None)  # the plan, and the inputs lost at listing, before any work
    for kind in ("natural", "document"):
        pending = _pending_rows(config, plans, outcomes, kind)
        _write_as_completed(config, plans, outcomes, stream(pending, kind, config), progress)
    for source in config.sources:
        finish_source(source_uri(config, source.name), source.name, set(plans[source.name]))
    summary = summarise(config, outcomes, plan.listing_failures)
    fs, path = filesystem(join(config.output, SUMMARY_NAME))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def _pending_rows(config, plans, outcomes, kind: str) -> list[dict]:
    rows = []
    for source in config.sources:
        if source.kind != kind:
            continue
        for name, items in plans[source.name].items():
            if not any(i.id in outcomes[source.name] for i in items):
                rows += [{**i.to_row(), "image": b"", "masks": b""} for i in items]
    return rows


def _write_as_completed(config, plans, outcomes, rows: Iterable[dict], progress: Progress) -> None:
    """Hold finished rows per shard; a shard is written the moment every one of its inputs is back."""
    arrived: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    last_report = 0.0
    for row in rows:
        meta = json.loads(row["meta"])
        key = (meta["source"], row["shard"])
        if row["id"] in arrived[key]:
            continue  # a row delivered twice (a retried block) is one input
        arrived[key][row["id"]] = {**row, "meta": meta}
        progress.done += 1
        _log_losses(meta, progress)
        if arrived[key].keys() == {i.id for i in plans[key[0]][key[1]]}:
            committed = _commit(config, key, list(arrived.pop(key).values()))
            outcomes[key[0]].update(committed)
            progress.report(progress, key[0], committed)
            last_report = time.monotonic()
        elif time.monotonic() - last_report > 2:
            progress.report(progress, None, None)
            last_report = time.monotonic()
    if arrived:  # the stream ended early: those shards stay uncommitted and the next run redoes them
        raise RuntimeError(f"{len(arrived)} shards did not receive all their inputs; rerun to finish them")


def _log_losses(meta: dict, progress: Progress) -> None:
    """Count and name what an input lost: the whole input (a skip), or boxes without a caption."""
    name = InputItem.from_meta(meta).name
    if meta.get("failed"):
        progress.failures[meta["failed"]] += 1
        log.warning("skipped %s: %s: %s", name, meta["failed"], meta.get("error"))
    elif meta.get("dropped_boxes"):
        progress.failures["caption_dropped"] += meta["dropped_boxes"]
        log.warning("dropped %d of %d boxes of %s: no caption after retries (error, timeout or nothing to read)",
                    meta["dropped_boxes"], meta["dropped_boxes"] + len(meta["boxes"]), name)


def _commit(config: CurationConfig, key: tuple[str, str], rows: list[dict]) -> dict[str, dict]:
    source, shard = key
    samples, outcomes = [], {}
    for row in sorted(rows, key=lambda r: r["id"]):
        meta = row["meta"]
        name = InputItem.from_meta(meta).name
        if meta.get("failed"):
            outcomes[row["id"]] = {"input": name, "status": "skipped", "reason": meta["failed"]}
            continue
        samples.append({"key": row["id"], "image": row["image"], "ext": meta["ext"], "json": sample_json(meta)})
        boxes = meta["boxes"]
        outcomes[row["id"]] = {
            "input": name, "status": "written", "boxes": len(boxes),
            "box_w": [round(b[2] - b[0], 1) for b in boxes], "box_h": [round(b[3] - b[1], 1) for b in boxes],
            "captions": len(meta["captions"]) + (1 if meta.get("global_caption") else 0),
            "dropped_boxes": meta.get("dropped_boxes", 0),
        }
    write_shard(source_uri(config, source), shard, samples, outcomes)
    return outcomes


def sample_json(meta: dict) -> bytes:
    """The shard's json member: the PS3 record (DESIGN.md) plus where it came from and how."""
    obj = {"width": meta["width"], "height": meta["height"], "boxes": meta["boxes"], "captions": meta["captions"],
           "source": meta["source"], "kind": meta["kind"], "input": InputItem.from_meta(meta).name,
           "provenance": {"masks": meta.get("masks_by"), "captions": meta.get("captioner")}}
    if meta.get("scores") is not None:
        obj["box_scores"] = meta["scores"]
    if meta.get("global_caption"):
        obj["global_caption"] = meta["global_caption"]
    return json.dumps(obj, separators=(",", ":")).encode()


def summarise(config: CurationConfig, outcomes: dict, listing_failures: list) -> dict:
    """Per source: the paper's table 9 columns (images, boxes per image, mean box size, captions)."""
    summary = {"sources": {}, "failures": dict(Counter(kind for _, kind, _ in listing_failures))}
    for source in config.sources:
        done = outcomes[source.name].values()
        written = [o for o in done if o["status"] == "written"]
        widths = [w for o in written for w in o["box_w"]]
        heights = [h for o in written for h in o["box_h"]]
        reasons = Counter(o["reason"] for o in done if o["status"] == "skipped")
        dropped = sum(o.get("dropped_boxes", 0) for o in written)
        if dropped:
            summary["failures"]["caption_dropped"] = summary["failures"].get("caption_dropped", 0) + dropped
        for reason, n in reasons.items():
            summary["failures"][reason] = summary["failures"].get(reason, 0) + n
        images = len(written)
        summary["sources"][source.name] = {
            "kind": source.kind, "inputs": len(done), "images": images, "boxes": len(widths),
            "boxes_per_image": round(len(widths) / images, 2) if images else 0.0,
            # fsum: exact whatever the order, so a resumed run's summary equals a clean run's
            "mean_box_w": round(math.fsum(widths) / len(widths), 1) if widths else 0.0,
            "mean_box_h": round(math.fsum(heights) / len(heights), 1) if heights else 0.0,
            "captions_per_image": round(sum(o["captions"] for o in written) / images, 2) if images else 0.0,
            "skipped": dict(reasons), "captions_dropped": dropped, "uri": source_uri(config, source.name),
        }
    return summary


__all__ = ["InputError", "Plan", "Progress", "curate", "plan_inputs", "summarise"]
