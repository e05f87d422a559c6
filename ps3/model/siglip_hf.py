"""Initialise a PS3 model from a SigLIP checkpoint in the Hugging Face ``SiglipModel`` layout.

The paper starts both towers from pre-trained SigLIP; only the PS3-only modules (selection
projection, prior prompt, ConvNeXt branch, scale residual positions, prompt heads) keep
their fresh initialisation. Every tensor of the file must land somewhere, and every other
parameter of ours must be covered: anything else is a ``CheckpointError`` listing names.
transformers is not needed: the files are read directly.
"""

from __future__ import annotations

import torch

from ps3.model.checkpoint_io import check_state_dict, join, read_json, read_tensors
from ps3.model.errors import CheckpointError
from ps3.model.model import PS3Model
from ps3.model.presets import PS3Preset

__all__ = ["load_siglip_hf", "siglip_hf_to_ps3", "PS3_ONLY_PREFIXES"]

PS3_ONLY_PREFIXES = (
    "vision_model.selection_feature_proj.", "vision_model.prior_prompt", "vision_model.pos_emb_residual.",
    "vision_model.highres_selection_feature_module.", "vision_model.prompt_proj_for_highres.",
    "text_model.prompt_proj.",
)
"""Our parameters that SigLIP does not have (kept at their initialisation)."""

