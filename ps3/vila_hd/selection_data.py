"""Grounding data for VILA-HD's token selection, made from PS3 pre-training (paper figure 8, left).

The selection stage of VILA-HD learns which high-res patches a question needs, and its
ground truth is a box per question. PS3's pre-training data already pairs boxes with local
captions, so each (box, caption) becomes one grounding sample: the same image, a question
whose answer lies in that box, and the box itself. Questions come from a few templates
(no weights needed), or from a local LLM asked for a question about the captioned region.

A box the encoder cannot see as at least `min_box_patches` patches at its top scale gives
the selection loss nothing to learn from, so it is dropped and counted. Images are
squash-resized to S x S (`ps3.model.vision.resize_square`, the VILA-HD loader), so a
w x h box of a W x H image covers (w / W) * (h / H) * (S / patch)^2 patches.

Output is a pure function of (settings, input): templates are drawn per (seed, key, box).
Inputs are planned into shards in index order and shards are committed whole
(`ps3.curation.writer`); a shard's name hashes its inputs and the settings, so a killed run
rewrites only uncommitted shards, and a run with other settings never resumes into shards
drawn differently (those are left out of the index with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from itertools import islice

from ps3.curation.writer import committed_shards, finish_source, write_shard
from ps3.data import records
from ps3.data.index import DataSourceError, read_index
from ps3.data.shards import iter_webdataset
from ps3.model import PS3Preset

from .conversations import GROUNDING, IMAGE_EXTS
from .llm import IMAGE_TOKEN
from .params import DEFAULT_PROMPT

log = logging.getLogger(__name__)

#: Questions without an LLM; `{caption}` is the region's local caption, also the answer.
QUESTION_TEMPLATES = (
    "Look closely at this: {caption}",
    "Find the region showing {caption}.",
    "Where in the image can you see {caption}?",
    "Zoom in on the part with {caption}.",
    "Which area of the image shows {caption}?",
)
#: Why an input image or one of its boxes gives no sample: the keys of the "dropped" counts.
#: bad_record and image_missing count images, the others count boxes.
DROP_KINDS = ("bad_record", "image_missing", "no_caption", "bad_box", "too_small")
MAX_NEW_TOKENS = 48
LLM_BATCH = 16


class InputUnreadable(DataSourceError):
    """Input number `position` has no readable index (raised before any output)."""

    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


class LLMUnavailable(RuntimeError):
    """The `llm` directory cannot be loaded (a spec problem, raised before any output)."""


# ---- boxes and questions -------------------------------------------------------------
def box_patches(box: Sequence[float], width: int, height: int, preset: PS3Preset) -> float:
    """Patches a box covers at the preset's top scale, the image squash-resized to S x S."""
    x0, y0, x1, y1 = box
    cells = preset.scales[-1] / preset.patch_size
    return (x1 - x0) / width * (y1 - y0) / height * cells * cells


def template_question(caption: str, seed: int, key: str, box_index: int) -> str:
    """A template question; the choice depends on (seed, key, box index) only, not on order."""
    digest = hashlib.sha1(f"{seed}\0{key}\0{box_index}".encode()).digest()
    return QUESTION_TEMPLATES[int.from_bytes(digest[:4], "big") % len(QUESTION_TEMPLATES)].format(caption=caption)


