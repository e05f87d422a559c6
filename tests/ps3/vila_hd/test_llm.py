"""The VILA-HD LLM loader on tiny random Qwen2 checkpoints written here (CPU, no hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from ps3.vila_hd.llm import IMAGE_TOKEN, LLMError, build_tiny_llm, check_llm_dir, load_llm

TEXTS = ["what colour is the small sign in the top left corner", "the sign is red", "read the text on the page"] * 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_llm(str(tmp_path_factory.mktemp("llm") / "tiny"), TEXTS)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_llm(tiny_dir)


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint, to break."""
    def copy() -> Path:
        return Path(shutil.copytree(tiny_dir, tmp_path / "broken"))
    return copy


def test_tiny_build_loads_and_gives_logits_over_the_vocabulary(tiny_dir, loaded):
    assert check_llm_dir(tiny_dir) == [] and check_llm_dir(f"file://{tiny_dir}") == []
    ids = loaded.tokenizer(f"{IMAGE_TOKEN}\nwhat colour is the sign", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 512) and loaded.model.config.vocab_size == 512
    assert loaded.model.device.type == "cpu" and loaded.tokenizer.pad_token is not None


@pytest.fixture
def remote_dir(tiny_dir):
    """fsspec's in-memory store stands in for s3://: any non-local protocol takes the same path."""
    memory = fsspec.filesystem("memory")
    memory.put(tiny_dir + "/", "/vila-hd/tiny/", recursive=True)
    yield "memory://vila-hd/tiny"
    memory.rm("/vila-hd", recursive=True)


def test_a_remote_directory_is_checked_in_place_and_loaded_from_a_local_copy(remote_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PS3_CACHE", str(tmp_path / "cache"))
    assert check_llm_dir(remote_dir) == []
    llm = load_llm(remote_dir)
    assert llm.image_token_id == 3 and list((tmp_path / "cache").rglob("model.safetensors"))


def test_chat_template_renders_turns_and_the_generation_prompt(loaded):
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\nwhat colour is the sign?"},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the text?"}]
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<image>\nwhat colour is the sign?<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nand the text?<|im_end|>\n<|im_start|>assistant\n")
    closed = loaded.tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert closed.endswith("red<|im_end|>\n")


def test_image_token_is_exactly_one_id(loaded):
    tokenizer, image_id = loaded.tokenizer, loaded.image_token_id
    assert tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) == [image_id]
    ids = tokenizer.encode(f"the sign{IMAGE_TOKEN}is red", add_special_tokens=False)
    assert ids.count(image_id) == 1 and tokenizer.decode(ids) == f"the sign{IMAGE_TOKEN}is red"


def test_same_texts_and_seed_give_the_same_checkpoint(tiny_dir, tmp_path):
    again = build_tiny_llm(str(tmp_path / "again"), TEXTS)
    other = build_tiny_llm(str(tmp_path / "other"), TEXTS, seed=1)
    first = load_file(f"{tiny_dir}/model.safetensors")
    second = load_file(f"{again}/model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert Path(f"{tiny_dir}/tokenizer.json").read_text() == Path(f"{again}/tokenizer.json").read_text()
    third = load_file(f"{other}/model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])


def test_a_missing_image_token_is_added_and_the_embeddings_grow(tmp_path):
    """A tokenizer without <image> (its slot renamed) and no spare embedding rows."""
    path = Path(build_tiny_llm(str(tmp_path / "tiny"), TEXTS, vocab_size=64))
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["model"]["vocab"]["<|vision_pad|>"] = spec["model"]["vocab"].pop(IMAGE_TOKEN)
    for token in spec["added_tokens"]:
        token["content"] = "<|vision_pad|>" if token["content"] == IMAGE_TOKEN else token["content"]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    rows = load_file(f"{path}/model.safetensors")["model.embed_tokens.weight"].shape[0]
    llm = load_llm(str(path))
    assert llm.image_token_id == rows and llm.tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) == [rows]
    assert llm.model.get_input_embeddings().num_embeddings == rows + 1


def _no_chat_template(path: Path) -> None:
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _llama(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _no_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").unlink()


@pytest.mark.parametrize("breaks, says", [(_llama, "'llama' is not supported (supported: qwen2)"),
                                          (_no_chat_template, "no chat template"),
                                          (_no_tokenizer, "no tokenizer files")])
def test_cheap_problems_are_one_line_naming_the_path(copy_of, breaks, says):
    path = copy_of()
    breaks(path)
    problems = check_llm_dir(str(path))
    assert len(problems) == 1 and says in problems[0] and str(path) in problems[0] and "\n" not in problems[0]
    with pytest.raises(LLMError) as error:
        load_llm(str(path))
    assert str(error.value) == problems[0]


def test_a_missing_directory_is_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(LLMError, match="not found") as error:
        load_llm(missing)
    assert missing in str(error.value) and "\n" not in str(error.value)
    assert check_llm_dir(missing) == [str(error.value)]


def _garbage_weights(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"not a safetensors file")


def _missing_tensor(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("breaks, says", [(_garbage_weights, "cannot load the LLM weights"),
                                          (_missing_tensor, "lack 1 tensors (first: model.layers.1.mlp.up_proj")])
def test_unreadable_weights_are_one_line_naming_the_path(copy_of, breaks, says):
    path = copy_of()
    breaks(path)
    assert check_llm_dir(str(path)) == []  # only loading can tell
    with pytest.raises(LLMError) as error:
        load_llm(str(path))
    assert says in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
