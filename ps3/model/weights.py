"""Released PS3 checkpoint layout in and out (``nvidia/PS3-1.5K-SigLIP``, ``nvidia/PS3-4K-SigLIP``).

A directory (local path or fsspec URI) with ``config.json`` (``model_type: ps3``,
``vision_config``, ``text_config``) and ``model.safetensors`` (``vision_model.*``,
``text_model.*``, ``logit_scale``, ``logit_bias``). Our parameter names *are* that layout,
so loading is a strict name/shape check plus a preset rebuilt from the config; exporting
writes the same files (plus our full preset under ``ps3_platform_preset`` so a round trip
is exact, and a ``preprocessor_config.json`` like the released one).
"""

from __future__ import annotations

import re
from typing import Any

from ps3.model.checkpoint_io import (
    check_state_dict,
    join,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from ps3.model.errors import CheckpointError
from ps3.model.model import PS3Model
from ps3.model.presets import PresetError, PS3Preset, scale_budgets

__all__ = ["load_ps3_checkpoint", "export_ps3_checkpoint", "preset_from_ps3_config", "ps3_config_from_preset"]

# timm trunk names the released configs use -> our trunk fields.
_TRUNKS = {
    "vit_so400m_patch14_siglip_384": dict(patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304),
    "vit_so400m_patch14_siglip_378": dict(patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304),
}
# timm's ViT sizes (vision_transformer.py model defs): width, depth, heads, MLP width.
_TIMM_VIT_SIZES = {
    "tiny": (192, 12, 3, 768), "small": (384, 12, 6, 1536), "medium": (512, 12, 8, 2048),
    "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096), "huge": (1280, 32, 16, 5120),
    "giant": (1408, 40, 16, 6144), "gigantic": (1664, 48, 16, 8192), "so400m": (1152, 27, 16, 4304),
    "giantopt": (1536, 40, 16, 6144),
}
_TIMM_VIT = re.compile(r"vit_(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)(_\w+)?")
# Hugging Face ViT config fields -> ours, for trunks a config spells out.
_HF_TRUNK_FIELDS = {"patch_size": "patch_size", "hidden_size": "width", "num_hidden_layers": "depth",
                    "num_attention_heads": "heads", "intermediate_size": "mlp_dim"}
_SEL_DEFAULTS = dict(hidden_dim=512, out_dim=512, depth=3, kernel_size=28)
_PRESET_KEY = "ps3_platform_preset"
_SCALARS = ("logit_scale", "logit_bias")


def _trunk_fields(v: dict[str, Any], source: str) -> dict[str, Any]:
    """Trunk shape from our explicit fields (exports of custom trunks), the released timm names,
    any timm ViT name (size + patch: what the released loader hands `timm.create_model`), or
    else the config's own HF-style fields, in that order."""
    name = v.get("model_name")
    # Our exports of custom trunks carry them under their own key: the released config
    # class owns ``patch_size`` (always 14) and would overwrite a top-level one.
    explicit = v.get("trunk_config")
    if isinstance(explicit, dict) and set(explicit) == {"patch_size", "width", "depth", "heads", "mlp_dim"}:
        return dict(explicit)
    if name in _TRUNKS:
        return dict(_TRUNKS[name])
    parsed = _TIMM_VIT.fullmatch(str(name))
    if parsed is None or parsed["size"] not in _TIMM_VIT_SIZES:
        if all(isinstance(v.get(k), int) for k in _HF_TRUNK_FIELDS):
            return {ours: v[hf] for hf, ours in _HF_TRUNK_FIELDS.items()}
        raise CheckpointError(f"{source}: vision trunk {name!r} is not a timm ViT named by size and patch "
                              f"(vit_<{'|'.join(_TIMM_VIT_SIZES)}>_patch<N>_...), and its config does not give "
                              f"{', '.join(_HF_TRUNK_FIELDS)}")
    width, depth, heads, mlp_dim = _TIMM_VIT_SIZES[parsed["size"]]
    if v.get("hidden_size", width) != width:
        raise CheckpointError(f"{source}: hidden_size {v['hidden_size']} disagrees with the {width} wide trunk "
                              f"{name!r} names")
    return dict(patch_size=int(parsed["patch"]), width=width, depth=depth, heads=heads, mlp_dim=mlp_dim)


def _text_fields(t: dict[str, Any], source: str) -> dict[str, Any]:
    if t.get("pool_type", "last") != "last" or not t.get("no_causal_mask", True):
        raise CheckpointError(f"{source}: text tower must pool the last token without a causal mask "
                              f"(got pool_type={t.get('pool_type')!r}, no_causal_mask={t.get('no_causal_mask')!r})")
    width = t["width"]
    return dict(
        text_vocab_size=t["vocab_size"], text_context_length=t["context_length"], text_width=width,
        text_depth=t["layers"], text_heads=t["heads"],
        # open_clip computes int(width * ratio); round() also survives our exported float ratios.
        text_mlp_dim=t.get("mlp_dim", round(width * t.get("mlp_ratio", 4.0))),
        text_gelu_approximate=t.get("act_kwargs", {}).get("approximate", "none"),
        embed_dim=t.get("output_dim", width),
    )


def preset_from_ps3_config(cfg: dict[str, Any], source: str = "config.json") -> PS3Preset:
    """Rebuild the architecture from a released-layout ``config.json`` dict."""
    if cfg.get("model_type") != "ps3" or "vision_config" not in cfg or "text_config" not in cfg:
        raise CheckpointError(f"{source} is not a PS3 checkpoint (model_type {cfg.get('model_type')!r}; expected 'ps3' with "
                              "vision_config and text_config; use load_siglip_hf for SigLIP, vision-only exports are not supported)")
    if _PRESET_KEY in cfg:
        return PS3Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg[_PRESET_KEY].items()})
    v = cfg["vision_config"]
    if not v.get("highres_selection_feature", True) or v.get("pool", "map") != "map":
        raise CheckpointError(f"{source}: only checkpoints with the ConvNeXt selection branch and MAP pooling are supported")
    scales = tuple(sorted(v["ps3_scales"]))
    explicit = v.get("max_select_num_each_scale")
    if explicit is not None and tuple(explicit) != scale_budgets(scales, v["max_select_num"]):
        raise CheckpointError(f"{source}: custom max_select_num_each_scale {explicit} is not supported (budgets are derived)")
    sel = {k: v.get(f"highres_selection_module_{k}", d) for k, d in _SEL_DEFAULTS.items()}
    try:
        return _released_preset(cfg, v, scales, sel, source)
    except PresetError as exc:  # fields that do not fit together (scales vs patch, layers vs depth)
        raise CheckpointError(f"{source}: {exc}") from None


