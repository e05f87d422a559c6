"""PS3 model: presets, the three-stage vision encoder, the text tower, tokenizers, weights I/O.

Public API (what ``ps3.tasks`` should call)::

    get_preset(name, **overrides) -> PS3Preset      # names: list_presets()
    PS3Model(preset_or_name, **overrides)
        .forward_pretrain(batch) -> PretrainOutput    # also model(batch)
        .encode_text(tokens, normalize=True) -> [B, E]
        .text_prompt(tokens) -> [B, D]                # top-down selection prompt
        .encode_image(pixel_values, prompt=None, num_look_close=1, num_token_look_close=None,
                      scale_budgets=None) -> PS3ImageOutput
        .set_grad_checkpointing(True, every=1); .blocks()  # every=2: every other block; FSDP2 units
    clamp_logit_scale_(model)                         # after each optimizer step
    build_tokenizer(path_or_uri, context_length=..., clean="canonicalize") -> Tokenizer
    train_tiny_tokenizer(captions, path, vocab_size=..., context_length=...) -> Tokenizer
    load_siglip_hf(model, path_or_uri, allow_gelu_mismatch=False)  # both towers from HF SiglipModel files
    load_ps3_checkpoint(path_or_uri) -> PS3Model     # released PS3 layout (config.json + model.safetensors)
    export_ps3_checkpoint(model, path_or_uri)

Pre-training batch (the contract with ``ps3.data``), B samples, per high-res scale s:
``lowres`` [B,3,S0,S0]; ``selection_view`` [B,3,Ssel,Ssel]; either ``highres`` (list of
[B,3,S_s,S_s]) or ``hr_index`` (list of long [B,K_s]) + ``hr_patches`` (list of
[B,K_s,3,p,p]); ``gt_maps`` (list of [B,G_s,G_s] in {0,1}); ``tokens`` [B,L] long;
``is_global`` [B] bool. Extra keys (``sample_id``, ``source``) are ignored.

``PretrainOutput``: ``image_features`` / ``text_features`` [B,E] L2-normalised,
``logit_scale`` (= exp of the parameter) / ``logit_bias`` [1], ``topdown_probs`` and
``bottomup_probs`` (lists of [B,G_s,G_s] with gradient, for ``ps3.losses.box_supervision_loss``)
and ``hr_index`` (the encoded cells). Feed the first four to ``ps3.losses.sigmoid_loss``.

Numerics follow the released NVlabs/PS3 code (checked to 1e-5 by the opt-in
``tests/ps3/model/test_reference_parity.py``). Deliberate differences: images are
squash-resized to every scale (no aspect-preserving path), the teacher-forced override uses
each scale's own ground-truth map, and inference pools all selected tokens into ``pooled``.
"""

from ps3.model.errors import CheckpointError, PS3InputError
from ps3.model.forward import PretrainVisionOutput, PS3ImageOutput
from ps3.model.model import PretrainOutput, PS3Model, clamp_logit_scale_
from ps3.model.presets import (
    PresetError,
    PS3Preset,
    UnknownPresetError,
    get_preset,
    list_presets,
    register_preset,
)
from ps3.model.siglip_hf import load_siglip_hf
from ps3.model.tokenizer import (
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    canonicalize,
    train_tiny_tokenizer,
)
from ps3.model.vision import PS3VisionEncoder, resize_square
from ps3.model.weights import (
    export_ps3_checkpoint,
    load_ps3_checkpoint,
    preset_from_ps3_config,
)

__all__ = [
    "CheckpointError",
    "PS3InputError",
    "PresetError",
    "UnknownPresetError",
    "PS3Preset",
    "get_preset",
    "list_presets",
    "register_preset",
    "PS3Model",
    "PS3VisionEncoder",
    "PretrainOutput",
    "PretrainVisionOutput",
    "PS3ImageOutput",
    "clamp_logit_scale_",
    "resize_square",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "canonicalize",
    "train_tiny_tokenizer",
    "load_siglip_hf",
    "load_ps3_checkpoint",
    "export_ps3_checkpoint",
    "preset_from_ps3_config",
]
