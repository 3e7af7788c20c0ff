"""Tokenizers: prompts -> `Tokens(ids [B, L] int32, mask [B, L] bool, truncated [B] bool)`.

Every text model reads its prompts through one of these, so the data pipeline, the conditions,
sample.py and the guides never know which:
  ByteTokenizer   the byte-level tokenizer of the jointly trained encoder (models/text.py);
  T5Tokenizer     T5's SentencePiece model (`spiece.model`), for models/t5.py;
  CLIPTokenizer   CLIP's byte-level BPE (`tokenizer.json`, or `vocab.json` + `merges.txt`),
                  conditioning/clip_tokenizer.py, for models/hf_clip.py.
A prompt that does not fit is cut and reported the same way by all of them: `truncated` in the
result, and (warn=True) one warning naming how many prompts were cut and how to keep them whole.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import NamedTuple, Protocol, Sequence

import numpy as np

# The byte-level tokenizer (GLIDE's jointly trained encoder, models/text.py). Token ids:
# PAD = 0, BOS = 1, EOS = 2, and byte b -> b + 3 (vocabulary 259). A prompt becomes
# [BOS, bytes..., EOS, PAD...] of fixed length; a prompt that does not fit is cut at a UTF-8
# character boundary and reported (a warning naming it, and `truncated` in the result).
PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


class Tokens(NamedTuple):
    ids: np.ndarray        # int32 [B, L]
    mask: np.ndarray       # bool [B, L], True on BOS, bytes and EOS
    truncated: np.ndarray  # bool [B], True where the prompt was cut to fit


def fit_utf8(data: bytes, room: int) -> bytes:
    """Returns the longest prefix of UTF-8 `data` of at most `room` bytes that ends on a character."""
    if len(data) <= room:
        return data
    cut = room
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues a character: step back
        cut -= 1
    return data[:cut]


def tokenize(texts: Sequence[str], max_length: int = 16, warn: bool = True) -> Tokens:
    """Returns the byte tokens of each text, [BOS, UTF-8 bytes, EOS] padded to max_length."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a list of prompts; wrap a single prompt as [prompt].")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for BOS and EOS (>= 2), got {max_length}.")
    ids = np.full((len(texts), max_length), PAD, np.int32)
    truncated = np.zeros((len(texts),), bool)
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        kept = fit_utf8(data, max_length - 2)
        truncated[i] = len(kept) < len(data)
        row = [BOS] + [b + BYTE_OFFSET for b in kept] + [EOS]
        ids[i, :len(row)] = row
    if warn and truncated.any():
        warnings.warn(truncation_line(texts, truncated, max_length - 2, "UTF-8 bytes",
                                      "raise the text length in the config to keep them whole"),
                      stacklevel=2)
    return Tokens(ids, ids != PAD, truncated)


def detokenize(ids) -> list:
    """Returns the texts of token rows [B, L] (inverse of tokenize up to truncation)."""
    out = []
    for row in np.asarray(ids):
        data = bytes(int(v) - BYTE_OFFSET for v in row if v >= BYTE_OFFSET)
        out.append(data.decode("utf-8", errors="replace"))
    return out




class Tokenizer(Protocol):
    name: str          # "byte", "t5", "clip"
    max_length: int    # L: every row has exactly this many ids
    vocab_size: int    # ids are < vocab_size

    def __call__(self, texts: Sequence[str], warn: bool = True) -> Tokens: ...


def check_texts(texts) -> list:
    if isinstance(texts, str):
        raise TypeError("a tokenizer takes a list of prompts; wrap a single prompt as [prompt].")
    return list(texts)


def report_truncation(texts: Sequence[str], truncated, max_length: int, unit: str,
                      fix: str = "raise the text length in the config to keep them whole") -> None:
    """The one warning every tokenizer gives for prompts cut to fit max_length (`unit`: what
    max_length counts, e.g. "UTF-8 bytes" or "T5 tokens")."""
    truncated = np.asarray(truncated)
    if truncated.any():
        warnings.warn(truncation_line(texts, truncated, max_length, unit, fix), stacklevel=3)


