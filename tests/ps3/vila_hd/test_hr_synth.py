"""High-res SFT synthesis: the paste is where the box says, deterministic, resumable, readable."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from ps3_platform.runtime.task import TaskSetupError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ps3.data.index import SourceIndex
from ps3.tasks.hr_sft_synth import build
from ps3.vila_hd.conversations import (
    iter_conversations,
    read_conversation,
    validate_sample,
    write_conversation_shards,
)
from ps3.vila_hd.hr_synth import paste_on_canvas, synthesize
from ps3.vila_hd.llm import IMAGE_TOKEN
from ps3.vila_hd.loader import build_conversation_loader

CANVAS, SIDE = (256, 256), (96, 128)
SMALL = {"canvas_size": CANVAS, "paste_side": SIDE}


def image_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth gradient: JPEG and bicubic resizing change it by a few levels only."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 200 // width + seed * 20, y * 200 // height, (x + y + seed * 30) % 64 + 100], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, fmt, quality=95)
    return buffer.getvalue()


def conversation(question: str = "<image>\nwhat colour", answer: str = "red", **extra) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, "kind": "qa", **extra}


def samples(n: int = 5) -> list:
    return [(f"s{i}", conversation(answer=f"answer {i}", boxes=[[8, 6, 40, 30]] if i == 1 else None),
             [("jpg", image_bytes(64, 48 - i, seed=i))]) for i in range(n)]


@pytest.fixture
def source(tmp_path) -> str:
    uri = str(tmp_path / "lowres")
    write_conversation_shards(uri, samples(), samples_per_shard=2, source="vqa")
    return uri


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)


def test_pasted_region_is_the_resized_image_on_a_solid_canvas():
    src = image_bytes()
    data, box, size = paste_on_canvas(src, np.random.default_rng(3), CANVAS, SIDE, quality=95)
    x0, y0, x1, y1 = (int(v) for v in box)
    assert size == (64, 48) and box == [float(v) for v in (x0, y0, x1, y1)]
    assert 0 <= x0 < x1 <= CANVAS[0] and 0 <= y0 < y1 <= CANVAS[1]
    assert SIDE[0] <= x1 - x0 <= SIDE[1] and abs((y1 - y0) - (x1 - x0) * 48 / 64) <= 1  # long side drawn, aspect kept
    canvas = decoded(data)
    assert canvas.shape == (CANVAS[1], CANVAS[0], 3)
    resized = np.asarray(Image.open(io.BytesIO(src)).convert("RGB").resize((x1 - x0, y1 - y0), Image.BICUBIC), float)
    assert np.abs(canvas[y0:y1, x0:x1] - resized)[2:-2, 2:-2].mean() < 3
    colour = np.random.default_rng(3).integers(0, 256, size=3)  # the first draw
    outside = np.ones(canvas.shape[:2], bool)
    outside[max(0, y0 - 16):y1 + 16, max(0, x0 - 16):x1 + 16] = False  # JPEG blocks blur the edge
    assert np.abs(canvas[outside] - colour).max() <= 3


def test_output_is_a_pure_function_of_seed_and_input(source, tmp_path):
    def run(name, seed, threads=1):
        synthesize(str(tmp_path / name), input=source, seed=seed, samples_per_shard=2, threads=threads, **SMALL)
        return list(iter_conversations(str(tmp_path / name)))

    first, again, other = run("a", 0), run("b", 0, threads=3), run("c", 1)  # threads change nothing
    assert first == again and len(first) == 5
    assert all(a[2] != c[2] and a[1]["paste_box"] != c[1]["paste_box"] for a, c in zip(first, other))


def test_samples_keep_their_conversation_and_box_the_paste(source, tmp_path):
    out = str(tmp_path / "hr")
    summary = synthesize(out, input=source, samples_per_shard=2, source="hr", **SMALL)
    assert summary == {"written": 5, "skipped": {}, "shards": 3, "resumed_shards": 0}
    got = {key: (meta, images) for key, meta, images in iter_conversations(out)}
    for key, original, _ in samples():
        meta, (image,) = got[key]
        assert meta["conversations"] == original["conversations"] and meta["kind"] == "qa"
        assert meta["source"] == "hr" and meta["id"] == key and meta["canvas"] == list(CANVAS)
        assert Image.open(io.BytesIO(image)).size == CANVAS
        if original.get("boxes") is None:
            assert meta["boxes"] == [meta["paste_box"]]
    meta = got["s1"][0]  # its input box [8, 6, 40, 30] of a 64x47 image, scaled and offset
    px0, py0, px1, py1 = meta["paste_box"]
    sx, sy = (px1 - px0) / 64, (py1 - py0) / 47
    assert meta["boxes"] == [pytest.approx([px0 + 8 * sx, py0 + 6 * sy, px0 + 40 * sx, py0 + 30 * sy])]
    index = SourceIndex.open(out)  # one ranged read each, and every sample passes the loader's checks
    for i in range(5):
        key, meta, images = read_conversation(index, i)
        assert (meta, images) == got[key]
        validate_sample(meta, [CANVAS])


def test_the_conversation_loader_reads_the_output(source, tmp_path):
    out = str(tmp_path / "hr")
    synthesize(out, input=source, samples_per_shard=2, **SMALL)
    words = ["[UNK]", "\n", "user", "assistant", "what", "colour", "answer", "0", "1", "2", "3", "4"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    model = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=specials[1:], chat_template=chatml)
    loader = build_conversation_loader([{"name": "hr", "uri": out}], tokenizer=tok, image_size=16, max_length=64,
                                       image_tokens=4, rank=0, world_size=1, global_batch=4, micro_batch=4, seed=0)
    batch = next(iter(loader))
    assert batch["images"].shape[0] == 4 and bool(batch["has_box"].all())


def test_resumes_only_the_shards_not_committed(source, tmp_path):
    out = tmp_path / "hr"
    synthesize(str(out), input=source, samples_per_shard=2, **SMALL)
    before = list(iter_conversations(str(out)))
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar.done").unlink()
    summary = synthesize(str(out), input=source, samples_per_shard=2, **SMALL)
    assert summary == {"written": 5, "skipped": {}, "shards": 3, "resumed_shards": 2}
    assert list(iter_conversations(str(out))) == before
    with pytest.raises(ValueError, match="other settings"):  # a rerun must not mix two draws
        synthesize(str(out), input=source, samples_per_shard=2, seed=7, **SMALL)


def test_bad_samples_are_counted_and_max_samples_caps(tmp_path):
    uri = str(tmp_path / "lowres")
    bad = [("broken", conversation(), [("jpg", b"not an image")]),
           ("two", conversation("<image><image> which"), [("jpg", image_bytes()), ("jpg", image_bytes(seed=1))]),
           ("text", conversation("what"), [])]
    write_conversation_shards(uri, samples(2) + bad, samples_per_shard=10, source="vqa")
    summary = synthesize(str(tmp_path / "hr"), input=uri, samples_per_shard=2, **SMALL)
    assert summary == {"written": 2, "skipped": {"image_decode": 1, "not_one_image": 2}, "shards": 3,
                       "resumed_shards": 0}
    capped = synthesize(str(tmp_path / "capped"), input=uri, samples_per_shard=2, max_samples=3, **SMALL)
    assert capped == {"written": 2, "skipped": {"image_decode": 1}, "shards": 2, "resumed_shards": 0}


def test_llava_json_input(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(image_bytes())
    (root / "b.png").write_bytes(image_bytes(fmt="PNG"))
    turns = conversation()["conversations"]
    items = [{"id": "x.1", "image": "a.jpg", "conversations": turns, "box": [8, 6, 40, 30]},
             {"id": "x2", "image": "b.png", "conversations": turns},
             {"id": "gone", "image": "missing.jpg", "conversations": turns},
             {"id": "two", "image": ["a.jpg", "b.png"], "conversations": conversation("<image><image> w")["conversations"]}]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    out = str(tmp_path / "hr")
    summary = synthesize(out, llava_json=str(tmp_path / "llava.json"), image_root=str(root), **SMALL)
    assert summary == {"written": 2, "skipped": {"missing_image": 1, "not_one_image": 1}, "shards": 1,
                       "resumed_shards": 0}
    got = {meta["id"]: meta for _, meta, _ in iter_conversations(out)}
    assert set(got) == {"x.1", "x2"} and got["x2"]["boxes"] == [got["x2"]["paste_box"]]
    x0, _, x1, _ = got["x.1"]["paste_box"]
    assert got["x.1"]["boxes"][0][0] == pytest.approx(x0 + 8 * (x1 - x0) / 64)


def stage_context(tmp_path, **params) -> SimpleNamespace:
    """What `build` reads of the runtime's RunContext. The runtime itself (`platformctl submit
    --backend local`) takes ~13 s a run here, over this file's budget; it is the same `run()`."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    params = {"output": str(tmp_path / "hr"), "canvasSize": [256, 256], "pasteSide": [96, 128],
              "samplesPerShard": 2} | params
    return SimpleNamespace(params=params, rank=0, run_dir=run_dir, log=logging.getLogger("hr_sft_synth"))


def test_stage_writes_shards_and_its_summary(source, tmp_path):
    ctx = stage_context(tmp_path, input=f"file://{source}")
    summary = build(ctx).run()
    assert summary == {"written": 5, "skipped": {}, "shards": 3, "resumed_shards": 0}
    assert len(list(iter_conversations(str(tmp_path / "hr")))) == 5
    assert json.loads((ctx.run_dir / "hr_sft_synth.json").read_text()) == summary
    assert build(ctx).run()["resumed_shards"] == 3  # a restarted stage redraws nothing


@pytest.mark.parametrize("params, message", [
    ({"input": "file:///nowhere/src"}, "spec params.input file:///nowhere/src: no index.json in"),
    ({"llavaJson": "/nowhere/l.json", "imageRoot": "/nowhere"}, "spec params.llavaJson /nowhere/l.json: "),
    ({}, "spec params.: Value error, give exactly one of input"),
    ({"input": "/x", "pasteSide": [96, 300]}, "pasteSide must be [low, high]"),
])
def test_stage_bad_params_are_one_line(tmp_path, params, message):
    with pytest.raises(TaskSetupError) as info:
        build(stage_context(tmp_path, **params)).run()
    assert message in str(info.value) and "\n" not in str(info.value)
