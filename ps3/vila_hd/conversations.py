"""Conversation samples for VILA-HD: validation, chat-template tokenisation, shards, LLaVA import.

Instruction data is dirty (LLaVA mixes hold missing images, empty answers, placeholders
that do not match the images), so every check raises `BadSample` with a short `kind`:
the importer and the loader count it, log the sample and go on; nothing here crashes on
one sample. A problem with the tokenizer itself (no chat template, no image token) is a
spec problem and raises a plain ValueError.

Tokenisation never hard-codes a chat format. The tokenizer's own template renders the
conversation, and the spans to learn are found by rendering prefixes (the history plus
the generation prompt; the history plus the answer): exactly the text the model is given,
and produces, when it answers at inference time.

Shards are the PS3 data format (`ps3.data.shards`, one json member plus numbered images
per sample) with the same offset tables and `index.json`, so `platformctl data` lists and
indexes them, and the loader (`ps3.vila_hd.loader`) reads any sample with one ranged read.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import jinja2
from PIL import Image
from webdataset.tariterators import base_plus_ext

from ps3.data import records
from ps3.data.decode import Decoded, decode
from ps3.data.fs import filesystem
from ps3.data.index import DataSourceError, SourceIndex, read_index
from ps3.data.retry import read_with

# Shared with PS3Loader on purpose: both loaders cut, accept sources and record positions alike.
from ps3.data.shards import iter_webdataset
from ps3.data.writer import ShardWriter

from .llm import IMAGE_TOKEN  # the placeholder of one image in a turn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
QA, GROUNDING = "qa", "grounding"
KINDS = (QA, GROUNDING)
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

#: Why a sample is skipped: the `kind` of a BadSample, the keys of the skip counts.
BAD_KINDS = (
    "bad_json",  # no json member, or it does not parse, or a turn is not {"from": str, "value": str}
    "no_turns",  # an empty conversation
    "bad_role",  # a role other than human/user, gpt/assistant, or system anywhere but first
    "first_not_human",  # the first turn (after an optional system turn) is not the user's
    "no_placeholder",  # images but no <image> in any turn
    "too_many_placeholders",  # more <image> than images
    "too_few_placeholders",  # fewer <image> than images
    "placeholder_in_answer",  # <image> in an assistant turn: it would be learnt as text
    "bad_box",  # a box outside its image, degenerate, malformed, or box count != image count
    "no_box",  # a grounding sample without any box: nothing for the selection loss
    "empty_answer",  # a qa sample without an answer, or with a blank one
    "bad_kind",  # "kind" is neither qa nor grounding
    "kind_mismatch",  # the sample's kind is not its source's (a source holds one kind)
    "too_long",  # more tokens than max_length once images are expanded
    "template_error",  # the chat template refused the conversation (e.g. roles must alternate)
    "token_boundary",  # a rendered prefix does not tokenise to a prefix of the whole
    "missing_image",  # an image file or member is absent
    "bad_image",  # image bytes do not decode
    "read_error",  # the shard is missing, truncated or unreadable here
)


class BadSample(ValueError):
    """A sample to skip and count, never a crash; `kind` is one of BAD_KINDS."""

    def __init__(self, kind: str, detail: str = ""):
        assert kind in BAD_KINDS, kind
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}" if detail else kind)


# ---- validation ----------------------------------------------------------------------
def to_messages(meta: Mapping) -> list[dict[str, str]]:
    """The turns as chat-template messages [{"role", "content"}]; BadSample if malformed."""
    turns = meta.get("conversations")
    if not isinstance(turns, list):
        raise BadSample("bad_json", "no conversations list")
    if not turns:
        raise BadSample("no_turns")
    messages: list[dict[str, str]] = []
    for turn in turns:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise BadSample("bad_json", "a turn is not {'from': str, 'value': str}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None or (role == SYSTEM and messages):
            raise BadSample("bad_role", repr(turn.get("from")))
        messages.append({"role": role, "content": turn["value"]})
    first = messages[1] if messages[0]["role"] == SYSTEM and len(messages) > 1 else messages[0]
    if first["role"] != USER:
        raise BadSample("first_not_human", f"first turn is {first['role']}")
    return messages


def validate_sample(meta: Mapping, image_sizes: Sequence[tuple[int, int]]) -> None:
    """Raise BadSample (see BAD_KINDS) unless `meta` is a usable sample for these images.

    `image_sizes` are the (width, height) of the stored images, in placeholder order;
    boxes are checked against them with the PS3 data's 1-pixel slack.
    """
    messages = to_messages(meta)
    kind = meta.get("kind", QA)
    if kind not in KINDS:
        raise BadSample("bad_kind", repr(kind))
    _check_placeholders(messages, len(image_sizes))
    boxes = sample_boxes(meta, image_sizes)
    if kind == GROUNDING and all(b is None for b in boxes):
        raise BadSample("no_box")
    answers = [m["content"] for m in messages if m["role"] == ASSISTANT]
    if kind == QA and (not answers or any(not a.strip() for a in answers)):
        raise BadSample("empty_answer")


def _check_placeholders(messages: list[dict[str, str]], n_images: int) -> None:
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == ASSISTANT):
        raise BadSample("placeholder_in_answer")
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_images and not count:
        raise BadSample("no_placeholder", f"{n_images} images")
    if count != n_images:
        kind = "too_many_placeholders" if count > n_images else "too_few_placeholders"
        raise BadSample(kind, f"{count} placeholders for {n_images} images")


def sample_boxes(meta: Mapping, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[float, ...] | None]:
    """One box (pixels of the stored image) or None per image; BadSample("bad_box") if invalid."""
    boxes = meta.get("boxes")
    if boxes is None:
        return [None] * len(image_sizes)
    if not isinstance(boxes, list) or len(boxes) != len(image_sizes):
        raise BadSample("bad_box", f"boxes {boxes!r} for {len(image_sizes)} images")
    return [None if box is None else _checked_box(box, w, h) for box, (w, h) in zip(boxes, image_sizes)]


def _checked_box(box, width: int, height: int) -> tuple[float, ...]:
    """(x0, y0, x1, y1) inside the image (with the PS3 data's slack) and not degenerate."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise BadSample("bad_box", f"{box!r} is not four numbers") from None
    slack = records.BOX_SLACK_PX
    if not (-slack <= x0 < x1 <= width + slack and -slack <= y0 < y1 <= height + slack):  # NaN fails too
        raise BadSample("bad_box", f"{list(box)} outside {width}x{height} or degenerate")
    return x0, y0, x1, y1


# ---- tokenisation --------------------------------------------------------------------
@dataclass
class Encoded:
    """One tokenised conversation, one `image_token_id` per image."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except the assistant answers and their turn-end token
    prompt_end: int  # index of the last token of the first user turn (the top-down prompt)
    n_images: int


def encode_conversation(meta: Mapping, tokenizer, *, max_length: int, image_tokens: int) -> Encoded:
    """Tokenise a sample with the tokenizer's chat template (see the module docstring).

    `image_tokens` is the caller's upper bound on LLM tokens per image: the sample is
    `too_long` if its text plus that many tokens per image exceed `max_length`. Grounding
    samples learn no text (all labels IGNORE_INDEX); they only drive the selection loss.
    """
    chat = _Chat(tokenizer)
    messages = to_messages(meta)
    ids = chat.ids(messages)
    n_images = ids.count(chat.image_id)
    if len(ids) - n_images + n_images * image_tokens > max_length:
        raise BadSample("too_long", f"{len(ids)} tokens + {n_images} images x {image_tokens} > {max_length}")
    labels = [IGNORE_INDEX] * len(ids)
    if meta.get("kind", QA) != GROUNDING:
        for i, message in enumerate(messages):
            if message["role"] == ASSISTANT:
                start, end = chat.answer_span(messages, i, ids)
                labels[start:end] = ids[start:end]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == USER)
    prompt_end = len(chat.ids(messages[:first_user + 1])) - 1
    return Encoded(ids, labels, prompt_end, n_images)


def encode_prompt(meta: Mapping, tokenizer) -> Encoded:
    """A conversation that ends with a user turn, tokenised up to the assistant's generation
    prompt: what the model answers at inference (nothing is labelled)."""
    chat = _Chat(tokenizer)
    messages = to_messages(meta)
    if messages[-1]["role"] != USER:
        raise BadSample("bad_role", "a prompt must end with a user turn")
    ids = chat.tokenize(chat.render(messages, generation_prompt=True))
    first_user = next(i for i, m in enumerate(messages) if m["role"] == USER)
    prompt_end = len(chat.ids(messages[:first_user + 1])) - 1
    return Encoded(ids, [IGNORE_INDEX] * len(ids), prompt_end, ids.count(chat.image_id))


def check_tokenizer(tokenizer) -> None:
    """A tokenizer without chat template, image token or pad token raises ValueError (a spec
    problem: it fails when the loader is built, not in a worker)."""
    _Chat(tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (Qwen2: <|endoftext|>)")


class _Chat:
    """A tokenizer's chat template, rendered and tokenised the way training needs it."""

    def __init__(self, tokenizer):
        if not tokenizer.chat_template:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; VILA-HD needs an "
                             "instruct tokenizer (or set tokenizer.chat_template)")
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; add it as a special token")
        self.tokenizer, self.image_id = tokenizer, int(image_id)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as exc:  # templates reject conversations with raise_exception
            raise BadSample("template_error", str(exc)) from None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`; each IMAGE_TOKEN is exactly one image id, whatever the vocabulary."""
        ids: list[int] = []
        for j, piece in enumerate(text.split(IMAGE_TOKEN)):
            if j:
                ids.append(self.image_id)
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def answer_span(self, messages: list[dict[str, str]], i: int, ids: list[int]) -> tuple[int, int]:
        """[start, end) in `ids` of message i's content plus the first token that closes it.

        The closing text (ChatML: "<|im_end|>\\n") is what the template renders after an
        empty answer; only its first token is learnt: it is the stop the model must emit.
        """
        header = self.render(messages[:i], generation_prompt=True)
        turn = self.render(messages[:i + 1])
        empty = self.render([*messages[:i], {"role": ASSISTANT, "content": ""}])
        closing = empty[len(header):]
        if not (turn.startswith(header) and empty.startswith(header) and turn.endswith(closing)):
            raise ValueError("the chat template does not render a conversation as history + generation prompt "
                             "+ answer; its assistant spans cannot be found")
        start = self._prefix_length(header, ids)
        end = self._prefix_length(turn[:len(turn) - len(closing)], ids)
        return start, min(end + (1 if closing else 0), len(ids))

    def _prefix_length(self, text: str, ids: list[int]) -> int:
        prefix = self.tokenize(text)
        if ids[:len(prefix)] != prefix:  # a merge across the boundary: labels would be off
            raise BadSample("token_boundary", f"prefix of {len(prefix)} tokens")
        return len(prefix)


# ---- shards --------------------------------------------------------------------------
def sample_members(meta: Mapping, images: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
    """Webdataset members of one sample: `json` and `0.<ext>`, `1.<ext>`, ... in placeholder order."""
    members = {"json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()}
    for i, (ext, data) in enumerate(images):
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {ext!r} not one of {IMAGE_EXTS}")
        members[f"{i}.{ext}"] = data
    return members


def write_conversation_shards(uri: str, samples: Iterable[tuple[str, Mapping, Sequence[tuple[str, bytes]]]], *,
                              samples_per_shard: int, source: str) -> dict:
    """Write (key, meta, [(ext, image bytes)]) samples as shards under `uri`; returns index.json.

    Keys must be unique and hold no '.' or '/'. `meta` gets "source" and "id" (the key)
    where it has none. The webdataset writer orders members by name, so `json` comes
    after the images: `read_conversation` relies on that.
    """
    writer = ShardWriter(uri, source, samples_per_shard)
    for key, meta, images in samples:
        writer.write_members(key, sample_members({"source": source, "id": key, **meta}, images))
    return writer.close()


def split_members(members: Mapping[str, bytes]) -> tuple[dict, list[bytes]]:
    """(meta, images in placeholder order) of one sample's members (extension -> bytes)."""
    raw = members.get("json")
    if raw is None:
        raise BadSample("bad_json", "no json member")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise BadSample("bad_json", str(exc)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", "not an object")
    numbered = {}
    for ext, data in members.items():
        number, _, suffix = ext.partition(".")
        if number.isdigit() and suffix in IMAGE_EXTS:
            numbered[int(number)] = data
    if sorted(numbered) != list(range(len(numbered))):
        raise BadSample("missing_image", f"image members {sorted(numbered)}")
    return meta, [numbered[i] for i in range(len(numbered))]


def iter_conversations(uri: str) -> Iterator[tuple[str, dict, list[bytes]]]:
    """(key, meta, [image bytes]) of every sample of a source, through webdataset's reader.

    Samples whose members are unusable (json, image numbering) are logged and left out.
    """
    names = [s["name"] for s in read_index(uri)["shards"] if s["samples"]]
    for sample in iter_webdataset(uri, names):
        key = sample["__key__"]
        try:
            meta, images = split_members({k: v for k, v in sample.items() if not k.startswith("__")})
        except BadSample as exc:
            log.warning("skipping sample %s in %s: %s", key, uri, exc)
            continue
        yield key, meta, images


def read_conversation(index: SourceIndex, i: int) -> tuple[str, dict, list[bytes]]:
    """(key, meta, [image bytes]) of sample number `i`, with one ranged read.

    The offset tables know only each sample's json (its images are numbered, not one
    known extension), so the read spans from the previous sample's json to this one's:
    json is a sample's last member (see write_conversation_shards).
    """
    try:
        shard_path, entry = index.locate(i)
        start = _sample_start(index, i, shard_path)
    except (OSError, IndexError) as exc:
        raise BadSample("read_error", f"sample {i}: {type(exc).__name__}: {exc}") from None
    if entry.json is None:
        raise BadSample("bad_json", f"{entry.key}: no json member")
    end = _block_end(entry.json)
    try:  # storage errors retried by the index's reads (an outage is not a bad sample)
        blob = read_with(index.reads, index.fs, shard_path, lambda: index.fs.cat_file(shard_path, start=start, end=end))
    except (OSError, ValueError) as exc:
        raise BadSample("read_error", f"{shard_path}: {type(exc).__name__}") from None
    if len(blob) != end - start:
        raise BadSample("read_error", f"{shard_path}: short read")
    return (entry.key, *split_members(_tar_members(blob, entry.key)))


def _block_end(member: tuple[int, int]) -> int:
    """End of a member's data padded to the tar block: where the next header starts."""
    offset, size = member
    return offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _sample_start(index: SourceIndex, i: int, shard_path: str) -> int:
    for j in range(i - 1, -1, -1):  # steps back over damaged neighbours without a json
        path, previous = index.locate(j)
        if path != shard_path:
            break
        if previous.json is not None:
            return _block_end(previous.json)
    return 0


def _tar_members(blob: bytes, key: str) -> dict[str, bytes]:
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar:
                name, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                if name == key:
                    members[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadSample("read_error", f"{key}: {type(exc).__name__}: {exc}") from None
    return members


# ---- LLaVA import --------------------------------------------------------------------
def import_llava(json_uri: str, image_root: str, output_uri: str, *, samples_per_shard: int = 1000,
                 source: str = "llava") -> dict:
    """Convert a LLaVA-format JSON list plus its images into conversation shards.

    Items are {"id", "image": path | [paths] | absent, "conversations", "box"?, "boxes"?,
    "kind"?}; paths are relative to `image_root`, "box" is the box of a single image,
    "boxes" one box (or null) per image. Bad items are counted by kind and logged with
    their id. Returns {"written": n, "skipped": {kind: count}}.
    """
    fs, path = filesystem(json_uri)
    items = json.loads(fs.cat_file(path))
    if not isinstance(items, list):
        raise DataSourceError(f"{json_uri} is not a LLaVA list of samples")
    images = _ImageRoot(image_root)
    skipped: Counter = Counter()

    def samples() -> Iterator[tuple[str, dict, list[tuple[str, bytes]]]]:
        for n, item in enumerate(items):
            try:
                meta, files = _llava_sample(item, images, source)
            except BadSample as exc:
                skipped[exc.kind] += 1
                item_id = item.get("id", f"#{n}") if isinstance(item, Mapping) else f"#{n}"
                log.warning("skipping %s item %s: %s", json_uri, item_id, exc)
                continue
            yield f"{n:09d}", meta, files  # item ids may hold '.' or '/'; the json keeps them

    index = write_conversation_shards(output_uri, samples(), samples_per_shard=samples_per_shard, source=source)
    return {"written": index["samples"], "skipped": dict(skipped)}


def _llava_sample(item, images: _ImageRoot, source: str) -> tuple[dict, list[tuple[str, bytes]]]:
    if not isinstance(item, Mapping):
        raise BadSample("bad_json", "item is not an object")
    paths = item.get("image")
    paths = [] if paths is None else [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BadSample("bad_json", f"image {paths!r}")
    boxes = item.get("boxes", [item["box"]] if "box" in item else None)
    meta = {"conversations": item.get("conversations"), "boxes": boxes, "kind": item.get("kind", QA), "source": source}
    if "id" in item:
        meta["id"] = str(item["id"])  # else the shard key
    loaded = [images.load(p) for p in paths]
    validate_sample(meta, [size for _, _, size in loaded])
    if boxes is None:
        meta["boxes"] = [None] * len(paths)
    return meta, [(ext, data) for ext, data, _ in loaded]


class _ImageRoot:
    """Images under a directory URI, checked to decode and stored in a shard format."""

    def __init__(self, uri: str):
        self.fs, self.path = filesystem(uri)

    def load(self, relative: str) -> tuple[str, bytes, tuple[int, int]]:
        """(extension, bytes, (width, height)); formats other than jpg/png/webp become PNG."""
        try:
            data = self.fs.cat_file(f"{self.path}/{relative.lstrip('/')}")
        except (FileNotFoundError, IsADirectoryError):
            raise BadSample("missing_image", relative) from None
        except OSError as exc:
            raise BadSample("read_error", f"{relative}: {type(exc).__name__}") from None
        dec = decode_image(data, relative, need=1)  # every byte entropy-decoded; JPEG at 1/8 scale
        ext = _FORMAT_EXT.get(Image.open(io.BytesIO(data)).format)
        if ext is None:
            buffer = io.BytesIO()
            decode_image(data, relative).image.save(buffer, "PNG")
            data, ext = buffer.getvalue(), "png"
        return ext, data, (dec.width, dec.height)


def decode_image(data: bytes, name: str, need: int = 0) -> Decoded:
    try:
        return decode(data, name, need)
    except records.BadSample as exc:
        raise BadSample("bad_image", f"{name}: {exc.detail}") from None
