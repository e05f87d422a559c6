"""Inference: batched greedy answers equal the model's own next-token choice, restricted
answers stay among the options, the selection picture, and `platformctl infer` as users run it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ps3.data.synth import SynthConfig
from ps3.vila_hd.export import export_vila_hd
from ps3.vila_hd.infer import Answer, answer_batch, choose_options, draw_selection, prompt_batch
from ps3.vila_hd.model import Selection
from ps3.vila_hd.synth import vqa_sample
from ps3_platform.cli import main

QUESTIONS = ["What colour is the dot on the red sign?\n(A) black\n(B) white\n(C) magenta\n(D) cyan",
             "What shape is the blue sign?"]


@pytest.fixture(scope="module")
def tiny(tiny_vila_hd):
    model, tokenizer, _ = tiny_vila_hd
    images = [vqa_sample(0, i, SynthConfig(scene_size=(300, 400)), question="mark")[2][0][1] for i in range(2)]
    return model, tokenizer, images


@pytest.mark.parametrize("mode", ["after_prompt", "after_image"])
def test_generation_on_a_padded_batch_starts_with_the_forward_passs_choice(tiny, mode):
    """Rows of different lengths are left-padded for generation: each row's first new token is
    the argmax of a plain forward at its own last position (a padding mistake breaks this)."""
    model, tokenizer, images = tiny
    batch = prompt_batch(tokenizer, images, QUESTIONS, image_size=256)
    assert batch["attention_mask"].sum(1).unique().numel() == 2  # the rows differ in length
    selection = Selection(mode=mode)
    tokens, _ = model.generate(batch, selection, max_new_tokens=2)
    embeds, mask, _, _ = model.embed(batch, selection)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    expected = logits[torch.arange(2), mask.sum(1) - 1].argmax(-1)
    assert tokens[:, 0].tolist() == expected.tolist()


def test_restricted_answers_are_letters_among_each_questions_options(tiny):
    model, tokenizer, images = tiny
    answers, batch = choose_options(model, tokenizer, images, QUESTIONS, [2, 3], Selection(), boxes=[None, [1, 1, 90, 90]])
    assert answers[0].text in "AB" and answers[1].text in "ABC"
    assert batch["has_box"].tolist() == [False, True]
    assert all(a.image_tokens > 0 and a.seconds > 0 for a in answers)


def test_random_selection_differs_from_bottom_up_at_the_same_budget(tiny):
    model, tokenizer, images = tiny
    torch.manual_seed(1)
    bottomup, _ = answer_batch(model, tokenizer, images, QUESTIONS, Selection(mode="after_image"), max_new_tokens=1)
    random, _ = answer_batch(model, tokenizer, images, QUESTIONS, Selection(mode="random"), max_new_tokens=1)
    for a, b in zip(bottomup, random):
        assert [s.sum() for s in a.selected] == [s.sum() for s in b.selected]  # same budget per scale
    assert any((a != b).any() for x, y in zip(bottomup, random) for a, b in zip(x.selected, y.selected))


def test_the_picture_outlines_each_scales_selected_cells(tmp_path):
    image = Image.new("RGB", (400, 200), (128, 128, 128))
    buffer = tmp_path / "in.png"
    image.save(buffer)
    cells = np.zeros((4, 4), dtype=bool)
    cells[0, 0] = True  # top-left quarter-by-quarter cell
    answer = Answer("B", [cells, np.zeros((8, 8), dtype=bool)], (128, 256), 17, 0.01)
    out = tmp_path / "out.png"
    draw_selection(buffer.read_bytes(), answer, out, caption="which?")
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert picture.shape[1] == 400 and picture.shape[0] > 200  # the image under a legend strip
    body = picture[picture.shape[0] - 200:]
    assert (body[5, 5] != 128).any()  # inside the selected cell: tinted
    assert (body[150, 300] == 128).all()  # elsewhere: untouched


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model, tokenizer, images = tiny
    root = tmp_path_factory.mktemp("infer")
    export_vila_hd(model, tokenizer, str(root / "vila-hd"))
    (root / "scene.jpg").write_bytes(images[0])
    return root


def test_platformctl_infer_prints_the_answer_and_draws_the_selection(exported, capsys):
    picture = exported / "where.png"
    args = ["infer", str(exported / "vila-hd"), str(exported / "scene.jpg"), QUESTIONS[0], "--mode", "after_image",
            "--select-num-each-scale", "4,16", "--max-new-tokens", "3", "--picture", str(picture), "-o", "json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["selected_patches"] == {"128px": 4, "256px": 16}
    assert result["picture"] == str(picture) and Image.open(picture).format == "PNG"


@pytest.mark.parametrize("problem, extra, message", [
    ("not-an-export", [], "give --llm and --preset"),
    ("bad-image", [], "error:"),
    ("bad-split", ["--select-num-each-scale", "4,x"], "is not an integer"),
])
def test_platformctl_infer_bad_input_is_one_line(exported, tmp_path, capsys, problem, extra, message):
    model, image = str(exported / "vila-hd"), str(exported / "scene.jpg")
    if problem == "not-an-export":
        model = str(tmp_path)
    if problem == "bad-image":
        image = str(tmp_path / "broken.jpg")
        (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["infer", model, image, "What?", "--picture", str(tmp_path / "p.png"), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