_BLOCK = {  # per-layer renames (HF -> ours), q/k/v handled separately
    "vision": {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    "text": {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"},
}
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh"}


class _Taker:
    """Reads HF tensors by name, remembering what was used and what was absent."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.used, self.absent = tensors, set(), []

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            self.absent.append(name)
            return torch.empty(0)
        self.used.add(name)
        return self.tensors[name]


def _blocks(take: _Taker, out: dict, tower: str, depth: int, ours: str) -> None:
    """Map one tower's transformer layers; q/k/v are packed into one projection."""
    for i in range(depth):
        hf = f"{tower}_model.encoder.layers.{i}."
        for old, new in _BLOCK[tower].items():
            for leaf in ("weight", "bias"):
                out[f"{ours}.{i}.{new}.{leaf}"] = take(f"{hf}{old}.{leaf}")
        for leaf in ("weight", "bias"):
            packed = torch.cat([take(f"{hf}self_attn.{x}_proj.{leaf}") for x in "qkv"], dim=0)
            name = f"attn.qkv.{leaf}" if tower == "vision" else f"attn.in_proj_{leaf}"
            out[f"{ours}.{i}.{name}"] = packed


def _vision(take: _Taker, out: dict, depth: int, width: int) -> None:
    e, t, h = "vision_model.embeddings.", "vision_model.trunk.", "vision_model.head."
    out[t + "patch_embed.proj.weight"] = take(e + "patch_embedding.weight")
    out[t + "patch_embed.proj.bias"] = take(e + "patch_embedding.bias")
    out[t + "pos_embed"] = take(e + "position_embedding.weight")[None]  # [1, N, D]
    _blocks(take, out, "vision", depth, t + "blocks")
    for leaf in ("weight", "bias"):
        out[f"{t}norm.{leaf}"] = take(f"vision_model.post_layernorm.{leaf}")
        in_proj = take(f"{h}attention.in_proj_{leaf}")  # [3D(, D)]: q, then k and v
        out[f"{t}attn_pool.q.{leaf}"], out[f"{t}attn_pool.kv.{leaf}"] = in_proj[:width], in_proj[width:]
        out[f"{t}attn_pool.proj.{leaf}"] = take(f"{h}attention.out_proj.{leaf}")
        out[f"{t}attn_pool.norm.{leaf}"] = take(f"{h}layernorm.{leaf}")
        for fc in ("fc1", "fc2"):
            out[f"{t}attn_pool.mlp.{fc}.{leaf}"] = take(f"{h}mlp.{fc}.{leaf}")
    out[t + "attn_pool.latent"] = take(h + "probe")


def _text(take: _Taker, out: dict, depth: int) -> None:
    e, t = "text_model.embeddings.", "text_model."
    out[t + "token_embedding.weight"] = take(e + "token_embedding.weight")
    out[t + "positional_embedding"] = take(e + "position_embedding.weight")
    _blocks(take, out, "text", depth, t + "transformer.resblocks")
    for leaf in ("weight", "bias"):
        out[f"{t}ln_final.{leaf}"] = take(f"text_model.final_layer_norm.{leaf}")
        out[f"{t}text_projection.{leaf}"] = take(f"text_model.head.{leaf}")


def siglip_hf_to_ps3(tensors: dict[str, torch.Tensor], preset: PS3Preset, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename/pack an HF ``SiglipModel`` state dict into our names; every HF tensor must be used."""
    take = _Taker(tensors)
    out: dict[str, torch.Tensor] = {}
    _vision(take, out, preset.depth, preset.width)
    _text(take, out, preset.text_depth)
    out["logit_scale"] = take("logit_scale").reshape(-1)  # [1]
    out["logit_bias"] = take("logit_bias").reshape(-1)
    extra = [k for k in tensors if k not in take.used and not k.endswith("position_ids")]
    if take.absent or extra:
        raise CheckpointError(f"{source} is not a SiglipModel matching preset {preset.name}: "
                              f"missing {sorted(take.absent)[:12]}, unexpected {sorted(extra)[:12]}")
    return out


def _check_config(cfg: dict, preset: PS3Preset, source: str, allow_gelu_mismatch: bool) -> None:
    """Compare what shapes cannot show (heads, activations) and give one clear line per mismatch."""
    if cfg.get("model_type") != "siglip":
        raise CheckpointError(f"{source} is a {cfg.get('model_type')!r} checkpoint; load_siglip_hf expects model_type 'siglip'"
                              " (use load_ps3_checkpoint for PS3 checkpoints)")
    v, t = cfg.get("vision_config", {}), cfg.get("text_config", {})
    pairs = [("vision heads", v.get("num_attention_heads", 12), preset.heads),
             ("vision depth", v.get("num_hidden_layers", 12), preset.depth),
             ("patch size", v.get("patch_size", 16), preset.patch_size),
             ("text heads", t.get("num_attention_heads", 12), preset.text_heads),
             ("text depth", t.get("num_hidden_layers", 12), preset.text_depth),
             ("vision GELU", _GELU.get(v.get("hidden_act", "gelu_pytorch_tanh")), preset.gelu_approximate),
             ("text GELU", _GELU.get(t.get("hidden_act", "gelu_pytorch_tanh")), preset.text_gelu_approximate)]
    bad = [f"{name}: checkpoint {a} vs preset {b}" for name, a, b in pairs
           if a != b and not (allow_gelu_mismatch and "GELU" in name)]
    if bad:
        fields = "gelu_approximate / text_gelu_approximate" if all("GELU" in x for x in bad) else "the preset"
        raise CheckpointError(f"{source} does not fit preset {preset.name} ({'; '.join(bad)}); adjust {fields}")


def load_siglip_hf(model: PS3Model, path_or_uri: str, *, allow_gelu_mismatch: bool = False) -> PS3Model:
    """Load SigLIP weights (``config.json`` + ``model.safetensors``) into both towers, in place.

    HF SigLIP configs say tanh-GELU while the released PS3 trunk (timm) uses exact GELU
    with the same weights. By default the preset's ``gelu_approximate`` fields must match
    the file (override them to ``"tanh"``); ``allow_gelu_mismatch=True`` keeps the preset's
    choice, as the released training did (the two differ by < 1e-3 per activation).
    """
    preset = model.preset
    _check_config(read_json(join(path_or_uri, "config.json")), preset, str(path_or_uri), allow_gelu_mismatch)
    ours = siglip_hf_to_ps3(read_tensors(join(path_or_uri, "model.safetensors")), preset, str(path_or_uri))
    expected = model.state_dict()
    ps3_only = {k for k in expected if k.startswith(PS3_ONLY_PREFIXES)}
    check_state_dict(str(path_or_uri), ours, expected, allowed_missing=ps3_only)
    model.load_state_dict(ours, strict=False)
    return model
