"""Multiple-choice accuracy and selection recall of a VilaHD model on held-out questions.

A question is answered by the option letter the model scores highest at the answer's
first position (greedy decoding restricted to the options, so a tiny model that has not
learnt to stop still gets a well-defined answer). The same questions are answered with
high-res selection, with low-res tokens only, and compared with chance; recall compares
top-down and bottom-up selection at the same budget.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch

from .losses import selection_recall
from .model import IGNORE, Selection

LETTERS = "ABCD"


def letter_ids(tokenizer, letters: str = LETTERS) -> torch.Tensor:
    ids = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"option letters {letters!r} must each be one token")
    return torch.tensor([i[0] for i in ids])


@torch.no_grad()
def answer_letters(model, batch: dict, selection: Selection, choices: torch.Tensor):
    """(chosen option index [B], true option index [B] or -1, model output) for one batch."""
    out = model(batch, selection)
    labels = out.labels
    first = (labels != IGNORE).float().argmax(dim=1)  # the answer's first token
    rows = torch.arange(len(labels), device=labels.device)
    scores = out.logits[rows, first - 1][:, choices.to(labels.device)]
    truth = labels[rows, first][:, None] == choices.to(labels.device)[None]
    return scores.argmax(1), torch.where(truth.any(1), truth.float().argmax(1), -1), out


@torch.no_grad()
def evaluate_choices(model, loader, batches: int, selection: Selection, tokenizer, device) -> dict:
    """accuracy_highres / accuracy_lowres / accuracy_chance, recall_topdown / recall_bottomup, n_questions."""
    was_training = model.training
    model.eval()
    choices = letter_ids(tokenizer)
    hits, recalls, n = defaultdict(float), defaultdict(list), 0
    grids = model.vision_tower.preset.grids[1:]
    # held-out questions never have their box cells forced, whatever the stage trained with
    highres = replace(selection, gt_forced=False)
    lowres = replace(highres, num_look_close=0, num_token_look_close=None)
    recall_names = {"after_prompt": "topdown", "after_image": "bottomup"}
    for _ in range(batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(loader).items()}
        picked, truth, out = answer_letters(model, batch, highres, choices)
        hits["highres"] += float((picked == truth).sum())
        selected = {highres.mode: out.selected}  # the answer's own selection serves its mode's recall
        picked, truth, _ = answer_letters(model, batch, lowres, choices)
        hits["lowres"] += float((picked == truth).sum())
        n += int((truth >= 0).sum())
        for mode, name in recall_names.items():
            if mode not in selected:
                selected[mode] = model(batch, replace(highres, mode=mode)).selected
            recalls[name] += selection_recall(selected[mode], batch["boxes"], batch["has_box"], grids).tolist()
    model.train(was_training)
    results = {f"accuracy_{k}": round(v / max(1, n), 4) for k, v in hits.items()}
    results["accuracy_chance"] = round(1 / len(LETTERS), 4)
    results |= {f"recall_{k}": round(sum(v) / max(1, len(v)), 4) for k, v in recalls.items()}
    results["n_questions"] = n
    return results
