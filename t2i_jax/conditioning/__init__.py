"""Conditions: what a model is conditioned on, its null, dropout, and prompt -> condition through
the model's tokenizer.

  conditions.py      Condition, Conditioning, the null, dropout of rows and parts
  tokenizers.py      the Tokenizer protocol, ByteTokenizer, T5Tokenizer (SentencePiece)
  clip_tokenizer.py  CLIPTokenizer (byte-level BPE)
"""

from t2i_jax.conditioning.clip_tokenizer import CLIPTokenizer
from t2i_jax.conditioning.conditions import (
    KINDS, NULL_MODES, PARTS, UNDROPPED, Condition, Conditioning, check_null_mode,
    class_condition, drop_condition, drop_parts, keep_undropped, null_condition, null_embedding,
    replace_rows, text_condition)
from t2i_jax.conditioning.tokenizers import ByteTokenizer, T5Tokenizer, Tokenizer

__all__ = ["KINDS", "NULL_MODES", "PARTS", "UNDROPPED", "Condition", "Conditioning",
           "check_null_mode", "class_condition", "drop_condition", "drop_parts", "keep_undropped",
           "null_condition", "null_embedding", "replace_rows", "text_condition", "ByteTokenizer",
           "T5Tokenizer", "CLIPTokenizer", "Tokenizer"]
