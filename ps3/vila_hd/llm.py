"""The VILA-HD language model: a Qwen2-family causal LM and its tokenizer, from a path or URI.

VILA-HD (paper section 3) puts PS3 in front of a Qwen2 / Qwen2.5 LLM. The checkpoint is a
Hugging Face directory (config.json, safetensors, tokenizer files, a chat template) that a
run names explicitly: nothing is ever downloaded from a hub, and remote directories (s3://)
are copied to a per-node cache first, because transformers reads local files only.

`check_llm_dir` finds the cheap problems (wrong family, no tokenizer, no chat template)
without touching weights, so `validate` reports them before a job is scheduled;
`load_llm` raises the same messages. `build_tiny_llm` writes a random, tiny checkpoint of
the real classes, for tests and the quickstart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ps3.curation.models import WeightsError
from ps3.curation.models.weights import local_weights
from ps3.data.fs import filesystem

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The placeholder an image takes in conversation text; one token, replaced by image features.
IMAGE_TOKEN = "<image>"
#: config.json model_type values this package composes with (Qwen2 and Qwen2.5 both say "qwen2").
SUPPORTED_FAMILIES = frozenset({"qwen2"})

#: ChatML as Qwen writes it, with no default system prompt, so a conversation renders exactly
#: as given. An unknown role fails loudly instead of rendering a turn the model never saw.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
#: The tiny tokenizer's special tokens; their ids are 0..3 in this order.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class LLMError(ValueError):
    """An LLM directory that cannot serve VILA-HD; the message is one line naming the path."""


@dataclass
class LoadedLLM:
    """A causal LM on CPU, its tokenizer, and the id `IMAGE_TOKEN` encodes to."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_token_id: int


def check_llm_dir(uri: str) -> list[str]:
    """One-line problems with the checkpoint directory at `uri`; empty when it looks loadable.

    Reads only the directory listing and two small JSON files, so a spec can be checked
    against an s3:// checkpoint of many gigabytes in a second.
    """
    try:
        fs, path = filesystem(uri)
        if not fs.isdir(path):
            return [f"LLM directory not found: {uri} (give a local path or URI of a Qwen2 checkpoint directory)"]
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
        config = _read_json(fs, f"{path}/config.json") if "config.json" in names else None
        tokenizer_config = _read_json(fs, f"{path}/tokenizer_config.json") if "tokenizer_config.json" in names else {}
    except Exception as exc:  # malformed JSON, or a store's own errors (botocore's are not OSErrors)
        return [f"cannot read the LLM directory {uri}: {_first_line(exc)}"]
    if config is None:
        return [f"{uri}: no config.json; expected a Hugging Face checkpoint directory (save_pretrained output)"]
    return [p for p in (_family_problem(uri, config), _weights_problem(uri, names),
                        _tokenizer_problem(uri, names), _template_problem(uri, names, tokenizer_config)) if p]


def _read_json(fs, path: str) -> dict:
    with fs.open(path, "r") as f:
        return json.load(f)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _family_problem(uri: str, config: dict) -> str | None:
    model_type = config.get("model_type")
    if model_type in SUPPORTED_FAMILIES:
        return None
    return (f"{uri}: config.json model_type {model_type!r} is not supported (supported: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}); use a Qwen2 or Qwen2.5 checkpoint")


def _weights_problem(uri: str, names: set[str]) -> str | None:
    if any(name.endswith(_WEIGHT_SUFFIXES) for name in names):
        return None
    return f"{uri}: no weight files (*.safetensors or *.bin); save the model there with save_pretrained"


