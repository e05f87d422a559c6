"""A trained VILA-HD model as one self-describing directory, and back.

The layout is VILA's saved model (`shared/reference/vila_hd_reference.md` section 3), so a
finished stage hands the next one, or a serving job, a directory it can read without our
runtime checkpoint format:

    config.json      model_type "vila_hd", format_version, architectures, image_token_id,
                     newline_token_id, and llm_cfg / vision_tower_cfg / mm_projector_cfg,
                     each naming its sub-directory ("path"); vision_tower_cfg carries the PS3
                     preset name and every preset field, mm_projector_cfg the projector's widths
    llm/             transformers save_pretrained of the causal LM (safetensors) + tokenizer:
                     `ps3.vila_hd.llm.load_llm` reads it as any Qwen2 checkpoint
    vision_tower/    config.json: the released PS3 vision-only config (`model_type`
                     "ps3_vision_model") plus our preset; model.safetensors: the released
                     `vision_model.*` names
    mm_projector/    config.json (the widths) and model.safetensors

The top config.json is removed first and written last, as VILA's "finished" marker is: an
export that dies half-way leaves a directory that `load_vila_hd` and `is_vila_hd_export`
reject, never one that loads with some parts old and some new. Remote URIs (s3://) are
written to a local staging directory and uploaded part by part, config.json last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ps3.curation.models import WeightsError
from ps3.curation.models.weights import local_weights
from ps3.data.fs import filesystem, join
from ps3.model.checkpoint_io import check_state_dict, read_tensors, write_tensors
from ps3.model.errors import CheckpointError
from ps3.model.presets import PS3Preset
from ps3.model.vision import PS3VisionEncoder
from ps3.model.weights import ps3_config_from_preset

from .llm import IMAGE_TOKEN, LLMError, check_llm_dir, load_llm
from .model import VilaHD
from .projector import PROMPT_HEADS, MMProjector

__all__ = ["FORMAT_VERSION", "MODEL_TYPE", "ExportError", "export_vila_hd", "is_vila_hd_export", "load_vila_hd"]

MODEL_TYPE = "vila_hd"
#: Bumped when a change would make older code misread an export; loading refuses newer ones.
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LLM_DIR, VISION_DIR, PROJECTOR_DIR = "llm", "vision_tower", "mm_projector"
#: The released PS3VisionModel wraps the encoder as `.vision_model`; its files use that prefix.
VISION_PREFIX = "vision_model."


class ExportError(ValueError):
    """An export that cannot be written or loaded; the message is one line naming the path."""


# ---- writing ---------------------------------------------------------------------------
def export_vila_hd(model: VilaHD, tokenizer, uri: str) -> None:
    """Write `model` (unsharded, any device) and its tokenizer to the directory `uri`.

    Files of an earlier export at `uri` are replaced; other files there are left alone.
    Raises `ExportError` when the tokenizer does not match the model or the written LLM
    directory would not load.
    """
    _check_tokenizer(model, tokenizer, uri)
    local = _local_path(uri)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        _forget_local(local)
        config = _write_parts(model, tokenizer, local, uri)
        _publish_local(local, config)
        return
    with tempfile.TemporaryDirectory(prefix="vila-hd-export.") as staging:
        config = _write_parts(model, tokenizer, Path(staging), uri)
        (Path(staging) / CONFIG).write_text(json.dumps(config, indent=2))
        _upload(Path(staging), uri)


def _check_tokenizer(model: VilaHD, tokenizer, uri: str) -> None:
    """An export whose tokenizer encodes `<image>` to another id would splice image tokens
    at the wrong places after loading; refuse it before writing anything."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id != model.image_token_id:
        raise ExportError(f"cannot export to {uri}: the tokenizer encodes {IMAGE_TOKEN} as {token_id}, the model "
                          f"expects {model.image_token_id}; pass the tokenizer the model was built with")


def _local_path(uri: str) -> Path | None:
    """The local directory `uri` names, or None for a remote store."""
    if "://" not in uri:
        return Path(uri)
    if uri.startswith("file://"):
        return Path(filesystem(uri)[1])
    return None


def _forget_local(root: Path) -> None:
    """Remove an earlier export's marker first, then its parts, so no crash can pair them."""
    (root / CONFIG).unlink(missing_ok=True)
    for name in (LLM_DIR, VISION_DIR, PROJECTOR_DIR):
        shutil.rmtree(root / name, ignore_errors=True)


def _write_parts(model: VilaHD, tokenizer, root: Path, uri: str) -> dict[str, Any]:
    """Write the three sub-directories under `root`; return the top config to publish."""
    _write_llm(model.llm, tokenizer, root / LLM_DIR, uri)
    _write_vision(model.vision_tower, root / VISION_DIR)
    projector = projector_config(model)
    _write_json(root / PROJECTOR_DIR / CONFIG, {"architectures": ["MMProjector"], **projector})
    write_tensors(str(root / PROJECTOR_DIR / WEIGHTS), model.mm_projector.state_dict())
    preset = model.vision_tower.preset
    return {
        "model_type": MODEL_TYPE, "architectures": ["VilaHD"], "format_version": FORMAT_VERSION,
        "image_token_id": model.image_token_id, "newline_token_id": model.newline_token_id,
        "llm_cfg": {"path": LLM_DIR, "model_type": model.llm.config.model_type},
        "vision_tower_cfg": {"path": VISION_DIR, "preset": preset.name, "preset_fields": preset.to_dict()},
        "mm_projector_cfg": {"path": PROJECTOR_DIR, **projector},
    }


