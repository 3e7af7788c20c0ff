"""Tokenizers: prompts -> `Tokens(ids [B, L] int32, mask [B, L] bool, truncated [B] bool)`.

Every text model reads its prompts through one of these, so the data pipeline, the conditions,
sample.py and the guides never know which:
  ByteTokenizer   the byte-level tokenizer of the jointly trained encoder (models/text.py);
  T5Tokenizer     T5's SentencePiece model (`spiece.model`), models/t5.py;
  CLIPTokenizer   CLIP's byte-level BPE (`tokenizer.json`, or `vocab.json` + `merges.txt`),
                  models/hf_clip.py.
A prompt that does not fit is cut and reported the same way by all of them: `truncated` in the
result, and (warn=True) one warning naming how many prompts were cut and how to keep them whole.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Protocol, Sequence

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
    import numpy as np
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
