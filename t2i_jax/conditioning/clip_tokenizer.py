"""CLIP's byte-level BPE tokenizer (Radford et al. 2021) from the publisher's files, with the
`tokenizers` package: `tokenizer.json`, or `vocab.json` + `merges.txt` built into CLIP's pipeline
as transformers' CLIPConverter builds it. Rows [BOS, tokens..., EOS, PAD...]; models/hf_clip.py
has the towers that read them.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from t2i_jax.conditioning.tokenizers import Tokens, check_texts, report_truncation

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern (transformers' CLIPConverter): contractions, letter runs, single digits, and
# runs of anything else but whitespace.
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_chars() -> dict:
    """byte -> the printable character byte-level BPE writes it as (GPT-2's and CLIP's table, in
    their order: printable Latin-1 bytes as themselves, then the rest as U+0100 on)."""
    table = {b: chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return table


def clip_pipeline(tok):
    """Sets CLIP's normaliser, pre-tokeniser and decoder on a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def clip_bpe(vocab: dict, merges: Sequence[Tuple[str, str]], unk_token: str = EOS_TOKEN):
    """Returns a `tokenizers.Tokenizer` with CLIP's pipeline on a BPE vocabulary, as transformers'
    CLIPConverter builds it: NFC, whitespace runs -> " ", lowercase; split on CLIP_PATTERN
    (removed, inverted) then byte-level; BPE with end-of-word suffix "</w>". No post-processor."""
    from tokenizers import Tokenizer, models
    return clip_pipeline(Tokenizer(models.BPE(
        vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
        continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token)))


def _read(reader, *paths):
    """reader(*paths), with a damaged file named in a ValueError (the tokenizers library raises
    a bare Exception from Rust)."""
    try:
        return reader(*paths)
    except Exception as e:  # noqa: BLE001
        from t2i_jax.errors import short_cause
        raise ValueError(f"{' / '.join(paths)}: not a readable tokenizer file ({short_cause(e, 120)}"
                         "): it is damaged or truncated; copy it again from the checkpoint's "
                         "publisher.") from None


def _json(path: str):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    return d


def _special_tokens(directory: str) -> dict:
    """bos/eos/unk/pad token strings: tokenizer_config.json, then special_tokens_map.json (which
    wins), else CLIP's (openai's pads with <|endoftext|>)."""
    out = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, file)
        if os.path.isfile(path):
            d = _read(_json, path)
            for key in out:
                value = d.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    out[key] = value
    return out


class CLIPTokenizer:
    """CLIP's byte-level BPE: rows [BOS, tokens..., EOS, PAD...] of max_length, cut as
    transformers' CLIPTokenizer(truncation=True, max_length) cuts them (EOS kept last); mask True
    up to and including the first EOS."""
    name = "clip"

    def __init__(self, bpe, max_length: int = 77, vocab_size: Optional[int] = None,
                 specials: Optional[dict] = None, path: str = "tokenizer"):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS (>= 2), got {max_length}.")
        size = bpe.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and size > vocab_size:
            raise ValueError(f"tokenizer does not match the model's vocabulary: {path} has {size} "
                             f"tokens, more than the model's vocab_size {vocab_size}.")
        specials = dict(specials or {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN})
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            ids[key] = bpe.token_to_id(specials[key])
            if ids[key] is None:
                raise ValueError(f"{path} has no token {specials[key]!r} (its {key}).")
        bpe.no_padding()     # a tokenizer.json may carry its own padding or truncation: rows are
        bpe.no_truncation()  # made here
        self._bpe = bpe
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.max_length = int(max_length)
        self.vocab_size = int(size if vocab_size is None else vocab_size)

    @classmethod
    def from_dir(cls, directory: str, max_length: int = 77,
                 vocab_size: Optional[int] = None) -> "CLIPTokenizer":
        """The tokenizer of `directory`: `tokenizer.json` if present, else `vocab.json` +
        `merges.txt` with CLIP's pipeline (clip_bpe) and the special tokens as added tokens, as
        transformers' CLIPTokenizerFast builds it from the slow files."""
        from tokenizers import AddedToken, Tokenizer, models
        specials = _special_tokens(directory)
        path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(path):
            return cls(_read(Tokenizer.from_file, path), max_length, vocab_size, specials, path)
        vocab_path, merges_path = (os.path.join(directory, n) for n in ("vocab.json", "merges.txt"))
        if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
            raise ValueError(f"{directory} has no CLIP tokenizer: it needs tokenizer.json, or "
                             "vocab.json and merges.txt (as published with the checkpoint; for "
                             "Stable Diffusion, its tokenizer/ folder).")
        vocab, merges = _read(models.BPE.read_file, vocab_path, merges_path)
        bpe = clip_bpe(vocab, merges, specials["unk_token"])
        bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys(specials.values())])
        return cls(bpe, max_length, vocab_size, specials, vocab_path)

    def __call__(self, texts: Sequence[str], warn: bool = True) -> Tokens:
        texts = check_texts(texts)
        n, room = len(texts), self.max_length - 2
        ids = np.full((n, self.max_length), self.pad_id, np.int32)
        mask = np.zeros((n, self.max_length), bool)
        truncated = np.zeros((n,), bool)
        for i, text in enumerate(texts):  # one by one: no rayon threads before a later fork
            body = self._bpe.encode(text, add_special_tokens=False).ids
            truncated[i] = len(body) > room
            row = [self.bos_id] + body[:room] + [self.eos_id]
            ids[i, :len(row)] = row
            mask[i, :row.index(self.eos_id) + 1] = True  # a prompt may itself hold <|endoftext|>
        if warn:
            report_truncation(texts, truncated, room, "CLIP tokens",
                              fix=f"CLIP reads {self.max_length} tokens with BOS and EOS; shorten "
                                  "the prompts to keep them whole")
        return Tokens(ids, mask, truncated)

    def decode(self, ids) -> list:
        """Returns the texts of rows [B, L]: the tokens between BOS and the first EOS, bytes
        decoded, "</w>" as a space (as CLIP's decoder; lowercased and whitespace-normalised)."""
        byte_of = {c: b for b, c in byte_chars().items()}
        out = []
        for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]):
            row = [int(t) for t in row]
            row = row[1:] if row and row[0] == self.bos_id else row
            row = row[:row.index(self.eos_id)] if self.eos_id in row else row
            text = "".join(self._bpe.id_to_token(t) or "" for t in row)
            data = bytes(byte_of[c] for c in text if c in byte_of)
            out.append(data.decode("utf-8", errors="replace").replace("</w>", " ").strip())
        return out


