"""Conversation samples: validation, template tokenisation, shards, LLaVA import, the loader."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ps3.data.index import SourceIndex, read_index
from ps3.vila_hd.conversations import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    BadSample,
    encode_conversation,
    import_llava,
    iter_conversations,
    read_conversation,
    validate_sample,
    write_conversation_shards,
)
from ps3.vila_hd.loader import build_conversation_loader

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
WORDS = ["[UNK]", "\n", "system", "user", "assistant", "[assistant]", "[user]", "you", "are", "helpful",
         "what", "is", "here", "where", "the", "sign", "a", "red", "cat", "yes", "no"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: Another format (no ChatML tokens at all): the spans must follow whatever the template renders.
BRACKETS = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a handful of words: spaces dropped, newlines kept as tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                   pre_tokenizers.Split(Regex("\n"), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIALS[1:],
                                   chat_template=template)


TOK = tokenizer()


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


def qa(question: str = "<image>\nwhat is here", *answers: str, **extra) -> dict:
    conv = [("human", question)]
    for answer in answers or ("a red sign",):
        conv += [("gpt", answer), ("human", "where")]
    return {"conversations": turns(*conv[:-1]), "kind": "qa", **extra}


def image_bytes(width: int = 40, height: int = 30, fmt: str = "JPEG", seed: int = 0) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + seed * 40) % 256, (y * 9) % 256, (x * y + seed) % 256)
                   for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# ---- validation ----------------------------------------------------------------------
SIZES = [(40, 30)]
BAD = [
    ("no_turns", {"conversations": []}, SIZES),
    ("first_not_human", {"conversations": turns(("gpt", "<image> hi"), ("human", "x"))}, SIZES),
    ("first_not_human", {"conversations": turns(("system", "you"), ("gpt", "<image> x"))}, SIZES),
    ("bad_role", {"conversations": turns(("human", "<image>"), ("robot", "x"))}, SIZES),
    ("bad_role", {"conversations": turns(("human", "<image>"), ("system", "x"))}, SIZES),
    ("bad_json", {"conversations": [{"from": "human"}]}, SIZES),
    ("no_placeholder", qa("what is here"), SIZES),
    ("too_many_placeholders", qa("<image> <image> what"), SIZES),
    ("too_many_placeholders", qa("<image> what"), []),
    ("too_few_placeholders", qa("<image> what"), [(40, 30), (8, 8)]),
    ("placeholder_in_answer", qa("<image> what", "<image> yes"), SIZES),
    ("bad_box", qa(boxes=[[0, 0, 50, 10]]), SIZES),  # outside the 40 px width
    ("bad_box", qa(boxes=[[10, 5, 10, 20]]), SIZES),  # degenerate
    ("bad_box", qa(boxes=[[1, 2, 3]]), SIZES),
    ("bad_box", qa(boxes=[None, [0, 0, 1, 1]]), SIZES),  # two boxes, one image
    ("empty_answer", qa("<image> what", "  "), SIZES),
    ("empty_answer", {"conversations": turns(("human", "<image> what")), "kind": "qa"}, SIZES),
    ("no_box", {"conversations": turns(("human", "<image> where")), "kind": "grounding"}, SIZES),
    ("bad_kind", qa(kind="caption"), SIZES),
]


@pytest.mark.parametrize(("kind", "meta", "sizes"), BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_validate_rejects(kind, meta, sizes):
    with pytest.raises(BadSample) as caught:
        validate_sample(meta, sizes)
    assert caught.value.kind == kind


@pytest.mark.parametrize("meta", [
    qa(),
    qa(boxes=[[0.5, -0.5, 40.5, 30]]),  # within the 1 px slack
    {"conversations": turns(("system", "you are helpful"), ("user", "<image> what"), ("assistant", "yes"))},
    {"conversations": turns(("human", "<image> where the sign")), "kind": "grounding", "boxes": [[1, 2, 20, 25]]},
])
def test_validate_accepts(meta):
    validate_sample(meta, SIZES)


# ---- tokenisation --------------------------------------------------------------------
def tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


def test_encode_labels_answers_and_turn_ends():
    meta = qa("<image>\nwhat is here", "a red sign", "yes")
    enc = encode_conversation(meta, TOK, max_length=100, image_tokens=4)
    assert enc.n_images == 1 and enc.input_ids.count(TOK.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    learnt = [t for t, label in zip(tokens(TOK, enc.input_ids), enc.labels) if label != IGNORE_INDEX]
    assert learnt == ["a", "red", "sign", "<|im_end|>", "yes", "<|im_end|>"]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(enc.labels, enc.input_ids))
    # prompt_end: the last token of the first user turn, just before the first assistant header
    after = tokens(TOK, enc.input_ids[enc.prompt_end:enc.prompt_end + 3])
    assert after == ["\n", "<|im_start|>", "assistant"]
    assert tokens(TOK, enc.input_ids[enc.prompt_end - 1:enc.prompt_end]) == ["<|im_end|>"]


def test_encode_follows_the_template_not_chatml():
    tok = tokenizer(BRACKETS)
    meta = {"conversations": turns(("system", "you"), ("human", "<image> what"), ("gpt", " yes "),
                                   ("human", "where"), ("gpt", "here"))}
    enc = encode_conversation(meta, tok, max_length=100, image_tokens=1)
    learnt = [t for t, label in zip(tokens(tok, enc.input_ids), enc.labels) if label != IGNORE_INDEX]
    assert learnt == ["yes", "<|endoftext|>", "here", "<|endoftext|>"]
    assert tokens(tok, enc.input_ids[enc.prompt_end:enc.prompt_end + 2]) == ["<|endoftext|>", "[assistant]"]


def test_encode_grounding_learns_no_text():
    meta = {"conversations": turns(("human", "<image> where the sign"), ("gpt", "here")), "kind": "grounding"}
    enc = encode_conversation(meta, TOK, max_length=100, image_tokens=4)
    assert set(enc.labels) == {IGNORE_INDEX}


def test_encode_length_counts_expanded_images():
    meta = qa("<image> <image> what", "yes")
    n = len(encode_conversation(meta, TOK, max_length=1000, image_tokens=1).input_ids)
    assert encode_conversation(meta, TOK, max_length=n - 2 + 2 * 5, image_tokens=5).n_images == 2
    with pytest.raises(BadSample) as caught:
        encode_conversation(meta, TOK, max_length=n - 2 + 2 * 5 - 1, image_tokens=5)
    assert caught.value.kind == "too_long"


def test_tokenizer_without_template_is_a_spec_error():
    with pytest.raises(ValueError, match="chat template") as caught:
        encode_conversation(qa(), tokenizer(None), max_length=100, image_tokens=1)
    assert not isinstance(caught.value, BadSample)


# ---- shards and import ---------------------------------------------------------------
def test_shards_round_trip(tmp_path):
    uri = str(tmp_path / "conv")
    samples = [
        ("a", qa(boxes=[[1, 2, 30, 20]]), [("jpg", image_bytes(seed=1))]),
        ("b", qa("<image> <image> what", "yes"), [("png", image_bytes(8, 6, "PNG")), ("jpg", image_bytes(seed=2))]),
        ("c", {"conversations": turns(("human", "what"), ("gpt", "no"))}, []),
    ]
    index = write_conversation_shards(uri, iter(samples), samples_per_shard=2, source="mix")
    assert index["samples"] == 3 and len(index["shards"]) == 2 and read_index(uri)["source"] == "mix"
    got = list(iter_conversations(uri))
    assert [k for k, _, _ in got] == ["a", "b", "c"]
    for (_, meta, images), (key, original, files) in zip(got, samples):
        assert meta == {"source": "mix", "id": key, **original}
        assert images == [data for _, data in files]
    source = SourceIndex.open(uri)
    assert [read_conversation(source, i) for i in range(3)] == got  # one ranged read each


def test_import_llava_counts_bad_items(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(image_bytes())
    (root / "b.png").write_bytes(image_bytes(20, 10, "PNG"))
    (root / "c.bmp").write_bytes(image_bytes(12, 12, "BMP"))
    (root / "broken.jpg").write_bytes(image_bytes()[:300])
    items = [
        {"id": "ok.1", "image": "a.jpg", "conversations": turns(("human", "<image>\nwhat"), ("gpt", "yes")),
         "box": [1, 1, 20, 20]},
        {"id": "two", "image": ["b.png", "c.bmp"], "conversations": turns(("human", "<image><image> what"), ("gpt", "no"))},
        {"id": "text", "conversations": turns(("human", "what"), ("gpt", "no"))},
        {"id": "gone", "image": "nope.jpg", "conversations": turns(("human", "<image>"), ("gpt", "x"))},
        {"id": "broken", "image": "broken.jpg", "conversations": turns(("human", "<image>"), ("gpt", "x"))},
        {"id": "noph", "image": "a.jpg", "conversations": turns(("human", "what"), ("gpt", "x"))},
        {"id": "box", "image": "a.jpg", "conversations": turns(("human", "<image>"), ("gpt", "x")), "box": [0, 0, 99, 5]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    out = str(tmp_path / "shards")
    summary = import_llava(str(tmp_path / "llava.json"), str(root), out, samples_per_shard=2)
    assert summary == {"written": 3, "skipped": {"missing_image": 1, "bad_image": 1, "no_placeholder": 1,
                                                 "bad_box": 1}}
    got = {meta["id"]: (meta, images) for _, meta, images in iter_conversations(out)}
    assert got["ok.1"][0]["boxes"] == [[1, 1, 20, 20]] and got["ok.1"][0]["kind"] == "qa"
    assert got["two"][0]["boxes"] == [None, None] and len(got["two"][1]) == 2
    assert Image.open(io.BytesIO(got["two"][1][1])).format == "PNG"  # BMP stored as PNG
    assert got["text"][1] == []


# ---- loader --------------------------------------------------------------------------
S = 12  # < half of the images' sides: a reduced-scale JPEG decode would show


def qa_samples(n: int, prefix: str = "q") -> list:
    out = []
    for i in range(n):
        images = [("jpg", image_bytes(40 + i, 30, seed=i))] + ([("png", image_bytes(20, 24, "PNG"))] if i % 3 == 0 else [])
        question = IMAGE_TOKEN * len(images) + "\nwhat is here" + " the sign" * (i % 4)
        boxes = [[2, 3, 30, 25]] + [None] * (len(images) - 1) if i % 2 else None
        out.append((f"{prefix}{i}", qa(question, "a red cat" if i % 2 else "no", boxes=boxes), images))
    return out


def grounding_samples(n: int) -> list:
    meta = {"conversations": turns(("human", "<image>\nwhere the sign")), "kind": "grounding", "boxes": [[4, 4, 20, 16]]}
    return [(f"g{i}", meta, [("jpg", image_bytes(48, 32, seed=i))]) for i in range(n)]


BAD_SAMPLES = [  # one per kind the loader must count and skip, each with a good image
    ("no_turns", {"conversations": []}),
    ("first_not_human", {"conversations": turns(("gpt", "<image> what"), ("human", "yes"))}),
    ("no_placeholder", qa("what is here")),
    ("too_many_placeholders", qa("<image><image> what")),
    ("bad_box", qa(boxes=[[0, 0, 400, 10]])),
    ("empty_answer", qa("<image> what", " ")),
    ("too_long", qa("<image>" + " what" * 60)),
    ("kind_mismatch", {"conversations": turns(("human", "<image> where")), "kind": "grounding", "boxes": [[1, 1, 5, 5]]}),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("conversations")
    uris = {name: str(root / name) for name in ("qa", "ground", "bad")}
    write_conversation_shards(uris["qa"], qa_samples(8), samples_per_shard=3, source="qa")
    write_conversation_shards(uris["ground"], grounding_samples(6), samples_per_shard=4, source="ground")
    bad = [(f"x{i}", meta, [("jpg", image_bytes(seed=i))]) for i, (_, meta) in enumerate(BAD_SAMPLES)]
    bad.append(("xtoo_few", qa("<image> what"), [("jpg", image_bytes()), ("jpg", image_bytes())]))
    bad.append(("ximage", qa(), [("jpg", image_bytes()[:200])]))
    good = qa_samples(6, prefix="ok")
    mixed = [s for pair in zip(good, bad) for s in pair] + bad[len(good):]  # bad ones spread over the shards
    write_conversation_shards(uris["bad"], mixed, samples_per_shard=4, source="bad")
    return uris


def loader(uris: dict, names=("qa", "ground"), **kw):
    params = {"tokenizer": TOK, "image_size": S, "max_length": 40, "image_tokens": 4, "rank": 0, "world_size": 1,
              "global_batch": 4, "micro_batch": 2, "seed": 0} | kw
    return build_conversation_loader([{"name": n, "uri": uris[n]} for n in names], **params)


def test_batch_contract(sources):
    batch = next(loader(sources, names=("qa",), global_batch=8, micro_batch=8))  # all 8: with and without boxes
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_end", "images", "image_sizes", "boxes",
                          "has_box", "grounding", "ids"}
    b, length = batch["input_ids"].shape
    n = int((batch["input_ids"] == TOK.convert_tokens_to_ids(IMAGE_TOKEN)).sum())
    assert b == 8 and batch["labels"].shape == batch["attention_mask"].shape == (b, length)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["prompt_end"].dtype == torch.long
    assert batch["attention_mask"].dtype == batch["has_box"].dtype == batch["grounding"].dtype == torch.bool
    assert batch["images"].shape == (n, 3, S, S) and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"].shape == (n, 2) and batch["image_sizes"].dtype == torch.long
    assert batch["boxes"].shape == (n, 4) and batch["boxes"].dtype == torch.float32 and batch["has_box"].shape == (n,)
    assert not batch["grounding"].any() and len(batch["ids"]) == b
    pad = ~batch["attention_mask"]
    assert (batch["input_ids"][pad] == TOK.pad_token_id).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()
    ends = batch["input_ids"].gather(1, batch["prompt_end"][:, None] + 1)
    assert (ends == TOK.convert_tokens_to_ids("<|im_start|>")).all()
    # every image: the squash-resized original (Pillow bicubic), its original size, its box normalised
    stored = {key: (meta, images) for key, meta, images in iter_conversations(sources["qa"])}
    expected = [(meta.get("boxes") or [None] * len(images), j, Image.open(io.BytesIO(data)).convert("RGB"))
                for key in batch["ids"] for meta, images in [stored[key]] for j, data in enumerate(images)]
    assert len(expected) == n and any(boxes[j] for boxes, j, _ in expected)
    for k, (boxes, j, original) in enumerate(expected):
        pixels = torch.from_numpy(np.array(original.resize((S, S), Image.BICUBIC))).permute(2, 0, 1)
        assert torch.equal(batch["images"][k], pixels)
        w, h = original.size
        assert batch["image_sizes"][k].tolist() == [w, h]
        assert bool(batch["has_box"][k]) == (boxes[j] is not None)
        x0, y0, x1, y1 = boxes[j] or (0, 0, 0, 0)
        assert torch.allclose(batch["boxes"][k], torch.tensor([x0 / w, y0 / h, x1 / w, y1 / h]))


def test_kinds_never_share_a_micro_batch(sources):
    it = loader(sources)
    flags = [next(it)["grounding"] for _ in range(16)]
    assert all(f.all() or not f.any() for f in flags)
    kinds = [bool(f[0]) for f in flags]
    assert kinds[0::2] == kinds[1::2]  # both micro-batches of a step hold the same kind
    assert True in kinds and False in kinds
    assert it.bad_sample_counts() == {}


def test_ranks_see_disjoint_samples(sources):
    ranks = [loader(sources, names=("qa",), world_size=2, rank=r, micro_batch=1) for r in range(2)]
    seen = [[i for _ in range(4) for i in next(it)["ids"]] for it in ranks]  # 2 steps = one epoch of 8
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"q{i}" for i in range(8))


def test_exact_resume(sources):
    it = loader(sources)
    for _ in range(3):  # stop mid-step
        next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = loader(sources)
    resumed.load_state_dict(state)
    for a, b in zip(expected, [next(resumed) for _ in range(5)]):
        assert a["ids"] == b["ids"] and set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a if k != "ids")


def test_bad_samples_are_counted_and_skipped(sources):
    it = loader(sources, names=("bad",), global_batch=4, micro_batch=4)
    batches = [next(it) for _ in range(4)]  # 16 slots: one epoch of the 16 samples
    assert all(len(b["ids"]) == 4 for b in batches)
    assert {i for b in batches for i in b["ids"]} <= {f"ok{i}" for i in range(6)}
    counts = it.bad_sample_counts()
    expected = {kind for kind, _ in BAD_SAMPLES} | {"too_few_placeholders", "bad_image"}
    assert expected <= set(counts), counts


def test_workers_make_the_same_batches(sources):
    inline, workers = loader(sources), loader(sources, num_workers=2)
    for _ in range(4):
        a, b = next(inline), next(workers)
        assert a["ids"] == b["ids"] and torch.equal(a["images"], b["images"])


def test_storage_errors_on_conversation_reads_are_retried_not_skipped(sources):
    """An outage is not a bad sample: the read is retried (and counted), the sample kept."""
    from collections import Counter

    from ps3.data.retry import ReadRetry
    from ps3.vila_hd.conversations import read_conversation

    counts = Counter()
    index = SourceIndex.open(sources["qa"], ReadRetry(first_delay_s=0.01, counts=counts))
    expected = read_conversation(index, 1)
    real, failures = index.fs, [ConnectionError("endpoint down")] * 2

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def cat_file(self, *args, **kwargs):
            if failures:
                raise failures.pop()
            return real.cat_file(*args, **kwargs)

    index.fs = Flaky()
    assert read_conversation(index, 1) == expected
    assert counts == {"read_retries": 2}


def test_pin_memory_reaches_the_data_loader_of_worker_processes(sources, data_loader_kwargs):
    """As the PS3 loader's: on CUDA the task asks for page-locked batches (non-blocking copies)."""
    assert next(loader(sources, num_workers=1, pin_memory=True))["images"].dtype == torch.uint8
    assert data_loader_kwargs["pin_memory"] is True
