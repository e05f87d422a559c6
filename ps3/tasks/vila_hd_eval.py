"""`vila_hd_eval`: a trained VILA-HD on multiple-choice benchmarks, over a sweep of selection settings.

The model comes from `checkpoint.initFrom`: an exported VILA-HD directory (a `vila_hd`
stage's `exportTo`) or a `vila_hd` stage's committed checkpoint (then `params.llm` and
`model.preset` name its architecture). Each benchmark (4KPro-format JSONL, V*-Bench in
either public layout) is answered at every setting of the sweep (modes x shares of the
high-res patches); questions that cannot be scored (missing fields, an answer that is not
an option, an image that does not decode, a box outside its image, an unknown category)
are counted and listed with where they came from, never scored.

Writes to the run directory: `eval.json` (what `platformctl status -o json` shows under
`eval`: the per-benchmark reports, the sweep's table, and at its top level the summary of
`ps3.vila_hd.sweep.headline`: `accuracy_highres`, `accuracy_lowres`, `accuracy_chance`,
`recall_topdown`, `recall_bottomup` and `n_questions`, pooled over every benchmark),
`sweep.png` (accuracy and latency against % of patches), `answers-NAME.jsonl` (every answer
at every setting) and `pictures/` (a few images with the selected patches).
"""

from __future__ import annotations

import json
import re

from ps3_platform.runtime.task import RunContext, TaskSetupError, TaskState

from ps3.data.fs import filesystem
from ps3.vila_hd.benchmarks import (
    BenchmarkError,
    Problem,
    Question,
    check_image,
    problems_summary,
    prompt_text,
    read_benchmark,
)
from ps3.vila_hd.export import ExportError, is_vila_hd_export, load_vila_hd
from ps3.vila_hd.infer import answer_batch, choose_options, draw_selection
from ps3.vila_hd.model import Selection
from ps3.vila_hd.sweep import (
    Item,
    Setting,
    headline,
    plot_sweep,
    run_setting,
    sweep_rows,
)

from .common import parse_params
from .params import BenchmarkParams, VilaHDEvalParams
from .vila_hd import fresh_model


