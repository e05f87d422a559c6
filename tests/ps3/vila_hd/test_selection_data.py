"""Grounding data from PS3 pre-training boxes (paper figure 8, left), on tiny shards written here."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from ps3.data.records import Record
from ps3.data.writer import ShardWriter
from ps3.model import get_preset
from ps3.vila_hd import selection_data
from ps3.vila_hd.conversations import iter_conversations, validate_sample
from ps3.vila_hd.llm import build_tiny_llm
from ps3.vila_hd.selection_data import QUESTION_TEMPLATES, LLMQuestions, make_selection_data, template_question

TINY = get_preset("ps3-tiny")  # top scale 256 px, patch 8: a 128 x 96 image is 32 x 32 patches
SIZE = (128, 96)
BIG = (10.0, 10.0, 60.0, 50.0)  # ~330 patches
SMALL = (0.0, 0.0, 2.0, 2.0)  # 1/3 of a patch


def _jpeg(colour, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", SIZE, colour).save(buffer, fmt)
    return buffer.getvalue()


def write_source(uri: str, n: int = 6, per_shard: int = 2) -> str:
    """n images; image i has a big box, a too-small box, and (odd i) a box 1 px past the edge."""
    with ShardWriter(uri, "scene", samples_per_shard=per_shard) as writer:
        for i in range(n):
            boxes, captions = [BIG, SMALL], [f"red sign {i}", f"speck {i}"]
            if i % 2:
                boxes.append((100.0, 40.0, 129.0, 97.0))
                captions.append(f"blue sign {i}")
            writer.write(f"img{i:03d}", _jpeg((20 * i, 40, 90)), "jpg",
                         Record(f"img{i:03d}", *SIZE, boxes, captions, None, "scene"))
    return uri


@pytest.fixture
def source(tmp_path) -> str:
    return write_source(f"file://{tmp_path}/ps3/scene")


def read_back(uri: str) -> dict[str, tuple[dict, bytes]]:
    """{key: (meta, image)}, each sample checked the way the VILA-HD loader checks it."""
    out = {}
    for key, meta, images in iter_conversations(uri):
        image, = images
        validate_sample(meta, [Image.open(io.BytesIO(image)).size])
        out[key] = (meta, image)
    return out


def test_each_kept_pair_is_one_grounding_sample_with_its_box(source, tmp_path):
    output = f"file://{tmp_path}/out"
    summary = make_selection_data([source], output, TINY, samples_per_shard=4)
    samples = read_back(output)
    assert summary == {"written": 9, "dropped": {"too_small": 6}, "llm_fallback": 0, "images": 6, "shards": 2,
                       "resumed_shards": 0}
    assert len(samples) == 9 and set(samples) >= {"img000-0", "img001-0", "img001-2"}
    meta, image = samples["img001-2"]
    assert meta["kind"] == "grounding" and meta["source"] == "selection_data" and meta["id"] == "img001-2"
    assert meta["boxes"] == [[100.0, 40.0, 128.0, 96.0]]  # clipped to the image
    human, gpt = meta["conversations"]
    assert human["value"].startswith("<image>\n") and "blue sign 1" in human["value"]
    assert gpt == {"from": "gpt", "value": "blue sign 1"}
    assert image == _jpeg((20, 40, 90))  # the input's bytes, untouched
    assert samples["img000-0"][0]["boxes"] == [list(BIG)]


def test_min_box_patches_follows_the_top_scale(source, tmp_path):
    """At 4K the 2 x 2 px box covers ~24 patches of 14 px: kept; a higher threshold drops it again."""
    four_k = get_preset("ps3-4k-siglip")
    assert selection_data.box_patches(SMALL, *SIZE, four_k) > 1
    assert make_selection_data([source], f"file://{tmp_path}/a", four_k)["written"] == 15
    raised = make_selection_data([source], f"file://{tmp_path}/b", four_k, min_box_patches=30)
    assert raised["written"] == 9 and raised["dropped"] == {"too_small": 6}


def test_templates_are_deterministic_per_seed_and_vary(source, tmp_path):
    def questions(name: str, seed: int) -> dict[str, str]:
        make_selection_data([source], f"file://{tmp_path}/{name}", TINY, seed=seed)
        return {k: m["conversations"][0]["value"] for k, (m, _) in read_back(f"file://{tmp_path}/{name}").items()}

    assert questions("a", 0) == questions("b", 0) != questions("c", 1)
    assert template_question("x", 0, "k", 0) == template_question("x", 0, "k", 0)
    used = {template_question("{caption}", 0, f"k{i}", 0) for i in range(50)}
    assert used == set(QUESTION_TEMPLATES)


def test_a_rerun_rewrites_only_the_missing_shard(source, tmp_path):
    output = tmp_path / "out"
    first = make_selection_data([source], f"file://{output}", TINY, samples_per_shard=2)
    before = read_back(f"file://{output}")
    gone = sorted(output.glob("*.tar"))[1]
    gone.unlink()
    Path(f"{gone}.done").unlink()
    again = make_selection_data([source], f"file://{output}", TINY, samples_per_shard=2)
    assert again == {**first, "resumed_shards": 2} and first["shards"] == 3
    assert read_back(f"file://{output}") == before
    # other settings never resume into shards drawn differently: all written anew, old ones left out of the index
    other = make_selection_data([source], f"file://{output}", TINY, samples_per_shard=2, seed=7)
    assert other["resumed_shards"] == 0 and len(read_back(f"file://{output}")) == len(before)


def test_bad_records_missing_images_and_bad_pairs_are_counted(tmp_path):
    uri = f"file://{tmp_path}/damaged"
    good = Record("ok", *SIZE, [BIG], ["sign"], None, "scene")
    with ShardWriter(uri, "scene", samples_per_shard=10) as writer:
        writer.write("ok", _jpeg((0, 0, 0)), "jpg", good)
        writer.write_members("badjson", {"jpg": _jpeg((0, 0, 0)), "json": b"{not json"})
        writer.write_members("noimage", {"json": good.to_json()})
        mixed = {"width": SIZE[0], "height": SIZE[1], "boxes": [list(BIG), list(BIG), [50, 50, 50, 60], [-9, 0, 5, 5]],
                 "captions": ["kept", " ", "flat", "outside"]}
        writer.write_members("mixed", {"png": _jpeg((0, 0, 0), "PNG"), "json": json.dumps(mixed).encode()})
    summary = make_selection_data([uri], f"file://{tmp_path}/out", TINY)
    assert summary["written"] == 3 and summary["images"] == 4
    assert summary["dropped"] == {"bad_record": 1, "image_missing": 1, "no_caption": 1, "bad_box": 1}
    samples = read_back(f"file://{tmp_path}/out")
    assert set(samples) == {"ok-0", "mixed-0", "mixed-3"}
    assert samples["mixed-3"][0]["boxes"] == [[0.0, 0.0, 5.0, 5.0]]  # far outside, clipped, still a region


def test_several_inputs_get_distinct_keys_and_max_samples_caps_images(source, tmp_path):
    second = write_source(f"file://{tmp_path}/ps3/again", n=2)
    summary = make_selection_data([source, second], f"file://{tmp_path}/out", TINY, max_samples=7)
    keys = set(read_back(f"file://{tmp_path}/out"))
    assert summary["images"] == 7 and "0-img000-0" in keys and "1-img000-0" in keys and "1-img001-0" not in keys


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> str:
    texts = ["where is the red sign", "what colour is the sign", "look at the speck near the edge"] * 3
    return build_tiny_llm(str(tmp_path_factory.mktemp("llm") / "tiny"), texts)


def test_llm_questions_are_batched_and_fall_back_to_templates(source, tmp_path, tiny_llm, monkeypatch):
    batches = []
    generate = LLMQuestions._generate

    def counted(self, texts):
        batches.append(len(texts))
        return generate(self, texts)

    monkeypatch.setattr(LLMQuestions, "_generate", counted)
    summary = make_selection_data([source], f"file://{tmp_path}/llm", TINY, llm=tiny_llm, samples_per_shard=6)
    assert summary["written"] == 9 and batches == [9]  # one shard's pairs, one batch
    for meta, _ in read_back(f"file://{tmp_path}/llm").values():  # whatever the random LM said, samples are valid
        question = meta["conversations"][0]["value"].removeprefix("<image>\n")
        assert question.strip() and "\n" not in question

    monkeypatch.setattr(LLMQuestions, "_generate", lambda self, texts: ["\n  \n"] * len(texts))  # says nothing
    empty = make_selection_data([source], f"file://{tmp_path}/empty", TINY, llm=tiny_llm)
    make_selection_data([source], f"file://{tmp_path}/templates", TINY)
    assert empty["llm_fallback"] == 9 and empty["written"] == 9
    assert read_back(f"file://{tmp_path}/empty") == read_back(f"file://{tmp_path}/templates")


def test_llm_batches_split_at_the_batch_size(tiny_llm):
    questions = LLMQuestions(tiny_llm, selection_data.DEFAULT_PROMPT, max_new_tokens=4, batch_size=2)
    asked = questions(["a red sign", "a speck", "a blue sign"])
    assert len(asked) == 3 and all("\n" not in q for q in asked)
    with pytest.raises(selection_data.LLMUnavailable, match="cannot load a causal LM"):
        LLMQuestions(str(Path(tiny_llm).parent / "nothing"), "{caption}")


# ---- the stage (tests/ps3/tasks/test_vila_hd.py runs it through the runtime, in the quickstart) ----
def _ctx(tmp_path, params: dict, preset: str | None = "ps3-tiny"):
    """What `build` reads of a RunContext: the stage's model and params, rank, run_dir, log."""
    stage = SimpleNamespace(model=SimpleNamespace(preset=preset, overrides={}), params=params)
    return SimpleNamespace(stage=stage, params=params, rank=0, run_dir=tmp_path, log=logging.getLogger("test"))


