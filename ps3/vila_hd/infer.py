"""Asking a trained VILA-HD about images, and drawing where it looked.

`answer_batch` is the Python API (`platformctl infer` and the `vila_hd_eval` stage call it):
questions about images in, greedy answers out, each with the high-res cells PS3 encoded
per scale, the LLM tokens its image took and the time it cost. `draw_selection` writes the
picture of one answer: the image with the selected patches of each scale outlined.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .conversations import decode_image, encode_prompt
from .loader import Prepared, _normalised, _squash, collate
from .evaluate import letter_ids
from .model import Selection, VilaHD

#: Option letters, in order (multiple choice has at most this many options).
LETTERS = "ABCDEFGH"
#: Outline colours of the high-res scales, lowest first.
SCALE_COLOURS = ((255, 196, 0), (0, 190, 255), (255, 60, 150), (120, 255, 80))


@dataclass
class Answer:
    text: str
    selected: list[np.ndarray]  # per high-res scale, bool [G, G]: the cells PS3 encoded
    scales: tuple[int, ...]  # the high-res scales (pixels), in the order of `selected`
    image_tokens: int  # LLM tokens the image took (low-res + kept high-res + newline)
    seconds: float  # this question's share of its batch's wall time


def prompt_batch(tokenizer, images: Sequence[bytes], questions: Sequence[str], *, image_size: int,
                 boxes: Sequence[Sequence[float] | None] | None = None) -> dict:
    """The model's batch for one image and one question per row (the question after the image,
    as training data has it); `boxes` (pixels) let selection recall be measured."""
    prepared = []
    for n, (data, question) in enumerate(zip(images, questions, strict=True)):
        meta = {"conversations": [{"from": "human", "value": f"<image>\n{question}"}]}
        width, height = decode_image(data, "image").image.size
        box = boxes[n] if boxes is not None else None
        prepared.append(Prepared(encode_prompt(meta, tokenizer), [_squash(data, image_size)], [(width, height)],
                                 [None if box is None else _normalised(tuple(box), width, height)], False, str(n)))
    return collate(prepared, pad_id=tokenizer.pad_token_id, image_size=image_size)


@torch.no_grad()
def answer_batch(model: VilaHD, tokenizer, images: Sequence[bytes], questions: Sequence[str], selection: Selection,
                 *, max_new_tokens: int = 16, boxes=None) -> tuple[list[Answer], dict]:
    """Greedy answers, and the batch with the selection made (`selected`), for callers that
    score the selection against the boxes."""
    batch = _batch(model, tokenizer, images, questions, boxes)
    with _Timer(len(questions), batch["input_ids"].device) as timer:
        tokens, out = model.generate(batch, selection, max_new_tokens=max_new_tokens)
    texts = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    return _answers(model, texts, out, timer.seconds), batch | {"selected": out.selected}


@torch.no_grad()
def choose_options(model: VilaHD, tokenizer, images: Sequence[bytes], questions: Sequence[str], options: Sequence[int],
                   selection: Selection, *, boxes=None) -> tuple[list[Answer], dict]:
    """Answers restricted to the option letters: the letter among the first `options[n]` that
    the model scores highest as its first answer token. A well-defined answer from a model
    too small to have learnt to answer with a letter and stop (the quickstart's)."""
    batch = _batch(model, tokenizer, images, questions, boxes)
    device = batch["input_ids"].device
    with _Timer(len(questions), device) as timer:
        embeds, mask, _, out = model.embed(batch, selection)
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        last = logits[torch.arange(len(logits), device=device), mask.sum(1) - 1]  # [B, V]: the answer's first token
        scores = last[:, letter_ids(tokenizer, LETTERS[:max(options)]).to(device)].float()
        beyond = torch.arange(scores.shape[1], device=device)[None] >= torch.tensor(options, device=device)[:, None]
        picked = scores.masked_fill(beyond, -torch.inf).argmax(1).tolist()
    return _answers(model, [LETTERS[p] for p in picked], out, timer.seconds), batch | {"selected": out.selected}


def _batch(model: VilaHD, tokenizer, images, questions, boxes) -> dict:
    batch = prompt_batch(tokenizer, images, questions, image_size=model.vision_tower.preset.scales[-1], boxes=boxes)
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _answers(model: VilaHD, texts: list[str], out, seconds: float) -> list[Answer]:
    scales = tuple(model.vision_tower.preset.scales[1:])
    return [Answer(text, [s[n].cpu().numpy() for s in out.selected], scales, out.image_tokens[n], seconds)
            for n, text in enumerate(texts)]


class _Timer:
    """Wall time per question of a batch (on CUDA, after the device has finished)."""

    def __init__(self, questions: int, device: torch.device):
        self.questions, self.device, self.seconds = questions, device, 0.0

    def __enter__(self) -> _Timer:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = (time.perf_counter() - self.start) / self.questions


def draw_selection(image_bytes: bytes, answer: Answer, path, *, caption: str = "", max_side: int = 1024) -> None:
    """A PNG of the image (long side at most `max_side`) with each scale's selected cells
    tinted and outlined in the scale's colour, and a legend with the question and answer."""
    image = decode_image(image_bytes, "image").image.convert("RGB")
    image.thumbnail((max_side, max_side))
    width, height = image.size
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    black = (0, 0, 0)
    legend = [(caption, black)] if caption else []
    legend.append((f"answer: {answer.text!r}", black))
    for scale, cells, colour in zip(answer.scales, answer.selected, SCALE_COLOURS):
        grid = cells.shape[0]
        for row, col in zip(*np.nonzero(cells)):
            box = (col * width / grid, row * height / grid, (col + 1) * width / grid - 1, (row + 1) * height / grid - 1)
            draw.rectangle(box, fill=(*colour, 40), outline=(*colour, 255), width=max(1, width // 512))
        legend.append((f"{scale} px: {int(cells.sum())} of {cells.size} patches", colour))
    picture = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
    strip = Image.new("RGB", (width, 14 * len(legend) + 8), (255, 255, 255))
    text = ImageDraw.Draw(strip)
    for n, (line, colour) in enumerate(legend):
        text.text((4, 4 + 14 * n), line, fill=colour)
    sheet = Image.new("RGB", (width, height + strip.height), (255, 255, 255))
    sheet.paste(strip, (0, 0))
    sheet.paste(picture, (0, strip.height))
    sheet.save(path, format="PNG")