def build(ctx: RunContext) -> TaskState:
    params: VilaHDEvalParams = parse_params(VilaHDEvalParams, ctx)

    def run() -> dict:
        if ctx.rank != 0:
            return {}
        model, tokenizer, source = _load_model(ctx, params)
        model = model.to(ctx.device).eval()
        base = _base_selection(params)
        settings = _settings(params)
        drawn = next((s for s in settings if s.fraction != 0), settings[0])  # pictures show a selection
        results, report, chances = {}, {}, []
        for bench in params.benchmarks:
            items, problems = _load_benchmark(bench)
            chances += [1 / len(item.question.options) for item in items]
            ctx.log.info("%s: %d questions to score, %d problems", bench.name, len(items), len(problems))
            results[bench.name], answers = {}, []
            for setting in settings:
                summary, rows = run_setting(model, tokenizer, items, setting.selection(base, model),
                                            answer=params.answer, batch_size=params.batch_size,
                                            max_new_tokens=params.max_new_tokens, instruction=params.instruction)
                results[bench.name][setting.name] = summary
                answers += [{"setting": setting.name, **row} for row in rows]
            _write_jsonl(ctx.run_dir / f"answers-{bench.name}.jsonl", answers)
            pictures = _draw(ctx, params, model, tokenizer, bench.name, items, drawn.name, drawn.selection(base, model))
            report[bench.name] = {"format": bench.format, "uri": bench.uri, "n_questions": len(items),
                                  "problems": problems_summary(problems), "settings": results[bench.name],
                                  "pictures": pictures}
        rows = sweep_rows(results, settings, base, model)
        plot = ctx.run_dir / "sweep.png"
        plot_sweep(rows, plot)
        summary = headline(results, settings, base, model, chances)
        evaluation = {"model": source, "benchmarks": report, "sweep": rows, "sweep_plot": str(plot), **summary}
        (ctx.run_dir / "eval.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True))
        for row in rows:
            ctx.log.info("%-10s %-14s %5.1f%% patches: accuracy %.3f, recall %s, %.0f tokens/image, %.1f ms/question",
                         row["benchmark"], row["setting"], row["patches_pct"], row["accuracy"], row["recall"],
                         row["tokens_per_image"], 1000 * row["latency_s_per_question"])
        ctx.log.info("summary over %d questions: %s", summary["n_questions"], json.dumps(summary, sort_keys=True))
        return {"benchmarks": len(report), "settings": len(settings)}

    return TaskState(run=run)


def _load_model(ctx: RunContext, params: VilaHDEvalParams):
    source = ctx.stage.checkpoint.init_from
    if not source:
        raise TaskSetupError("spec checkpoint.initFrom must name an exported VILA-HD directory (a vila_hd stage's "
                             "exportTo) or a vila_hd stage's checkpoints")
    if is_vila_hd_export(source):
        try:
            model, tokenizer = load_vila_hd(source)
        except ExportError as exc:
            raise TaskSetupError(f"spec checkpoint.initFrom: {exc}") from None
        return model, tokenizer, source
    if not params.llm:
        raise TaskSetupError(f"spec params.llm: {source} is a stage's checkpoint, not an exported model; name the "
                             "LLM directory it was trained with")
    model, tokenizer = fresh_model(ctx, params.llm, params.prompt_head)
    step = ctx.load_weights(model, source)
    return model, tokenizer, f"{source} step {step}"


def _base_selection(params: VilaHDEvalParams) -> Selection:
    scales = tuple(params.select_num_each_scale) if params.select_num_each_scale else None
    return Selection(num_look_close=params.num_look_close, num_token_look_close=params.num_token_look_close,
                     select_num_each_scale=scales, smooth_selection_prob=params.smooth_selection_prob,
                     dynamic_resolution=params.dynamic_resolution)


def _settings(params: VilaHDEvalParams) -> list[Setting]:
    """Every mode at every share; low-res only (share 0) once, whatever the modes."""
    settings = {}
    for fraction in params.patch_fractions or [None]:
        for mode in params.modes:
            setting = Setting(mode, fraction)
            settings.setdefault(setting.name, setting)
    return list(settings.values())


def _load_benchmark(bench: BenchmarkParams) -> tuple[list[Item], list[Problem]]:
    """The questions whose images load and pass the checks, and the problems of the rest."""
    try:
        questions, problems = read_benchmark(bench.uri, bench.format, categories=bench.categories)
    except BenchmarkError as exc:
        raise TaskSetupError(f"spec params.benchmarks {bench.name}: {exc}") from None
    items = []
    for question in questions:
        if bench.limit is not None and len(items) >= bench.limit:
            break
        data = _image_bytes(question)
        problem = check_image(question, data)
        if problem is not None:
            problems.append(problem)
        else:
            items.append(Item(question, data))
    return items, problems


def _image_bytes(question: Question) -> bytes | None:
    if isinstance(question.image, bytes):
        return question.image
    try:
        fs, path = filesystem(question.image)
        return fs.cat_file(path)
    except (OSError, ValueError):
        return None  # check_image counts it as an image that does not decode


def _draw(ctx: RunContext, params: VilaHDEvalParams, model, tokenizer, name: str, items: list[Item],
          setting: str, selection: Selection) -> list[str]:
    """PNGs of the first questions with the patches the model selected for them."""
    chosen = items[:params.pictures]
    if not chosen:
        return []
    texts = [prompt_text(item.question, params.instruction) for item in chosen]
    images = [item.image for item in chosen]
    if params.answer == "options":
        answers, _ = choose_options(model, tokenizer, images, texts, [len(i.question.options) for i in chosen],
                                    selection)
    else:
        answers, _ = answer_batch(model, tokenizer, images, texts, selection, max_new_tokens=params.max_new_tokens)
    folder = ctx.run_dir / "pictures"
    folder.mkdir(exist_ok=True)
    paths = []
    for item, reply in zip(chosen, answers):
        path = folder / re.sub(r"[^\w.-]", "_", f"{name}-{item.question.qid}.png")
        draw_selection(item.image, reply, path,
                       caption=f"{item.question.question} (truth: {item.question.answer}; {setting})")
        paths.append(str(path))
    return paths


def _write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
