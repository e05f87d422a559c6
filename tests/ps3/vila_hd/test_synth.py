"""Synthetic high-res VQA: deterministic, answers true to the scene, shards the loader can read."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ps3.data.index import read_index
from ps3.data.shards import iter_webdataset
from ps3.data.synth import COLOURS, SIGN_COLOURS, SIGN_SHAPES, SynthConfig
from ps3.vila_hd.synth import LETTERS, generate_vqa, grounding_sample, vqa_sample

SMALL = SynthConfig(scene_size=(256, 320), texture=False)
OPTION = re.compile(r"^\(([A-D])\) (\w+)$")


def _image(members) -> Image.Image:
    (ext, data), = members
    assert ext == "0.jpg"
    return Image.open(io.BytesIO(data)).convert("RGB")


def _colour_in_box(image: Image.Image, box) -> str:
    """The sign colour nearest the centre of the box's shape square (every shape covers it)."""
    x0, y0, x1, _ = box
    side = x1 - x0
    cx, cy, r = (x0 + x1) / 2, y0 + side / 2, max(1.0, side * 0.1)
    pixels = np.asarray(image.crop((round(cx - r), round(cy - r), round(cx + r), round(cy + r))), dtype=float)
    centre = np.median(pixels.reshape(-1, 3), axis=0)
    return min(SIGN_COLOURS, key=lambda c: np.abs(centre - COLOURS[c]).sum())


def _shape_of(key_seed: tuple[int, int], box) -> str:
    """Which shape `ps3.data.synth` drew at `box`, by replaying the scene's caption for that box."""
    from ps3.data.synth import make_scene
    from ps3.vila_hd import synth as vqa

    seed, i = key_seed
    _, boxes, captions, _ = make_scene(np.random.default_rng([seed, vqa._STREAMS["train", "qa"], i]), SMALL)
    return captions[[list(b) for b in boxes].index(list(box))].split()[1]


def test_samples_are_a_pure_function_of_seed_and_number():
    assert vqa_sample(3, 5, SMALL) == vqa_sample(3, 5, SMALL)
    assert grounding_sample(3, 5, SMALL) == grounding_sample(3, 5, SMALL)
    assert vqa_sample(3, 5, SMALL)[2] != vqa_sample(4, 5, SMALL)[2] != vqa_sample(3, 6, SMALL)[2]


@pytest.mark.parametrize("i", range(6))
def test_question_names_a_sign_by_colour_and_the_letter_gives_its_shape(i):
    key, meta, members = vqa_sample(0, i, SMALL)
    human, gpt = meta["conversations"]
    assert (human["from"], gpt["from"]) == ("human", "gpt") and meta["id"] == key and "." not in key
    assert meta["kind"] == "qa" and meta["category"] == "shape" and isinstance(meta["source"], str)
    lines = human["value"].split("\n")
    assert lines[0] == "<image>" and lines[-1] == "Answer with the option's letter."
    colour = re.fullmatch(r"What shape is the (\w+) sign\?", lines[1]).group(1)
    parsed = [OPTION.match(line).groups() for line in lines[2:-1]]
    assert [letter for letter, _ in parsed] == list(LETTERS) and [s for _, s in parsed] == meta["options"]
    assert sorted(meta["options"]) == sorted(SIGN_SHAPES)
    assert gpt["value"] == meta["answer"] and meta["answer"] in LETTERS

    image, (box,) = _image(members), meta["boxes"]
    assert 0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height
    assert _colour_in_box(image, box) == colour  # the box is the named sign's
    assert meta["options"][LETTERS.index(meta["answer"])] == _shape_of((0, i), box)


def test_option_order_is_shuffled_so_letters_carry_no_prior():
    answers = {vqa_sample(1, i, SMALL)[1]["answer"] for i in range(16)}
    orders = {tuple(vqa_sample(1, i, SMALL)[1]["options"]) for i in range(16)}
    assert len(answers) >= 3 and len(orders) >= 8


MARKS = SynthConfig(scene_size=(1024, 1024), texture=False)  # signs ~48 px: room to sample sign and dot apart


def _median_colour(image: Image.Image, x: float, y: float, r: float) -> np.ndarray:
    pixels = np.asarray(image.crop((round(x - r), round(y - r), round(x + r) + 1, round(y + r) + 1)), dtype=float)
    return np.median(pixels.reshape(-1, 3), axis=0)


@pytest.mark.parametrize("i", range(4))
def test_mark_question_asks_the_colour_of_the_dot_on_the_named_sign(i):
    from ps3.vila_hd.synth import MARK_COLOURS, mark_question, vocabulary_texts

    key, meta, members = vqa_sample(0, i, MARKS, question="mark", shuffle_options=False)
    human, gpt = meta["conversations"]
    lines = human["value"].split("\n")
    colour = re.fullmatch(r"What colour is the dot on the (\w+) sign\?", lines[1]).group(1)
    assert meta["category"] == "mark" and meta["options"] == list(MARK_COLOURS) and gpt["value"] == meta["answer"]
    assert human["value"].replace("<image>\n", "") == mark_question(colour, meta["options"])
    assert human["value"].replace("<image>\n", "") in vocabulary_texts()

    image, (box,) = _image(members), meta["boxes"]
    side = box[2] - box[0]
    cx, cy = (box[0] + box[2]) / 2, box[1] + side / 2
    dot = _median_colour(image, cx, cy, side * 0.05)  # inside the dot (a third of the side across)
    sign = _median_colour(image, cx + side * 0.22, cy, side * 0.02)  # outside it, inside every shape
    mark = meta["options"][LETTERS.index(meta["answer"])]
    assert min(MARK_COLOURS, key=lambda c: np.abs(dot - MARK_COLOURS[c]).sum()) == mark
    assert min(SIGN_COLOURS, key=lambda c: np.abs(sign - COLOURS[c]).sum()) == colour


