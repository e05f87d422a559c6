"""`platformctl infer`: ask a trained VILA-HD about an image, and see where it looked.

The model is an exported VILA-HD directory (a `vila_hd` stage's `exportTo`) or a `vila_hd`
stage's checkpoint URL with `--llm` and `--preset`. The selection settings are VILA-HD's
inference knobs as flags. Prints the answer (or JSON with `-o json`) and writes a PNG of the
image with the patches PS3 selected at each scale (the work is in `ps3.vila_hd.infer`).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_infer_parser(sub) -> None:
    p = sub.add_parser("infer", help="answer a question about an image with a VILA-HD model; draw its selection")
    p.add_argument("model", help="exported VILA-HD directory, or a vila_hd stage's checkpoint URL (with --llm, --preset)")
    p.add_argument("image", help="image file or URI")
    p.add_argument("question", help="the question (the image comes before it, as in training)")
    p.add_argument("--llm", default=None, help="LLM directory (only for a stage's checkpoint)")
    p.add_argument("--preset", default=None, help="PS3 preset (only for a stage's checkpoint), e.g. ps3-tiny")
    p.add_argument("--prompt-head", choices=["linear", "mlp"], default="linear", help="(only for a stage's checkpoint)")
    p.add_argument("--mode", choices=["after_prompt", "after_image", "random"], default="after_prompt",
                   help="LOOK_CLOSE_MODE: top-down from the question, bottom-up, or random")
    p.add_argument("--num-look-close", default="1", help="NUM_LOOK_CLOSE: looks per image (an int or 'all')")
    p.add_argument("--num-token-look-close", type=int, default=None,
                   help="NUM_TOKEN_LOOK_CLOSE: high-res patches per image (wins over looks)")
    p.add_argument("--select-num-each-scale", default=None, metavar="N,N,...",
                   help="SELECT_NUM_EACH_SCALE: patches per look at each high-res scale")
    p.add_argument("--smooth-selection-prob", action="store_true", help="SMOOTH_SELECTION_PROB")
    p.add_argument("--dynamic-resolution", action="store_true", help="appendix C's 4K rule for small images")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--picture", default="selection.png", help="where to write the PNG (default: selection.png)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=run_infer_command)


class InferError(ValueError):
    pass


def run_infer_command(args: argparse.Namespace) -> int:
    try:
        selection = _selection(args)
        image = _read(args.image)
        model, tokenizer = _load(args)
    except InferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import torch

    from ps3.vila_hd.infer import answer_batch, draw_selection

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    try:
        answers, _ = answer_batch(model, tokenizer, [image], [args.question], selection,
                                  max_new_tokens=args.max_new_tokens)
    except ValueError as exc:  # an image that does not decode, a question the chat template refuses
        print(f"error: {exc}", file=sys.stderr)
        return 1
    answer = answers[0]
    draw_selection(image, answer, args.picture, caption=args.question)
    picked = {f"{s}px": int(cells.sum()) for s, cells in zip(answer.scales, answer.selected)}
    if args.output == "json":
        print(json.dumps({"answer": answer.text, "selected_patches": picked, "image_tokens": answer.image_tokens,
                          "seconds": round(answer.seconds, 4), "picture": args.picture}, indent=2))
    else:
        print(answer.text)
        print(f"selected patches {picked}, {answer.image_tokens} image tokens, {answer.seconds:.2f} s; "
              f"picture: {args.picture}", file=sys.stderr)
    return 0


def _selection(args: argparse.Namespace):
    from ps3.vila_hd.model import Selection

    looks = args.num_look_close if args.num_look_close == "all" else _int(args.num_look_close, "--num-look-close")
    scales = None
    if args.select_num_each_scale:
        scales = tuple(_int(v, "--select-num-each-scale") for v in args.select_num_each_scale.split(","))
    return Selection(mode=args.mode, num_look_close=looks, num_token_look_close=args.num_token_look_close,
                     select_num_each_scale=scales, smooth_selection_prob=args.smooth_selection_prob,
                     dynamic_resolution=args.dynamic_resolution)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InferError(f"{flag}: {text!r} is not an integer") from None


def _read(uri: str) -> bytes:
    """The image's bytes, decoded once here so a bad file fails before the model loads."""
    from ps3.data.fs import filesystem
    from ps3.vila_hd.conversations import BadSample, decode_image

    try:
        fs, path = filesystem(uri)
        data = fs.cat_file(path)
        decode_image(data, uri)
    except (OSError, ValueError) as exc:  # BadSample is a ValueError
        detail = exc.detail if isinstance(exc, BadSample) else exc
        raise InferError(f"cannot read the image {uri}: {detail}") from None
    return data


def _load(args: argparse.Namespace):
    from transformers.utils import logging as hf_logging

    from ps3.vila_hd.export import ExportError, is_vila_hd_export, load_vila_hd

    hf_logging.disable_progress_bar()  # stderr is for the answer's figures and errors

    if is_vila_hd_export(args.model):
        try:
            return load_vila_hd(args.model)
        except ExportError as exc:
            raise InferError(str(exc)) from None
    if not (args.llm and args.preset):
        raise InferError(f"{args.model} is not an exported VILA-HD directory; for a stage's checkpoint give "
                         "--llm and --preset too")
    return _from_checkpoint(args)


def _from_checkpoint(args: argparse.Namespace):
    """A `vila_hd` stage's committed checkpoint, read as the next stage would read it."""
    import torch

    from ps3.model import PS3VisionEncoder, PresetError, UnknownPresetError, get_preset
    from ps3.vila_hd.llm import LLMError, load_llm
    from ps3.vila_hd.model import VilaHD
    from ps3_platform.runtime.build import load_weights
    from ps3_platform.runtime.distributed import WorldInfo
    from ps3_platform.runtime.metrics import Metrics
    from ps3_platform.runtime.task import TaskSetupError

    try:
        vision = PS3VisionEncoder(get_preset(args.preset))
        llm = load_llm(args.llm)
    except (UnknownPresetError, PresetError, LLMError) as exc:
        raise InferError(str(exc)) from None
    model = VilaHD.on_llm(vision, llm, prompt_head=args.prompt_head)
    world = WorldInfo(rank=0, world_size=1, local_rank=0, restart_count=0, device=torch.device("cpu"))
    try:
        load_weights(model, args.model, world, Metrics("infer", "infer", 0))
    except TaskSetupError as exc:
        raise InferError(str(exc)) from None
    return model, llm.tokenizer
