"""Multiple-choice benchmarks at several selection settings: the shape of the paper's tables 7-8.

A setting is how the high-res patches are chosen (top-down from the LLM's prompt, bottom-up
from PS3's prior, or at random) and how many (a share of all the preset's high-res
patches; 0 is low-res only). Each setting answers every question of a benchmark and gives
accuracy (overall, per category, per resolution bucket), selection recall where questions
carry boxes, LLM tokens per image and latency per question. `sweep_rows` flattens them into
one table and `plot_sweep` draws accuracy and latency against the share of patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .benchmarks import Question, extract_letter, prompt_text, score
from .infer import answer_batch, choose_options
from .losses import selection_recall
from .model import Selection, VilaHD

MODE_NAMES = {"after_prompt": "topdown", "after_image": "bottomup", "random": "random"}
LOWRES = "lowres"


@dataclass(frozen=True)
class Setting:
    mode: str  # a look-close mode (`ps3.vila_hd.model.LOOK_CLOSE_MODES`)
    fraction: float | None = None  # share of the preset's high-res patches; None: the stage's own budget

    @property
    def name(self) -> str:
        if self.fraction == 0:
            return LOWRES  # no patch is selected: the mode makes no difference
        return self.kind + ("" if self.fraction is None else f"@{self.fraction:.0%}")

    @property
    def kind(self) -> str:
        return LOWRES if self.fraction == 0 else MODE_NAMES[self.mode]

    def selection(self, base: Selection, model: VilaHD) -> Selection:
        if self.fraction is None:
            return replace(base, mode=self.mode, gt_forced=False)
        patches = round(self.fraction * model.vision_tower.preset.max_highres_tokens)
        return replace(base, mode=self.mode, gt_forced=False, num_look_close=base.num_look_close if patches else 0,
                       num_token_look_close=patches or None)


@dataclass
class Item:
    """A question whose image loaded and passed the checks."""

    question: Question
    image: bytes


def run_setting(model: VilaHD, tokenizer, items: Sequence[Item], selection: Selection, *, answer: str,
                batch_size: int, max_new_tokens: int, instruction: str) -> tuple[dict, list[dict]]:
    """(summary, one row per question) of one benchmark at one setting."""
    records, rows, recalls, tokens, seconds = [], [], [], [], 0.0
    grids = model.vision_tower.preset.grids[1:]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = [prompt_text(item.question, instruction) for item in chunk]
        images = [item.image for item in chunk]
        boxes = [_union(item.question.boxes) for item in chunk]
        if answer == "options":
            answers, batch = choose_options(model, tokenizer, images, texts, [len(i.question.options) for i in chunk],
                                            selection, boxes=boxes)
        else:
            answers, batch = answer_batch(model, tokenizer, images, texts, selection, max_new_tokens=max_new_tokens,
                                          boxes=boxes)
        if looks_close(selection):
            recalls += selection_recall(batch["selected"], batch["boxes"], batch["has_box"], grids).tolist()
        for item, reply in zip(chunk, answers):
            letter = extract_letter(reply.text, item.question.options)
            records.append((item.question, letter))
            rows.append({"id": item.question.qid, "answer": item.question.answer, "predicted": letter,
                         "text": reply.text, "image_tokens": reply.image_tokens})
            tokens.append(reply.image_tokens)
            seconds += reply.seconds
    summary = score(records)
    summary["recall"] = round(sum(recalls) / len(recalls), 4) if recalls else None
    summary["n_with_boxes"] = len(recalls)
    summary["tokens_per_image"] = round(sum(tokens) / max(1, len(tokens)), 1)
    summary["latency_s_per_question"] = round(seconds / max(1, len(items)), 4)
    return summary, rows


def _union(boxes: Sequence[Sequence[float]]) -> list[float] | None:
    """One box around every target of a question (V* questions can name two objects)."""
    if not boxes:
        return None
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def looks_close(selection: Selection) -> bool:
    return selection.num_look_close != 0 or bool(selection.num_token_look_close)


def patch_share(selection: Selection, model: VilaHD) -> float:
    """% of the preset's high-res patches an image gets."""
    enc = model.vision_tower
    return round(100 * selection.patches(enc) / enc.preset.max_highres_tokens, 1) if looks_close(selection) else 0.0


def sweep_rows(results: dict[str, dict[str, dict]], settings: Sequence[Setting], base: Selection,
               model: VilaHD) -> list[dict]:
    """One row per (benchmark, setting): the table of the sweep."""
    rows = []
    for benchmark, by_setting in results.items():
        for setting in settings:
            summary = by_setting[setting.name]
            rows.append({"benchmark": benchmark, "setting": setting.name, "mode": setting.kind,
                         "patches_pct": patch_share(setting.selection(base, model), model),
                         "accuracy": summary["accuracy"], "recall": summary["recall"],
                         "tokens_per_image": summary["tokens_per_image"],
                         "latency_s_per_question": summary["latency_s_per_question"], "n": summary["n"]})
    return rows


def headline(results: dict[str, dict[str, dict]], settings: Sequence[Setting], base: Selection, model: VilaHD,
             chances: Sequence[float]) -> dict:
    """The figures the quickstart is judged by (issue 15, item 7), pooled over every benchmark
    (each scored question counts once, whichever benchmark it is in).

    `accuracy_highres` is top-down accuracy at the stage's own budget (the setting swept without
    a share, or else the swept share whose patch count is nearest it), `accuracy_lowres` the
    low-res-only setting's, `accuracy_chance` the mean of 1 / options; `recall_topdown` and
    `recall_bottomup` are selection recall at that same budget. A figure whose setting was not
    swept (or whose questions carry no box) is None; `chances` has one entry per scored question.
    """
    top = _nearest_budget([s for s in settings if s.kind == MODE_NAMES["after_prompt"]], base, model)
    bottom = None if top is None else Setting("after_image", top.fraction)
    low = next((s for s in settings if s.kind == LOWRES), None)
    return {"accuracy_highres": _pooled_accuracy(results, top), "accuracy_lowres": _pooled_accuracy(results, low),
            "accuracy_chance": round(sum(chances) / len(chances), 4) if chances else None,
            "recall_topdown": _pooled_recall(results, top), "recall_bottomup": _pooled_recall(results, bottom),
            "n_questions": len(chances), "headline_setting": None if top is None else top.name}


def _nearest_budget(candidates: Sequence[Setting], base: Selection, model: VilaHD) -> Setting | None:
    """The setting whose patches per image are nearest the stage's own budget."""
    enc = model.vision_tower

    def patches(selection: Selection) -> int:
        return selection.patches(enc) if looks_close(selection) else 0

    own = patches(base)
    return min(candidates, key=lambda s: abs(patches(s.selection(base, model)) - own), default=None)


def _pooled_accuracy(results: dict[str, dict[str, dict]], setting: Setting | None) -> float | None:
    summaries = [] if setting is None else [b[setting.name] for b in results.values() if setting.name in b]
    n = sum(s["n"] for s in summaries)
    return round(sum(s["correct"] for s in summaries) / n, 4) if n else None


def _pooled_recall(results: dict[str, dict[str, dict]], setting: Setting | None) -> float | None:
    summaries = [] if setting is None else [b[setting.name] for b in results.values() if setting.name in b]
    boxed = [s for s in summaries if s["recall"] is not None]
    n = sum(s["n_with_boxes"] for s in boxed)
    return round(sum(s["recall"] * s["n_with_boxes"] for s in boxed) / n, 4) if n else None


def plot_sweep(rows: Sequence[dict], path) -> None:
    """Accuracy and latency against % of high-res patches, one line per (benchmark, mode)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    from matplotlib import pyplot as plt

    figure, (acc, lat) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for key in sorted({(r["benchmark"], r["mode"]) for r in rows if r["mode"] != LOWRES}):
        # low-res only is every mode's point at 0 %
        line = sorted((r for r in rows if r["benchmark"] == key[0] and r["mode"] in (key[1], LOWRES)),
                      key=lambda r: r["patches_pct"])
        x = [r["patches_pct"] for r in line]
        label = f"{key[0]} {key[1]}"
        acc.plot(x, [r["accuracy"] for r in line], marker="o", label=label)
        lat.plot(x, [1000 * r["latency_s_per_question"] for r in line], marker="o", label=label)
    acc.set(xlabel="high-res patches selected (%)", ylabel="accuracy", title="accuracy")
    lat.set(xlabel="high-res patches selected (%)", ylabel="ms per question", title="latency")
    acc.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)
