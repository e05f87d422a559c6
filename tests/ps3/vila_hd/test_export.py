"""VILA-HD export: the VILA directory layout, exact round trips, and one-line errors."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from ps3.model import PS3VisionEncoder, get_preset
from ps3.vila_hd.export import (
    FORMAT_VERSION,
    ExportError,
    export_vila_hd,
    is_vila_hd_export,
    load_vila_hd,
)
from ps3.vila_hd.llm import build_tiny_llm, load_llm
from ps3.vila_hd.model import IGNORE, Selection, VilaHD


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llm")
    build_tiny_llm(str(directory), ["what shape is the red sign", "circle square triangle cross", "A B C D"])
    return load_llm(str(directory))


@pytest.fixture(scope="module")
def model(llm):
    """A tiny VilaHD whose zero-initialised tensors are not zero, so a part that failed to
    load (and kept its init) would show in the state dict and the logits."""
    torch.manual_seed(0)
    newline = llm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    vila = VilaHD(PS3VisionEncoder(get_preset("ps3-tiny")), llm.model, image_token_id=llm.image_token_id,
                  newline_token_id=newline, prompt_head="mlp")
    with torch.no_grad():
        proj = vila.mm_projector
        for p in [proj.high_res_pos_embed, *proj.high_res_scale_embed, *vila.vision_tower.pos_emb_residual]:
            p.normal_(std=0.1)
        for p in proj.top_down_prompt_head.parameters():
            p.normal_(std=0.5)
    return vila.eval()


@pytest.fixture(scope="module")
def exported(model, llm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "vila-hd"
    export_vila_hd(model, llm.tokenizer, str(directory))
    return directory


@pytest.fixture
def copy(exported, tmp_path):
    """A private copy of the export for tests that damage it."""
    return shutil.copytree(exported, tmp_path / "copy")


def _batch(llm):
    img = llm.image_token_id
    ids = torch.tensor([[5, img, 7, 8, 9, 10, 11, 0], [img, 6, 7, 8, 9, 10, 11, 12]])
    return dict(input_ids=ids, attention_mask=(ids != 0).long() | (torch.arange(8) < 7).long()[None],
                labels=torch.tensor([[IGNORE] * 5 + [10, 11, IGNORE], [IGNORE] * 6 + [11, 12]]),
                prompt_end=torch.tensor([3, 4]),
                images=torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                image_sizes=torch.tensor([[300, 200], [2000, 1500]]),
                boxes=torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]),
                has_box=torch.tensor([True, False]), grounding=torch.tensor([False, False]))


def _logits(model, llm):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(_batch(llm), Selection()).logits


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert different == []


def test_round_trip_gives_the_same_tensors_and_logits(model, llm, exported):
    loaded, tokenizer = load_vila_hd(str(exported))
    _assert_same_model(model, loaded)
    assert not loaded.training
    assert (loaded.image_token_id, loaded.newline_token_id) == (model.image_token_id, model.newline_token_id)
    assert loaded.vision_tower.preset == model.vision_tower.preset
    assert torch.equal(_logits(loaded, llm), _logits(model, llm))
    assert tokenizer("what <image>", add_special_tokens=False)["input_ids"] == \
        llm.tokenizer("what <image>", add_special_tokens=False)["input_ids"]


def test_layout_is_vilas_and_each_part_reads_on_its_own(model, llm, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "vila_hd" and config["format_version"] == FORMAT_VERSION
    assert config["architectures"] == ["VilaHD"]
    assert (config["image_token_id"], config["newline_token_id"]) == (model.image_token_id, model.newline_token_id)
    assert config["llm_cfg"]["path"] == "llm"
    vision_cfg = config["vision_tower_cfg"]
    assert vision_cfg["path"] == "vision_tower" and vision_cfg["preset"] == "ps3-tiny"
    assert vision_cfg["preset_fields"] == get_preset("ps3-tiny").to_dict()
    assert config["mm_projector_cfg"] == {"path": "mm_projector", "vision_width": 64, "llm_width": 64, "low_grid": 8,
                                          "num_scales": 3, "prompt_head": "mlp"}
    for part in ("vision_tower", "mm_projector"):
        assert sorted(p.name for p in (exported / part).iterdir()) == ["config.json", "model.safetensors"]
    vision = json.loads((exported / "vision_tower" / "config.json").read_text())
    assert vision["model_type"] == "ps3_vision_model" and vision["ps3_scales"] == [64, 128, 256]
    vision_tensors = load_file(exported / "vision_tower" / "model.safetensors")
    assert sorted(vision_tensors) == sorted("vision_model." + k for k in model.vision_tower.state_dict())
    assert sorted(load_file(exported / "mm_projector" / "model.safetensors")) == sorted(model.mm_projector.state_dict())
    again = load_llm(str(exported / "llm"))  # a plain Qwen2 checkpoint: the next stage's params.llm
    assert again.image_token_id == llm.image_token_id
    assert list((exported / "llm").glob("*.safetensors")) and (exported / "llm" / "tokenizer.json").exists()


def test_file_and_remote_uris_round_trip(model, llm, tmp_path, monkeypatch):
    monkeypatch.setenv("PS3_CACHE", str(tmp_path / "cache"))
    export_vila_hd(model, llm.tokenizer, f"file://{tmp_path}/local")
    _assert_same_model(model, load_vila_hd(f"file://{tmp_path}/local")[0])
    memory = fsspec.filesystem("memory")
    try:
        export_vila_hd(model, llm.tokenizer, "memory://exports/vila-hd")
        assert memory.exists("/exports/vila-hd/vision_tower/model.safetensors")
        assert is_vila_hd_export("memory://exports/vila-hd")
        _assert_same_model(model, load_vila_hd("memory://exports/vila-hd")[0])
    finally:
        memory.rm("/exports", recursive=True)


def test_is_vila_hd_export_tells_exports_from_other_directories(exported, tmp_path):
    assert is_vila_hd_export(str(exported)) and is_vila_hd_export(f"file://{exported}")
    runtime = tmp_path / "checkpoints" / "step-00000010"  # no config.json at the top
    runtime.mkdir(parents=True)
    (runtime / "model.pt").write_bytes(b"")
    assert not is_vila_hd_export(str(runtime))
    assert not is_vila_hd_export(str(exported / "llm"))  # a qwen2 config.json
    assert not is_vila_hd_export(str(tmp_path / "missing"))
    (runtime / "config.json").write_text("{not json")
    assert not is_vila_hd_export(str(runtime))


def test_a_crashed_re_export_leaves_nothing_that_loads(model, llm, copy, monkeypatch):
    from ps3.vila_hd import export

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_vision", crash)
    with pytest.raises(RuntimeError):
        export_vila_hd(model, llm.tokenizer, str(copy))
    assert not is_vila_hd_export(str(copy))
    with pytest.raises(ExportError, match="no config.json"):
        load_vila_hd(str(copy))


def test_export_refuses_a_tokenizer_of_another_model(model, llm, tmp_path):
    other = VilaHD(model.vision_tower, model.llm, image_token_id=llm.image_token_id + 1,
                   newline_token_id=model.newline_token_id)
    with pytest.raises(ExportError, match="the tokenizer encodes <image> as"):
        export_vila_hd(other, llm.tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _one_line_error(uri, match):
    with pytest.raises(ExportError, match=match) as info:
        load_vila_hd(uri)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_directory_or_config(copy, tmp_path):
    assert str(tmp_path / "nowhere") in _one_line_error(str(tmp_path / "nowhere"), "no such directory")
    (copy / "config.json").unlink()
    assert str(copy) in _one_line_error(str(copy), "no config.json")


@pytest.mark.parametrize("model_type, hint", [("ps3", "load_ps3_checkpoint"), ("qwen2", "load_llm"),
                                              (None, "export_vila_hd wrote")])
def test_a_config_of_another_model(copy, model_type, hint):
    (copy / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert hint in _one_line_error(str(copy), f"model_type {model_type!r} is not 'vila_hd'")


def test_a_newer_format_version_is_refused(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    _one_line_error(str(copy), "format_version")


@pytest.mark.parametrize("part", ["llm", "vision_tower", "mm_projector"])
def test_a_missing_sub_directory(copy, part):
    shutil.rmtree(copy / part)
    assert str(copy) in _one_line_error(str(copy), f"missing sub-directory {part}/")


@pytest.mark.parametrize("part", ["vision_tower", "mm_projector"])
def test_tensors_that_do_not_match(copy, part):
    file = copy / part / "model.safetensors"
    tensors = load_file(file)
    dropped = min(tensors)
    del tensors[dropped]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, file)
    message = _one_line_error(str(copy), "does not match the model")
    assert str(file) in message and "1 missing" in message and "1 unexpected" in message and dropped in message


def test_vision_tensors_without_the_released_prefix_do_not_load(copy):
    file = copy / "vision_tower" / "model.safetensors"
    save_file({k.removeprefix("vision_model."): v for k, v in load_file(file).items()}, file)
    _one_line_error(str(copy), "unexpected")


def test_a_misshaped_projector_tensor(copy):
    file = copy / "mm_projector" / "model.safetensors"
    tensors = load_file(file)
    tensors["high_res_pos_embed"] = tensors["high_res_pos_embed"][:, :3]
    save_file(tensors, file)
    _one_line_error(str(copy), "wrong shapes: high_res_pos_embed")


def test_unexpected_llm_tensors(copy):
    file = next((copy / "llm").glob("*.safetensors"))
    save_file({**load_file(file), "model.extra.weight": torch.zeros(2)}, file, metadata={"format": "pt"})
    assert "model.extra.weight" in _one_line_error(str(copy), "unexpected")


def test_missing_llm_tensors(copy):
    file = next((copy / "llm").glob("*.safetensors"))
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, file, metadata={"format": "pt"})
    assert str(copy / "llm") in _one_line_error(str(copy), "lack")


def test_a_projector_config_that_disagrees_with_the_parts(copy):
    config = json.loads((copy / "config.json").read_text())
    config["mm_projector_cfg"]["low_grid"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    _one_line_error(str(copy), "mm_projector_cfg")