def _released_preset(cfg: dict[str, Any], v: dict[str, Any], scales: tuple, sel: dict, source: str) -> PS3Preset:
    return PS3Preset(
        name=cfg.get("_name_or_path") or "ps3-checkpoint", scales=scales, select_layers=tuple(v["select_based_on_layer"]),
        max_select_num=v.get("max_select_num", 1280),  # PS3VisionConfig's default
        separate_pos_emb=v.get("separate_pos_emb", True),
        # The released branch always sees a 1512 view and uses head 0 for every scale.
        selection_view_size=v.get("selection_view_size", 1512),
        share_first_selection_head=v.get("share_first_selection_head", True),
        ln_eps=cfg["text_config"].get("norm_kwargs", {}).get("eps", 1e-6),
        sel_hidden_dim=sel["hidden_dim"], sel_out_dim=sel["out_dim"], sel_depth=sel["depth"], sel_kernel_size=sel["kernel_size"],
        **_trunk_fields(v, source), **_text_fields(cfg["text_config"], source),
    )


def ps3_config_from_preset(p: PS3Preset) -> dict[str, Any]:
    """The released ``config.json`` layout for a preset (with explicit trunk fields added)."""
    trunk = dict(patch_size=p.patch_size, width=p.width, depth=p.depth, heads=p.heads, mlp_dim=p.mlp_dim)
    model_name = next((n for n, f in _TRUNKS.items() if f == trunk), "ps3_custom_vit")
    vision = dict(
        architectures=["PS3VisionModel"], model_type="ps3_vision_model", model_name=model_name, hidden_size=p.width,
        pool="map", ps3=True, ps3_scales=list(p.scales), select_based_on_layer=list(p.select_layers), min_select_num=1,
        max_select_num=p.max_select_num, separate_pos_emb=p.separate_pos_emb, highres_selection_feature=True,
        highres_selection_module_hidden_dim=p.sel_hidden_dim, highres_selection_module_out_dim=p.sel_out_dim,
        highres_selection_module_depth=p.sel_depth, highres_selection_module_kernel_size=p.sel_kernel_size,
        trunk_config=trunk, selection_view_size=p.selection_view_size, share_first_selection_head=p.share_first_selection_head,
        img_size=p.scales[0],  # the released loader sizes timm's pos_embed table from this
    )
    text = dict(
        architectures=["PS3TextModel"], model_type="ps3_text_model", context_length=p.text_context_length,
        vocab_size=p.text_vocab_size, width=p.text_width, heads=p.text_heads, layers=p.text_depth,
        mlp_ratio=p.text_mlp_dim / p.text_width, mlp_dim=p.text_mlp_dim, no_causal_mask=True, proj_bias=True,
        pool_type="last", norm_kwargs={"eps": p.ln_eps}, output_dim=p.embed_dim, prompt_proj_dim=p.width,
    )
    if p.text_gelu_approximate != "none":
        text["act_kwargs"] = {"approximate": p.text_gelu_approximate}
    return {"architectures": ["PS3Model"], "model_type": "ps3", "vision_config": vision, "text_config": text,
            _PRESET_KEY: p.to_dict()}


def load_ps3_checkpoint(path_or_uri: str, **overrides: Any) -> PS3Model:
    """Build a ``PS3Model`` from a released-layout directory; every tensor must match by name and shape.

    ``overrides`` change non-shape preset fields (e.g. ``max_select_num`` for inference).
    """
    source = str(path_or_uri)
    preset = preset_from_ps3_config(read_json(join(source, "config.json")), source)
    model = PS3Model(preset.replace(**overrides) if overrides else preset)
    tensors = read_tensors(join(source, "model.safetensors"))
    for key in _SCALARS:  # released layout: scalars; ours: [1] (FSDP2 cannot shard scalars)
        if key in tensors and tensors[key].dim() == 0:
            tensors[key] = tensors[key].reshape(1)
    expected = model.state_dict()
    # Older exports may lack the loss temperature/bias; they then keep their init values.
    check_state_dict(source, tensors, expected, allowed_missing={"logit_scale", "logit_bias"})
    model.load_state_dict(tensors, strict=False)
    return model


def export_ps3_checkpoint(model: PS3Model, path_or_uri: str) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` in the released layout."""
    p = model.preset
    write_json(join(path_or_uri, "config.json"), ps3_config_from_preset(p))
    state = model.state_dict()
    write_tensors(join(path_or_uri, "model.safetensors"), {k: v.reshape(()) if k in _SCALARS else v for k, v in state.items()})
    write_json(join(path_or_uri, "preprocessor_config.json"), {
        "image_size": [p.scales[-1], p.scales[-1]], "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bicubic", "resize_mode": "squash",
    })
