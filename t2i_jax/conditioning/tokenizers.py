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
from typing import Protocol, Sequence

import numpy as np

from t2i_jax.models import text
from t2i_jax.models.text import Tokens


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
        cut = [texts[i] for i in np.flatnonzero(truncated)[:3]]
        warnings.warn(f"{int(truncated.sum())} prompt(s) longer than {max_length} {unit} were "
                      f"truncated (e.g. {cut!r}); {fix}.", stacklevel=3)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """[BOS, UTF-8 bytes, EOS, PAD...]: the trained encoder's tokenizer (models/text.py)."""
    max_length: int = 16
    name = "byte"
    vocab_size = text.VOCAB_SIZE

    def __call__(self, texts: Sequence[str], warn: bool = True) -> Tokens:
        return text.tokenize(check_texts(texts), self.max_length, warn=warn)

    def decode(self, ids) -> list:
        return text.detokenize(ids)


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
        return cls(spm.SentencePieceProcessor(model_file=path), max_length, vocab_size, path)

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
