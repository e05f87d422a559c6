"""Qwen2-VL captions of salient regions and of whole images (PS3 paper, appendix A).

A local caption sees two images, the whole image first as context and then the crop, and
a prompt asking about the crop only; a global caption sees the whole image alone. Both
images go through Qwen2-VL's processor at `max_pixels = 256*28*28` (at most 256 merged
visual tokens each), as in the paper. Weights come from a local directory or a URI copied
by `local_weights`; nothing is downloaded from a hub.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from PIL import Image

from ps3.curation.config import GLOBAL_PROMPT, LOCAL_PROMPT
from ps3.curation.models import WeightsError
from ps3.curation.models.weights import file_digest, local_weights
from ps3.curation.types import Box, CaptionError, CaptionRequest

#: The paper's per-image pixel budget for Qwen2-VL.
MAX_PIXELS = 256 * 28 * 28
#: Qwen2-VL's own floor (4 merged tokens): small crops are upscaled to it, not rejected.
MIN_PIXELS = 4 * 28 * 28


class Qwen2VLCaptioner:
    """Greedy, batched captions; one model call per `caption()` call.

    Prompts are left-padded so every sequence in a batch ends where generation starts.
    """

    def __init__(self, model_uri: str, *, local_prompt: str = LOCAL_PROMPT, global_prompt: str = GLOBAL_PROMPT,
                 max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS, max_new_tokens: int = 96,
                 device: str = "auto", dtype: torch.dtype | None = None):
        import transformers

        path = local_weights(model_uri)
        if not (path / "config.json").is_file():
            raise WeightsError(f"not a model directory (no config.json): {model_uri}")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        self.model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.local_prompt, self.global_prompt = local_prompt, global_prompt
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.max_new_tokens = max_new_tokens
        prompts = hashlib.sha256(f"{local_prompt}\0{global_prompt}".encode()).hexdigest()[:12]
        self.provenance = {"name": "qwen2-vl", "weights": file_digest(path), "transformers": transformers.__version__,
                           "prompts": f"sha256:{prompts}", "max_pixels": max_pixels, "max_new_tokens": max_new_tokens,
                           "dtype": str(self.dtype).removeprefix("torch.")}

    def inputs(self, requests: list[CaptionRequest]):
        """The processor's batch for `requests`: token ids with image placeholders, pixels, grids."""
        texts, images = [], []
        for request in requests:
            shown = _images_of(request)
            prompt = self.global_prompt if request.box is None else self.local_prompt
            content = [{"type": "image"} for _ in shown] + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
            images += shown
        return self.processor(text=texts, images=images, size=self.size, padding=True, return_tensors="pt")

    def caption(self, requests: list[CaptionRequest]) -> list[str]:
        """One caption per request, in order. Runs under inference mode in the calling thread
        (the caller may run it in a worker thread to bound its time)."""
        if not requests:
            return []
        batch = self.inputs(requests).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      temperature=None, top_p=None, top_k=None)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def _images_of(request: CaptionRequest) -> list[Image.Image]:
    """[whole] for a global caption, [whole, crop] for a local one (context first, as the prompt says)."""
    image = request.image
    if not isinstance(image, Image.Image):
        raise CaptionError(f"a caption request needs a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    return [image] if request.box is None else [image, image.crop(_pixel_box(request.box, image.size))]


def _pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The smallest whole-pixel box covering `box`, inside the image; an empty one is an error."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(size[0], math.ceil(box[2])), min(size[1], math.ceil(box[3]))
    if x1 <= x0 or y1 <= y0:
        raise CaptionError(f"box {tuple(box)} is empty inside an image of size {size}")
    return x0, y0, x1, y1


#: Qwen2-VL's special tokens, in the order its checkpoints number them after the text vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
#: A Qwen-style chat layout: images as <|vision_start|><|image_pad|><|vision_end|>, then the text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tiny_qwen2_vl(path: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised, tiny Qwen2-VL checkpoint (model + processor) to `path`.

    It loads through `Qwen2VLCaptioner` exactly as a real checkpoint does, so tests and GPU
    smoke runs exercise the real processor, batching and generation; its captions are noise.
    The tokenizer is a byte-level BPE trained here on a few sentences, so nothing is fetched.
    """
    import transformers

    path = Path(path)
    tokenizer = _tiny_tokenizer()
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = transformers.Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                              video_processor=transformers.Qwen2VLVideoProcessor(),
                                              chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                        video_token_id=ids["<|video_pad|>"],
                                        vision_start_token_id=ids["<|vision_start|>"],
                                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(path)
    return path


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([LOCAL_PROMPT, GLOBAL_PROMPT, "a red car parked next to a tall green tree"] * 4, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer
