"""`ps3_eval`: what pre-training bought, measured on held-out shards.

(a) local retrieval R@1: each image's pooled in-box high-res feature must pick its own
caption among the batch's captions; (b) patch-selection recall as in paper Table 7: the
share of ground-truth-box patches among the selected ones, top-down vs bottom-up vs
random at the same budget; (c) the same retrieval from low-res features only, and from an
untrained model. Results go to `eval.json` in the run directory and `platformctl status`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ps3.model import PS3Model
from ps3.pictures import draw_selection_maps
from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from .common import init_weights, loader_for, parse_params, preset_for, to_device, tokenizer_for
from .params import EvalParams


def retrieval_r1(image: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor) -> float:
    """Share of images whose best caption is their own (an identical caption counts too)."""
    best = (image @ text.T).argmax(dim=1)  # [B]
    return float((tokens[best] == tokens).all(dim=1).float().mean())


def selection_recall(probs: list[torch.Tensor], gt_maps: list[torch.Tensor], generator: torch.Generator | None = None
                     ) -> float:
    """Mean share of box cells among the top-K cells, K = the box's cell count (per scale).

    With `generator`, cells are chosen at random instead: the chance level of Table 7.
    """
    shares = []
    for p, g in zip(probs, gt_maps):
        p, g = p.flatten(1).float(), g.flatten(1) > 0  # [B, N]
        for row, truth in zip(p, g):
            k = int(truth.sum())
            if k == 0 or k == truth.numel():
                continue
            scores = torch.rand(row.shape, generator=generator) if generator is not None else row
            picked = scores.topk(k).indices
            shares.append(float(truth[picked].float().mean()))
    return sum(shares) / max(1, len(shares))


@torch.no_grad()
def evaluate_model(model: PS3Model, loader, batches: int, device: torch.device, seed: int,
                   draw: Callable[[dict, object], None] | None = None) -> dict:
    """Retrieval and selection recall over `batches` held-out batches; `draw(batch, out)` sees
    the first one (pictures)."""
    model.eval()
    figures = {"retrieval_r1": [], "retrieval_r1_lowres": [], "recall_topdown": [], "recall_bottomup": [],
               "recall_random": []}
    generator = torch.Generator().manual_seed(seed)
    pairs = 0
    for number in range(batches):
        batch = to_device(next(loader), device)
        out = model(batch)
        pairs += len(batch["tokens"])
        if draw is not None and number == 0:
            draw(batch, out)
        lowres = model({**batch, "is_global": torch.ones_like(batch["is_global"])})
        figures["retrieval_r1"].append(retrieval_r1(out.image_features, out.text_features, batch["tokens"]))
        figures["retrieval_r1_lowres"].append(retrieval_r1(lowres.image_features, out.text_features, batch["tokens"]))
        figures["recall_topdown"].append(selection_recall(out.topdown_probs, batch["gt_maps"]))
        figures["recall_bottomup"].append(selection_recall(out.bottomup_probs, batch["gt_maps"]))
        figures["recall_random"].append(selection_recall(out.topdown_probs, batch["gt_maps"], generator))
    return {**{k: round(sum(v) / len(v), 4) for k, v in figures.items()}, "n_pairs": pairs}


def picture_drawer(tokenizer, folder: Path, count: int) -> Callable[[dict, object], None]:
    """Draws the first `count` pairs of a batch: caption, top-down and bottom-up maps at the top scale."""
    def draw(batch: dict, out) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(count, len(batch["tokens"]))):
            draw_selection_maps(batch["selection_view"][i], tokenizer.decode(batch["tokens"][i].tolist()),
                                out.topdown_probs[-1][i], out.bottomup_probs[-1][i], batch["gt_maps"][-1][i] > 0,
                                folder / f"selection-{i}.png")

    return draw


def build(ctx: RunContext) -> TaskState:
    params: EvalParams = parse_params(EvalParams, ctx)
    source = ctx.stage.checkpoint.init_from
    if not source:
        raise TaskSetupError("spec checkpoint.initFrom must name the trained stage's checkpoints "
                             "(e.g. file://{run}/checkpoints/JOB/pretrain)")
    preset = preset_for(ctx)
    tokenizer = tokenizer_for(ctx, preset)
    sources = ctx.stage.data.eval_sources or ctx.stage.data.sources

    def loader():
        # Local pairs only, the same held-out batches for every model (same seed, from position 0).
        return loader_for(ctx, preset, tokenizer, sources, global_caption_fraction=0.0,
                          global_batch=params.batch_size, micro_batch=params.batch_size, rank=0, world_size=1)

    def run() -> dict:
        untrained = PS3Model(preset).to(ctx.device)
        init_weights(untrained, ctx.stage.model.init_from)
        before = evaluate_model(untrained, loader(), params.batches, ctx.device, ctx.stage.train.seed)
        trained = PS3Model(preset).to(ctx.device)
        step = ctx.load_weights(trained, source)
        pictures = ctx.run_dir / "pictures"
        draw = picture_drawer(tokenizer, pictures, params.pictures) if params.pictures and ctx.rank == 0 else None
        results = evaluate_model(trained, loader(), params.batches, ctx.device, ctx.stage.train.seed, draw)
        if draw is not None:
            results["pictures"] = str(pictures)
        results["retrieval_r1_untrained"] = before["retrieval_r1"]
        results["checkpoint_step"] = step
        if ctx.rank == 0:
            (ctx.run_dir / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
            ctx.log.info("evaluation of %s step %d: %s", source, step, json.dumps(results, sort_keys=True))
        return results

    return TaskState(run=run)