def _write_llm(llm: nn.Module, tokenizer, directory: Path, uri: str) -> None:
    """save_pretrained of both, then the checks `load_llm` makes, so a bad tokenizer (no chat
    template, say) fails the export rather than the next stage."""
    llm.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    problems = check_llm_dir(str(directory))
    if problems:
        raise ExportError(f"cannot export to {uri}: the LLM would not load: {problems[0]}")


def _write_vision(vision: PS3VisionEncoder, directory: Path) -> None:
    """The released vision-only layout: the flat vision config and `vision_model.*` tensors,
    plus our full preset so custom (tiny) towers rebuild exactly."""
    released = ps3_config_from_preset(vision.preset)
    _write_json(directory / CONFIG, {**released["vision_config"], "ps3_platform_preset": vision.preset.to_dict()})
    write_tensors(str(directory / WEIGHTS), {VISION_PREFIX + k: v for k, v in vision.state_dict().items()})


def projector_config(model: VilaHD) -> dict[str, Any]:
    """The fields that fix the projector's shapes (all derivable; recorded so a reader of the
    config needs neither the preset arithmetic nor the LLM's config)."""
    p = model.vision_tower.preset
    return {"vision_width": p.width, "llm_width": model.llm.config.hidden_size, "low_grid": p.grids[0],
            "num_scales": len(p.scales), "prompt_head": _prompt_head_kind(model.mm_projector)}


def _prompt_head_kind(projector: MMProjector) -> str:
    return "linear" if isinstance(projector.top_down_prompt_head, nn.Linear) else "mlp"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _publish_local(root: Path, config: dict[str, Any]) -> None:
    """Rename into place, so even the marker itself is never seen half-written."""
    partial = root / f".{CONFIG}.partial"
    partial.write_text(json.dumps(config, indent=2))
    os.replace(partial, root / CONFIG)


def _upload(staging: Path, uri: str) -> None:
    """Replace an earlier export at `uri` part by part: its marker goes first, ours comes last."""
    fs, path = filesystem(uri)
    if fs.exists(join(path, CONFIG)):
        fs.rm(join(path, CONFIG))
    for name in (LLM_DIR, VISION_DIR, PROJECTOR_DIR):
        if fs.exists(join(path, name)):
            fs.rm(join(path, name), recursive=True)
        fs.put(str(staging / name) + "/", join(path, name) + "/", recursive=True)
    fs.put_file(str(staging / CONFIG), join(path, CONFIG))


# ---- reading ---------------------------------------------------------------------------
def is_vila_hd_export(uri: str) -> bool:
    """Whether `uri` holds a finished export (a config.json of model_type "vila_hd").

    Cheap, and never raises: it tells an export from a runtime checkpoint directory.
    """
    try:
        fs, path = filesystem(uri)
        with fs.open(join(path, CONFIG), "r") as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except Exception:  # missing, unreadable, not JSON, not a dict: not an export either way
        return False