def test_marks_vary_and_grounding_scenes_carry_them_when_asked():
    answers = {vqa_sample(0, i, MARKS, question="mark", shuffle_options=False)[1]["answer"] for i in range(12)}
    assert len(answers) >= 3
    plain, marked = grounding_sample(0, 1, MARKS)[2], grounding_sample(0, 1, MARKS, marks=True)[2]
    assert plain != marked
    with pytest.raises(ValueError, match="question must be one of"):
        vqa_sample(0, 0, MARKS, question="size")


def test_grounding_names_a_sign_and_gives_its_box():
    for i in range(4):
        key, meta, members = grounding_sample(0, i, SMALL)
        human, gpt = meta["conversations"]
        colour = re.fullmatch(r"<image>\nLook at the (\w+) sign\.", human["value"]).group(1)
        assert meta["kind"] == "grounding" and meta["id"] == key and gpt["value"] in SIGN_SHAPES
        image, (box,) = _image(members), meta["boxes"]
        assert 0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height
        assert _colour_in_box(image, box) == colour


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, dict]:
    uri = f"file://{tmp_path_factory.mktemp('vqa')}/out"
    return uri, generate_vqa(uri, train=7, eval=5, grounding=4, seed=2, cfg=SMALL, samples_per_shard=3)


def _samples(uri: str) -> list[dict]:
    return list(iter_webdataset(uri, [s["name"] for s in read_index(uri)["shards"]]))


def test_generate_writes_three_indexed_sources_readable_by_webdataset(written):
    uri, counts = written
    assert counts == {"train/qa": 7, "train/grounding": 4, "eval/qa": 5}
    for name, n in counts.items():
        samples = _samples(f"{uri}/{name}")
        assert len(samples) == n and read_index(f"{uri}/{name}")["samples"] == n
        for sample in samples:
            meta = json.loads(sample["json"])
            assert meta["id"] == sample["__key__"] and meta["kind"] == name.split("/")[1]
            assert Image.open(io.BytesIO(sample["0.jpg"])).size[0] > 0


def test_eval_never_shares_a_scene_with_training(written):
    uri, _ = written
    digests = {name: {hashlib.sha1(s["0.jpg"]).hexdigest() for s in _samples(f"{uri}/{name}")}
               for name in ("train/qa", "train/grounding", "eval/qa")}
    assert not digests["eval/qa"] & (digests["train/qa"] | digests["train/grounding"])
    assert not digests["train/qa"] & digests["train/grounding"]


def test_texts_cover_every_word_used(written):
    uri, _ = written
    texts = read_path(f"{uri}/texts.txt")
    vocabulary = set(texts.split())
    used = set()
    for name in ("train/qa", "train/grounding", "eval/qa"):
        for sample in _samples(f"{uri}/{name}"):
            for turn in json.loads(sample["json"])["conversations"]:
                used |= set(turn["value"].replace("<image>", " ").split())
                assert turn["value"].replace("<image>\n", "") in texts  # whole texts, not just words
    assert used and used <= vocabulary
    assert {*SIGN_COLOURS, *SIGN_SHAPES, *LETTERS} <= set(texts.splitlines())
    assert "<image>" not in texts


def read_path(uri: str) -> str:
    from ps3.data.fs import filesystem

    fs, path = filesystem(uri)
    return fs.cat_file(path).decode()


def _ctx(params: dict, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(params=params, rank=rank, world_size=2, log=logging.getLogger("test"))


def test_task_writes_once_and_skips_finished_work(tmp_path, monkeypatch):
    from ps3.tasks import synth_vqa

    params = {"output": f"file://{tmp_path}/q", "trainSamples": 2, "evalSamples": 1, "groundingSamples": 1,
              "seed": 4, "sceneSize": [256, 288], "samplesPerShard": 2}
    assert synth_vqa.build(_ctx(params, rank=1)).run() == {} and not (tmp_path / "q").exists()
    counts = synth_vqa.build(_ctx(params)).run()
    assert counts == {"train/qa": 2, "train/grounding": 1, "eval/qa": 1} and (tmp_path / "q/texts.txt").exists()

    def again(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(synth_vqa, "generate_vqa", again)
    assert synth_vqa.build(_ctx(params)).run() == counts
    with pytest.raises(AssertionError, match="redone"):  # other params: the marker does not vouch
        synth_vqa.build(_ctx(params | {"seed": 5})).run()


@pytest.mark.parametrize("bad", [{"sceneSize": [512, 300]}, {"sceneSize": [100, 300]}, {"trainSamples": 0},
                                 {"signFraction": [0.3, 0.4]}, {"question": "size"}, {"signs": [2, 5]},
                                 {"evalSample": 3}])
def test_task_rejects_bad_params_naming_the_field(tmp_path, bad):
    from ps3.tasks import synth_vqa
    from ps3_platform.runtime.task import TaskSetupError

    with pytest.raises(TaskSetupError, match="spec params"):
        synth_vqa.build(_ctx({"output": f"file://{tmp_path}/q"} | bad))


def test_fixed_option_order_keeps_the_same_scenes():
    from ps3.data.synth import SIGN_SHAPES
    from ps3.vila_hd.synth import vqa_sample

    cfg = SynthConfig(scene_size=(256, 320))
    _, shuffled, images = vqa_sample(0, 3, cfg)
    _, fixed, same_images = vqa_sample(0, 3, cfg, shuffle_options=False)
    assert fixed["options"] == list(SIGN_SHAPES) and images == same_images
    assert fixed["answer"] == "ABCD"[list(SIGN_SHAPES).index(shuffled["options"]["ABCD".index(shuffled["answer"])])]