class LLMQuestions:
    """Questions from a local causal LM: greedy, batched, the first line of each answer.

    Instruct checkpoints are prompted through their chat template; base models get the
    prompt as plain text. Left padding keeps every prompt's end at the generation point.
    """

    def __init__(self, uri: str, prompt: str, *, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = LLM_BATCH):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ps3.curation.models.weights import local_weights

        try:
            path = local_weights(uri)  # remote directories are copied to the node's cache
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        except Exception as exc:  # noqa: BLE001 (weights, tokenizers and transformers each raise their own)
            raise LLMUnavailable(f"cannot load a causal LM from {uri}: {str(exc).splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompt, self.max_new_tokens, self.batch_size = prompt, max_new_tokens, batch_size

    def __call__(self, captions: list[str]) -> list[str]:
        """One question per caption; "" where the LM gave none (the caller falls back)."""
        out = []
        for start in range(0, len(captions), self.batch_size):
            texts = [self._render(c) for c in captions[start:start + self.batch_size]]
            out += [_first_line(t) for t in self._generate(texts)]
        return out

    def _render(self, caption: str) -> str:
        text = self.prompt.replace("{caption}", caption)
        if not self.tokenizer.chat_template:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def _generate(self, texts: list[str]) -> list[str]:
        import torch

        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = self.model.generate(**batch, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in _clean(text).strip().splitlines()]
    return lines[0] if lines else ""


def _clean(text: str) -> str:
    """Text without the image placeholder: one stray <image> would make a sample invalid."""
    return text.replace(IMAGE_TOKEN, "image").strip()


# ---- one input image -----------------------------------------------------------------
def _read_record(key: str, raw: bytes | None) -> records.Record:
    """The record, keeping boxes that `parse_record` would reject the whole image for.

    Pre-training drops an image with one empty caption or one stray box; here every pair
    stands alone, so such records are read as they are and their pairs judged one by one.
    """
    try:
        return records.parse_record(key, raw)
    except records.BadSample as exc:
        if exc.reason not in ("empty_caption", "bad_box"):
            raise
    obj = json.loads(raw)  # parse_record got past its type checks, so this reads
    return records.Record(key, int(obj["width"]), int(obj["height"]),
                          [tuple(float(v) for v in b) for b in obj["boxes"]], [str(c) for c in obj["captions"]],
                          obj.get("global_caption"), str(obj.get("source", "")))


def _pairs(key: str, sample: dict, preset: PS3Preset, min_box_patches: float, dropped: Counter):
    """(ext, image bytes, [(box index, clipped box, caption)]) of one input; drops counted."""
    try:
        record = _read_record(key, sample.get("json"))
    except ValueError:  # records.BadSample is a ValueError
        dropped["bad_record"] += 1
        return None
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        dropped["image_missing"] += 1
        return None
    kept = []
    for i, (box, caption) in enumerate(zip(record.boxes, record.captions)):
        caption = _clean(caption)
        x0, y0, x1, y1 = records.clip_box(box, record.width, record.height)  # out of bounds: clipped
        if not caption:
            dropped["no_caption"] += 1
        elif not all(math.isfinite(v) for v in box) or not (x0 < x1 and y0 < y1):
            dropped["bad_box"] += 1
        elif box_patches((x0, y0, x1, y1), record.width, record.height, preset) < min_box_patches:
            dropped["too_small"] += 1
        else:
            kept.append((i, [x0, y0, x1, y1], caption))
    return ext, sample[ext], kept


def _sanitize(key: str) -> str:
    return key.replace(".", "_").replace("/", "_")


# ---- the stage's work ----------------------------------------------------------------
def make_selection_data(inputs: Sequence[str], output: str, preset: PS3Preset, *, samples_per_shard: int = 1000,
                        source: str = "selection_data", seed: int = 0, llm: str | None = None,
                        prompt: str = DEFAULT_PROMPT, min_box_patches: float = 1.0,
                        max_samples: int | None = None) -> dict:
    """Write grounding shards under `output` from PS3 pre-training sources `inputs`.

    An input without a readable index raises InputUnreadable, and an unloadable
    `llm` raises LLMUnavailable, both before anything is written. With several inputs,
    keys are prefixed with the input's position (two sources may share keys). Returns
    {"written", "dropped": {kind: count}, "llm_fallback", "images", "shards",
    "resumed_shards"}; counts cover resumed shards too, so a rerun reports what the
    output holds.
    """
    indexes = []
    for position, uri in enumerate(inputs):
        try:
            indexes.append(read_index(uri))
        except DataSourceError as exc:
            raise InputUnreadable(position, str(exc)) from None
    questions = LLMQuestions(llm, prompt) if llm else None
    settings = {"inputs": list(inputs), "preset": [list(preset.scales), preset.patch_size], "seed": seed,
                "source": source, "llm": llm, "prompt": prompt if llm else None, "min_box_patches": min_box_patches}
    done = committed_shards(output)
    samples = islice(_input_samples(inputs, indexes), max_samples)
    totals = {"written": 0, "dropped": Counter(), "llm_fallback": 0, "images": 0}
    planned, resumed, number = set(), 0, 0
    while chunk := list(islice(samples, samples_per_shard)):  # the shard plan: inputs in index order
        ids = [key for key, _ in chunk]
        digest = hashlib.sha1(json.dumps([settings, ids]).encode()).hexdigest()[:12]
        name = f"shard-{number:06d}-{digest}.tar"
        planned.add(name)
        marker = done.get(name)
        if marker is None:
            marker = _write(output, name, chunk, preset, seed, source, questions, min_box_patches)
        else:
            resumed += 1
        number += 1
        for outcome in marker["inputs"].values():
            totals["written"] += outcome["written"]
            totals["dropped"].update(outcome["dropped"])
            totals["llm_fallback"] += outcome["llm_fallback"]
            totals["images"] += 1
    finish_source(output, source, planned)
    return {**totals, "dropped": dict(totals["dropped"]), "shards": len(planned), "resumed_shards": resumed}


def _input_samples(inputs: Sequence[str], indexes: list[dict]) -> Iterator[tuple[str, dict]]:
    """(input id, webdataset sample) of every input sample, in index order."""
    for n, (uri, index) in enumerate(zip(inputs, indexes)):
        names = [s["name"] for s in index["shards"] if s["samples"]]
        for sample in iter_webdataset(uri, names):
            key = sample["__key__"]
            yield (f"{n}-{key}" if len(inputs) > 1 else key), sample


def _write(output: str, name: str, chunk: list[tuple[str, dict]], preset: PS3Preset, seed: int, source: str,
           questions: Callable[[list[str]], list[str]] | None, min_box_patches: float) -> dict:
    """Make and commit one shard; returns its marker (per input: written, dropped, llm_fallback)."""
    outcomes, pending = {}, []  # pending: (input id, ext, image, box index, box, caption)
    for key, sample in chunk:
        dropped: Counter = Counter()
        ext, image, kept = _pairs(key, sample, preset, min_box_patches, dropped) or (None, None, [])
        pending += [(key, ext, image, i, box, caption) for i, box, caption in kept]
        outcomes[key] = {"input": key, "status": "written" if kept else "skipped", "written": len(kept),
                         "dropped": dict(dropped), "llm_fallback": 0}
    asked = questions([p[5] for p in pending]) if questions and pending else [""] * len(pending)
    out = []
    for (key, ext, image, i, box, caption), question in zip(pending, asked):
        if questions and not question:
            outcomes[key]["llm_fallback"] += 1
        question = question or template_question(caption, seed, key, i)
        sample_key = _sanitize(f"{key}-{i}")
        meta = {"conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                                  {"from": "gpt", "value": caption}],
                "boxes": [box], "kind": GROUNDING, "source": source, "id": sample_key}
        out.append({"key": sample_key, "image": image, "ext": f"0.{ext}",
                    "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()})
    for key, outcome in outcomes.items():
        if outcome["status"] == "skipped":
            outcome["reason"] = next(iter(outcome["dropped"]), "no_boxes")
    write_shard(output, name, out, outcomes)
    log.info("committed %s/%s: %d grounding samples from %d images", output, name, len(out), len(chunk))
    return {"samples": len(out), "inputs": outcomes}