def load_vila_hd(uri: str) -> tuple[VilaHD, Any]:
    """The model (on CPU, in eval mode) and tokenizer exported at `uri`.

    Every tensor must match by name and shape (missing or unexpected ones are errors);
    vision tower and projector take the dtype they were saved in. Raises `ExportError`.
    """
    config = _read_config(uri)
    dirs = {key: _subdir(uri, config, key) for key in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")}
    vision = PS3VisionEncoder(_preset(uri, config))
    _load_strict(vision, join(dirs["vision_tower_cfg"], WEIGHTS), prefix=VISION_PREFIX)
    llm, tokenizer = _load_llm(dirs["llm_cfg"], config)
    model = VilaHD(vision, llm, image_token_id=config["image_token_id"], newline_token_id=config["newline_token_id"],
                   prompt_head=_prompt_head(uri, config))
    _check_projector(uri, config, model)
    _load_strict(model.mm_projector, join(dirs["mm_projector_cfg"], WEIGHTS))
    return model.eval(), tokenizer


def _read_config(uri: str) -> dict[str, Any]:
    """The top config, after the checks that tell the usual wrong directories apart."""
    try:
        fs, path = filesystem(uri)
        if not fs.isdir(path):
            raise ExportError(f"VILA-HD export not found: {uri} (no such directory)")
        if not fs.exists(join(path, CONFIG)):
            raise ExportError(f"{uri}: no config.json, so not a finished VILA-HD export "
                              "(it is written last; an interrupted export has none)")
        with fs.open(join(path, CONFIG), "r") as f:
            config = json.load(f)
    except ExportError:
        raise
    except Exception as exc:  # malformed JSON or a store's own errors
        raise ExportError(f"cannot read the VILA-HD export {uri}: {_first_line(exc)}") from exc
    _check_config(uri, config)
    return config


def _check_config(uri: str, config: Any) -> None:
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPE:
        raise ExportError(f"{join(uri, CONFIG)}: model_type {model_type!r} is not {MODEL_TYPE!r}; "
                          f"{_other_model_hint(model_type)}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{join(uri, CONFIG)}: format_version {version!r} is not one this code reads "
                          f"(<= {FORMAT_VERSION}); load it with the ps3-platform version that wrote it")
    needed = ("image_token_id", "newline_token_id", "llm_cfg", "vision_tower_cfg", "mm_projector_cfg")
    missing = [key for key in needed if key not in config]
    if missing:
        raise ExportError(f"{join(uri, CONFIG)}: missing fields {', '.join(missing)}; the export is damaged")


def _other_model_hint(model_type: Any) -> str:
    if model_type == "ps3":
        return "this is a PS3 checkpoint: load it with ps3.model.load_ps3_checkpoint"
    if model_type == "qwen2":
        return "this is an LLM directory: load it with ps3.vila_hd.llm.load_llm"
    return "give the directory export_vila_hd wrote"


def _subdir(uri: str, config: dict[str, Any], key: str) -> str:
    name = config[key].get("path") if isinstance(config[key], dict) else None
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ExportError(f"{join(uri, CONFIG)}: {key}.path {name!r} is not a sub-directory name")
    child = join(uri, name)
    try:
        fs, path = filesystem(child)
        found = fs.isdir(path)
    except Exception as exc:
        raise ExportError(f"cannot read {child}: {_first_line(exc)}") from exc
    if not found:
        raise ExportError(f"{uri}: missing sub-directory {name}/; the export is incomplete")
    return child


def _preset(uri: str, config: dict[str, Any]) -> PS3Preset:
    fields = config["vision_tower_cfg"].get("preset_fields")
    try:
        return PS3Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (AttributeError, TypeError, ValueError) as exc:  # not a dict, unknown field, failed check
        raise ExportError(f"{join(uri, CONFIG)}: vision_tower_cfg.preset_fields do not make a PS3 preset: "
                          f"{_first_line(exc)}") from exc


def _prompt_head(uri: str, config: dict[str, Any]) -> str:
    kind = config["mm_projector_cfg"].get("prompt_head")
    if kind not in PROMPT_HEADS:
        raise ExportError(f"{join(uri, CONFIG)}: mm_projector_cfg.prompt_head {kind!r} is not one of {PROMPT_HEADS}")
    return kind


def _load_llm(directory: str, config: dict[str, Any]):
    """`load_llm`, plus the strictness it lacks: transformers only warns about tensors the
    model has no place for, and a tokenizer whose image id moved would splice wrongly."""
    try:
        loaded = load_llm(directory)
    except LLMError as exc:
        raise ExportError(str(exc)) from exc
    _check_llm_tensors(directory, loaded.model)
    if loaded.image_token_id != config["image_token_id"]:
        raise ExportError(f"{directory}: the tokenizer encodes {IMAGE_TOKEN} as {loaded.image_token_id}, "
                          f"config.json says {config['image_token_id']}; the export mixes parts of two models")
    return loaded.model, loaded.tokenizer


def _check_llm_tensors(directory: str, llm: nn.Module) -> None:
    """Tensor names in the LLM's files the model does not have (missing ones `load_llm` reports)."""
    try:
        local = local_weights(directory)  # already copied by load_llm: no second download
    except WeightsError as exc:
        raise ExportError(str(exc)) from exc
    expected = set(llm.state_dict())
    unexpected = []
    for file in sorted(local.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            unexpected += [k for k in f.keys() if k not in expected]  # noqa: SIM118 (safe_open is no mapping)
    if unexpected:
        raise ExportError(f"{directory} does not match the model: {len(unexpected)} unexpected tensors "
                          f"(first: {min(unexpected)})")


def _check_projector(uri: str, config: dict[str, Any], model: VilaHD) -> None:
    """The recorded widths against the ones the parts give: a disagreement means parts of two
    exports were mixed, which the tensor shapes alone might not show (the prompt head kind)."""
    recorded = {k: v for k, v in config["mm_projector_cfg"].items() if k != "path"}
    actual = projector_config(model)
    if recorded != actual:
        raise ExportError(f"{join(uri, CONFIG)}: mm_projector_cfg {recorded} does not match the vision tower and "
                          f"LLM, which give {actual}")


def _load_strict(module: nn.Module, file: str, prefix: str = "") -> None:
    """Compared under the file's names (`prefix` + ours), so a tensor without the prefix is
    reported as unexpected rather than quietly matched."""
    expected = {prefix + k: v for k, v in module.state_dict().items()}
    try:
        tensors = read_tensors(file)
        check_state_dict(file, tensors, expected)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    _match_dtype(module, tensors)
    module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True)


def _match_dtype(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Cast to the saved floating dtype, so a bf16 export reloads as bf16, not silently fp32."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        module.to(dtypes.pop())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