def test_the_stage_writes_its_summary_and_names_a_bad_input(source, tmp_path):
    from ps3.tasks import TASKS
    from ps3.tasks.selection_data import build
    from ps3_platform.runtime.task import TaskSetupError

    assert TASKS["selection_data"] == "ps3.tasks.selection_data:build"
    summary = build(_ctx(tmp_path, {"inputs": [source], "output": f"file://{tmp_path}/out"})).run()
    assert json.loads((tmp_path / "selection_data.json").read_text()) == summary and summary["written"] == 9
    missing = f"file://{tmp_path}/nowhere"
    with pytest.raises(TaskSetupError) as error:
        build(_ctx(tmp_path, {"inputs": [source, missing], "output": f"file://{tmp_path}/x"})).run()
    message = str(error.value)
    assert message.startswith(f"spec params.inputs[1] {missing}: ") and "\n" not in message
    assert not (tmp_path / "x").exists()  # nothing written before the inputs are known to be readable
    with pytest.raises(TaskSetupError, match="params.prompt"):
        build(_ctx(tmp_path, {"inputs": [source], "output": "o", "prompt": "no placeholder"}))
    with pytest.raises(TaskSetupError, match="params.inputs"):
        build(_ctx(tmp_path, {"inputs": [], "output": "o"}))
    default = build(_ctx(tmp_path, {"inputs": [source], "output": f"file://{tmp_path}/4k"}, preset=None)).run()
    assert default["written"] == 15  # judged at the 4K preset's scale, the 2 px boxes are kept

