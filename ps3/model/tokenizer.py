"""Caption tokenizers: a SentencePiece ``.model`` or ``tokenizers`` JSON file from a path or URI.

The released SigLIP tokenizer is a SentencePiece model used with the ``canonicalize``
cleaning (lower-case, punctuation removed, ``_`` to space, whitespace collapsed); ids are
truncated to ``context_length - 1``, followed by EOS, then padded with EOS for SentencePiece
models (SigLIP's convention, whatever the model's `<pad>` piece) and with the pad piece of a
``tokenizers`` file (EOS when it has none). Nothing is fetched from a hub: the spec names the file.

``train_tiny_tokenizer`` builds a word-level ``tokenizers`` model from captions, offline,
saves it as JSON and returns it through the same loader, so tests and the quickstart use
exactly the code path a real run uses.
"""

from __future__ import annotations

import html
import re
import string
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

import fsspec
import torch

__all__ = ["Tokenizer", "TokenizerError", "canonicalize", "build_tokenizer", "train_tiny_tokenizer"]

Clean = Literal["canonicalize", "whitespace", "none"]
_PUNCT = str.maketrans("", "", string.punctuation)
_EOS_NAMES = ("</s>", "<eos>", "[SEP]", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or used; the message names the file."""


def canonicalize(text: str) -> str:
    """SigLIP ``canonicalize`` cleaning: unescape HTML, ``_`` -> space, drop punctuation, lower, squeeze spaces."""
    text = html.unescape(html.unescape(text)).replace("_", " ")
    text = text.translate(_PUNCT).lower()
    return re.sub(r"\s+", " ", text).strip()


def _clean(text: str, mode: Clean) -> str:
    if mode == "canonicalize":
        return canonicalize(text)
    if mode == "whitespace":
        return re.sub(r"\s+", " ", text).strip()
    return text


class _Backend(Protocol):
    """The two file formats reduced to what the wrapper needs."""

    pads_with_eos: bool

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def special(self, kind: Literal["eos", "pad"]) -> int | None: ...
    def vocab_size(self) -> int: ...


class _SentencePiece:
    #: SigLIP pads with EOS, not with the model's `<pad>` piece (big_vision `pad_value=1`; open_clip
    #: and HF's SiglipTokenizer do the same). The text tower pools the last position, so the
    #: pad id changes the features of a released checkpoint.
    pads_with_eos = True

    def __init__(self, blob: bytes) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=blob)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def special(self, kind: Literal["eos", "pad"]) -> int | None:
        # SentencePiece records its own EOS/PAD ids (-1 = absent).
        i = self.sp.eos_id() if kind == "eos" else self.sp.pad_id()
        return i if i >= 0 else None

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


class _HFTokenizers:
    pads_with_eos = False  # its own pad piece when it has one (the tiny tokenizer's `<pad>`)

    def __init__(self, blob: bytes) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_str(blob.decode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def special(self, kind: Literal["eos", "pad"]) -> int | None:
        for name in _EOS_NAMES if kind == "eos" else _PAD_NAMES:
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


class Tokenizer:
    """Texts -> fixed-length id tensors [B, context_length] for the text tower."""

    def __init__(self, backend: _Backend, *, context_length: int, clean: Clean = "canonicalize",
                 add_eos: bool = True, source: str = "") -> None:
        self.backend = backend
        self.context_length = context_length
        self.clean = clean
        self.source = source
        self.eos_id = backend.special("eos") if add_eos else None
        if add_eos and self.eos_id is None:
            raise TokenizerError(f"tokenizer {source}: no EOS token ({', '.join(_EOS_NAMES)}); pass add_eos=False")
        pad = None if backend.pads_with_eos else backend.special("pad")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        """Number of ids the model's token embedding must cover."""
        return self.backend.vocab_size()

    def encode(self, text: str) -> list[int]:
        """One caption -> exactly ``context_length`` ids (truncated, EOS, padded)."""
        ids = self.backend.encode(_clean(text, self.clean))
        if self.eos_id is not None:
            ids = ids[: self.context_length - 1] + [self.eos_id]
        ids = ids[: self.context_length]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """The caption of one row of ids (EOS and padding dropped): what evaluation pictures show."""
        ids = [int(i) for i in ids]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.backend.decode([i for i in ids if i != self.pad_id]).strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """A caption or a list of captions -> long [B, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long).reshape(len(texts), self.context_length)


def _read(path_or_uri: str) -> bytes:
    try:
        with fsspec.open(str(path_or_uri), "rb") as f:
            return f.read()
    except (FileNotFoundError, OSError) as exc:
        raise TokenizerError(f"cannot read tokenizer file {path_or_uri}: {exc}") from exc


def build_tokenizer(path_or_uri: str, *, context_length: int = 64, clean: Clean = "canonicalize",
                    add_eos: bool = True) -> Tokenizer:
    """Load a SentencePiece ``.model`` or a ``tokenizers`` ``.json`` from a local path or fsspec URI.

    The format is recognised from the content (JSON starts with ``{``), not the file name.
    """
    blob = _read(path_or_uri)
    try:
        backend: _Backend = _HFTokenizers(blob) if blob.lstrip()[:1] == b"{" else _SentencePiece(blob)
    except Exception as exc:  # both libraries raise their own (Rust / C++) error types
        raise TokenizerError(f"{path_or_uri} is neither a tokenizers JSON nor a SentencePiece model: {exc}") from exc
    return Tokenizer(backend, context_length=context_length, clean=clean, add_eos=add_eos, source=str(path_or_uri))


def train_tiny_tokenizer(captions: Iterable[str], path_or_uri: str, *, vocab_size: int = 1000,
                         context_length: int = 16, min_frequency: int = 1) -> Tokenizer:
    """Train a word-level tokenizer on (canonicalized) captions, save it as JSON, load it back.

    Ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``</s>``; words beyond ``vocab_size`` map to ``<unk>``.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=["<pad>", "<unk>", "</s>"])
    tok.train_from_iterator((canonicalize(c) for c in captions), trainer=trainer)
    with fsspec.open(str(path_or_uri), "w", auto_mkdir=True) as f:
        f.write(tok.to_str())
    return build_tokenizer(path_or_uri, context_length=context_length, clean="canonicalize")
