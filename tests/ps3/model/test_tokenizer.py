"""Tokenizers: SigLIP cleaning, SentencePiece and tokenizers-JSON files from paths/URIs, tiny trainer."""

from __future__ import annotations

import io

import fsspec
import pytest
import torch

from ps3.model.tokenizer import (
    TokenizerError,
    build_tokenizer,
    canonicalize,
    train_tiny_tokenizer,
)

CAPTIONS = [
    "A red sign that reads STOP.", "Small_text: 'open 24 hours' on a door!", "a blue car next to a red sign",
    "The receipt lists coffee, tea and bread.", "Green leaves; a tiny ladybug.",
]


def test_canonicalize_matches_siglip_rules():
    assert canonicalize("  Hello,   World!_Foo &amp; bar ") == "hello world foo bar"
    assert canonicalize("It's 3.5 m") == "its 35 m"


def test_tiny_tokenizer_trains_saves_and_reloads(tmp_path):
    path = tmp_path / "tok" / "tiny.json"
    tok = train_tiny_tokenizer(CAPTIONS, str(path), vocab_size=64, context_length=8)
    assert path.exists()
    ids = tok(["a red sign", "unseenword"])
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0, 3].item() == tok.eos_id and ids[0, -1].item() == tok.pad_id == 0
    assert ids[1, 0].item() == 1  # <unk>
    again = build_tokenizer(str(path), context_length=8)
    assert torch.equal(again(["a red sign"]), ids[:1])
    assert tok.vocab_size <= 64


def test_ids_decode_back_to_the_caption_in_both_formats(tmp_path):
    tiny = train_tiny_tokenizer(CAPTIONS, str(tmp_path / "t.json"), vocab_size=64, context_length=8)
    assert tiny.decode(tiny("a red sign")[0].tolist()) == "a red sign"
    (tmp_path / "spiece.model").write_bytes(_spm_model())
    spm = build_tokenizer(str(tmp_path / "spiece.model"), context_length=10)
    assert spm.decode(spm("A RED sign!")[0].tolist()) == "a red sign"  # canonicalised, EOS and padding gone


def test_truncation_keeps_eos_last(tmp_path):
    tok = train_tiny_tokenizer(CAPTIONS, str(tmp_path / "t.json"), context_length=4)
    ids = tok("a blue car next to a red sign")
    assert ids.shape == (1, 4) and ids[0, -1].item() == tok.eos_id


def _spm_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([canonicalize(c) for c in CAPTIONS] * 20), model_writer=buf,
                                   vocab_size=40, model_type="unigram", minloglevel=2)
    return buf.getvalue()


def test_sentencepiece_model_from_uri():
    blob = _spm_model()
    with fsspec.open("memory://tok/spiece.model", "wb") as f:
        f.write(blob)
    tok = build_tokenizer("memory://tok/spiece.model", context_length=10)
    ids = tok(["A RED sign!", "a red sign"])
    assert torch.equal(ids[0], ids[1])  # canonicalize happens before encoding
    assert ids[0].tolist().count(tok.eos_id) >= 1 and ids.shape == (2, 10)


def test_sentencepiece_pads_with_eos_like_siglip(tmp_path):
    """The SigLIP model has <pad>=0 and </s>=1, yet SigLIP pads with 1: so must we."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([canonicalize(c) for c in CAPTIONS] * 20), model_writer=buf,
                                   vocab_size=40, model_type="unigram", minloglevel=2,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (tmp_path / "spiece.model").write_bytes(buf.getvalue())
    tok = build_tokenizer(str(tmp_path / "spiece.model"), context_length=12)
    assert tok.backend.sp.pad_id() == 0 and tok.eos_id == 1
    ids = tok("a red sign")[0].tolist()
    first_eos = ids.index(1)
    assert ids[first_eos:] == [1] * (12 - first_eos)


def test_unreadable_or_wrong_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        build_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a tokenizer")
    with pytest.raises(TokenizerError, match="neither a tokenizers JSON nor a SentencePiece model"):
        build_tokenizer(str(bad))