def _tokenizer_problem(uri: str, names: set[str]) -> str | None:
    if "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names:
        return None
    return (f"{uri}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "save the tokenizer next to the model")


def _template_problem(uri: str, names: set[str], tokenizer_config: dict) -> str | None:
    """Conversations are tokenised through the chat template, so a base model without one
    would train on a prompt format it will never be served with; say so up front."""
    if tokenizer_config.get("chat_template") or "chat_template.jinja" in names:
        return None
    return (f"{uri}: the tokenizer has no chat template (no chat_template in tokenizer_config.json, "
            "no chat_template.jinja); use an instruct checkpoint or add a ChatML template")


def load_llm(uri: str, *, dtype: torch.dtype | None = None) -> LoadedLLM:
    """The causal LM and tokenizer at `uri`, on CPU, ready to take `IMAGE_TOKEN` in text.

    `dtype` None keeps the checkpoint's stored dtype. The model's train/eval mode is the
    caller's to set (transformers hands it back in eval mode). Raises `LLMError`.
    """
    problems = check_llm_dir(uri)
    if problems:
        raise LLMError(problems[0])
    path = _local_copy(uri)
    tokenizer = _load_tokenizer(path, uri)
    model = _load_model(path, uri, dtype)
    image_token_id = _ensure_image_token(model, tokenizer, uri)
    _ensure_pad_token(tokenizer, uri)
    return LoadedLLM(model=model, tokenizer=tokenizer, image_token_id=image_token_id)


def _local_copy(uri: str) -> Path:
    try:
        return local_weights(uri)
    except WeightsError as exc:
        raise LLMError(f"cannot copy the LLM directory {uri} to the local cache: {exc}") from exc


def _load_tokenizer(path: Path, uri: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # tokenizers raises its own exception types; all mean "unreadable"
        raise LLMError(f"cannot load the tokenizer at {uri}: {_first_line(exc)}") from exc


def _load_model(path: Path, uri: str, dtype: torch.dtype | None):
    """transformers only warns about tensors missing from a checkpoint and initialises them
    at random; an LLM with random layers would train without complaint, so that is an error."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype is None else dtype, local_files_only=True, output_loading_info=True)
    except Exception as exc:  # safetensors, torch and transformers each raise their own types
        raise LLMError(f"cannot load the LLM weights at {uri}: {_first_line(exc)}") from exc
    missing = sorted(info["missing_keys"])
    if missing:
        raise LLMError(f"{uri}: the weights lack {len(missing)} tensors (first: {missing[0]}); "
                       "the checkpoint is incomplete or of another architecture")
    return model


def _ensure_image_token(model, tokenizer, uri: str) -> int:
    """Add `IMAGE_TOKEN` as a special token when missing (so BPE never splits it) and grow
    the embeddings only when its id falls past them: Qwen2 checkpoints carry spare rows."""
    if IMAGE_TOKEN not in tokenizer.get_added_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise LLMError(f"{uri}: the tokenizer encodes {IMAGE_TOKEN} as {len(ids)} tokens, not one; "
                       f"remove {IMAGE_TOKEN!r} from its vocabulary or use another checkpoint")
    if ids[0] >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return ids[0]


def _ensure_pad_token(tokenizer, uri: str) -> None:
    """Batches are right-padded; padded positions are masked, so eos serves as pad if needed."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise LLMError(f"{uri}: the tokenizer has neither a pad nor an eos token; set one in tokenizer_config.json")
    tokenizer.pad_token = tokenizer.eos_token


def build_tiny_llm(directory: str, texts: Iterable[str], *, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int = 512,
                   max_position_embeddings: int = 4096, seed: int = 0) -> str:
    """Write a random Qwen2 checkpoint with a tokenizer trained on `texts`; return `directory`.

    It goes through `load_llm` exactly as a real Qwen2 checkpoint does, so tests and the
    quickstart exercise the real classes, chat template and image token; its answers are
    noise. The same `texts` and `seed` give the same tensors. The model's vocabulary is
    `vocab_size` rows, or more if the trained tokenizer needs them.
    """
    tokenizer = _tiny_tokenizer(texts, vocab_size, max_position_embeddings)
    tokenizer.save_pretrained(directory)
    config = _tiny_config(tokenizer, hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                          intermediate_size=intermediate_size, vocab_size=max(vocab_size, len(tokenizer)),
                          max_position_embeddings=max_position_embeddings)
    _tiny_model(config, seed).save_pretrained(directory)  # safetensors is the v5 default
    return str(directory)


def _tiny_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    """A byte-level BPE trained here, so no tokenizer is ever fetched.

    transformers 5 loads any "qwen2" checkpoint's tokenizer as `Qwen2Tokenizer`, which
    re-applies Qwen's own normaliser and pre-tokenizer whatever tokenizer.json says. Training
    with those same two makes the saved file say what loading will do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    qwen = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer = qwen.normalizer, qwen.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=max_length)


def _tiny_config(tokenizer, **sizes):
    from transformers import Qwen2Config

    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    return Qwen2Config(**sizes, tie_word_embeddings=True, bos_token_id=endoftext, eos_token_id=im_end,
                       pad_token_id=endoftext)


def _tiny_model(config, seed: int):
    """Initialised under a forked RNG: the weights depend on `seed` alone, and the caller's
    random stream is left as it was."""
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model