def truncation_line(texts: Sequence[str], truncated, max_length: int, unit: str, fix: str) -> str:
    """One line, however long the prompts: how many were cut, the first (its start and length)."""
    idx = np.flatnonzero(np.asarray(truncated))
    first = texts[idx[0]]
    quote = repr(first if len(first) <= 60 else first[:57] + "...")
    return (f"{len(idx)} prompt(s) longer than {max_length} {unit} were truncated (e.g. prompt "
            f"{idx[0]}, {len(first)} characters: {quote}); {fix}.")


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """[BOS, UTF-8 bytes, EOS, PAD...]: the trained encoder's tokenizer (models/text.py)."""
    max_length: int = 16
    name = "byte"
    vocab_size = VOCAB_SIZE

    def __call__(self, texts: Sequence[str], warn: bool = True) -> Tokens:
        return tokenize(check_texts(texts), self.max_length, warn=warn)

    def decode(self, ids) -> list:
        return detokenize(ids)


# T5's special ids (spiece.model's pad and </s>; unk is the trainer's)
T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2


class T5Tokenizer:
    """T5's SentencePiece tokenizer: [pieces..., EOS, PAD...] rows of max_length, as
    transformers' T5TokenizerFast(truncation=True, max_length) cuts them (EOS kept last)."""
    name = "t5"

    def __init__(self, processor, max_length: int, vocab_size: int, path: str = "spiece.model"):
        if max_length < 1:
            raise ValueError(f"max_length must leave room for EOS (>= 1), got {max_length}.")
        pieces = processor.get_piece_size()
        if pieces > vocab_size:
            raise ValueError(f"tokenizer does not match the model's vocabulary: {path} has {pieces} "
                             f"pieces, more than the model's vocab_size {vocab_size}.")
        if (processor.pad_id(), processor.eos_id()) != (T5_PAD_ID, T5_EOS_ID):
            raise ValueError(f"{path} has pad_id {processor.pad_id()} and eos_id {processor.eos_id()}; "
                             f"T5 models expect pad_id {T5_PAD_ID} and eos_id {T5_EOS_ID} (</s>).")
        self._sp = processor
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)

    @classmethod
    def from_dir(cls, directory: str, max_length: int, vocab_size: int) -> "T5Tokenizer":
        """The tokenizer of `directory/spiece.model`, checked against the model's vocab_size."""
        import sentencepiece as spm
        path = os.path.join(directory, "spiece.model")
        if not os.path.isfile(path):
            raise ValueError(f"no {path}: a T5 directory needs its SentencePiece model `spiece.model` "
                             "(as published with the checkpoint) to tokenize prompts.")
        try:
            processor = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:  # sentencepiece's parse failure is a RuntimeError
            from t2i_jax.errors import short_cause
            raise ValueError(f"{path} is not a readable SentencePiece model ({short_cause(e, 120)})"
                             ": it is damaged or truncated; copy it again from the checkpoint's "
                             "publisher.") from None
        return cls(processor, max_length, vocab_size, path)

    def __call__(self, texts: Sequence[str], warn: bool = True) -> Tokens:
        texts = check_texts(texts)
        ids = np.full((len(texts), self.max_length), T5_PAD_ID, np.int32)
        lengths = np.zeros((len(texts),), np.int64)
        truncated = np.zeros((len(texts),), bool)
        room = self.max_length - 1
        for i, pieces in enumerate(self._sp.encode(texts, out_type=int) if texts else []):
            truncated[i] = len(pieces) > room
            row = list(pieces[:room]) + [T5_EOS_ID]
            ids[i, :len(row)] = row
            lengths[i] = len(row)
        if warn:
            report_truncation(texts, truncated, self.max_length, "T5 tokens")
        mask = np.arange(self.max_length)[None, :] < lengths[:, None]  # [B, L]
        return Tokens(ids, mask, truncated)

    def decode(self, ids) -> list:
        """Returns the texts of rows [B, L]: pieces up to the first EOS (padding and ids past the
        SentencePiece model, i.e. T5's extra ids, are left out)."""
        out, size = [], self._sp.get_piece_size()
        for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]):
            row = [int(t) for t in row]
            row = row[:row.index(T5_EOS_ID)] if T5_EOS_ID in row else row
            out.append(self._sp.decode([t for t in row if t != T5_PAD_ID and t < size]))
        return out
