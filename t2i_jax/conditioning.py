"""The condition pytree, its null value, and condition dropout (classifier-free guidance).

A `Condition` holds either text tokens and their mask or class labels, plus `is_null` [B]. The
null condition is ONE thing chosen in the config and used both by training dropout and by
sampling:
  "empty_prompt": the tokens of "" ([BOS, EOS]); the model encodes them like any prompt;
  "learned":      the model replaces the text features of null rows by learned ones.
For class labels the null is the extra label `num_classes` (its own embedding row).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from t2i_jax.models import text

NULL_MODES = ("empty_prompt", "learned")


@struct.dataclass
class Condition:
    tokens: Optional[jax.Array] = None   # int32 [B, L]
    mask: Optional[jax.Array] = None     # bool [B, L]
    label: Optional[jax.Array] = None    # int32 [B]
    is_null: Optional[jax.Array] = None  # bool [B]

    @property
    def batch_size(self) -> int:
        return jax.tree_util.tree_leaves(self)[0].shape[0]


def text_condition(prompts: Sequence[str], max_length: int) -> Condition:
    """Returns the Condition of prompts (tokenized; truncation is reported by the tokenizer)."""
    tokens = text.tokenize(list(prompts), max_length)
    return Condition(tokens=jnp.asarray(tokens.ids), mask=jnp.asarray(tokens.mask),
                     is_null=jnp.zeros((len(prompts),), bool))


def class_condition(labels) -> Condition:
    labels = jnp.asarray(labels, jnp.int32)
    return Condition(label=labels, is_null=jnp.zeros(labels.shape, bool))


def null_condition(batch: int, *, max_length: Optional[int] = None,
                   num_classes: Optional[int] = None) -> Condition:
    """Returns the null Condition for `batch` rows: the empty prompt (text) or label num_classes.

    The empty prompt's tokens are also what a "learned" null replaces inside the model, so the
    same value serves both null modes.
    """
    if (max_length is None) == (num_classes is None):
        raise ValueError("pass max_length (text conditioning) or num_classes (class labels), not both.")
    is_null = jnp.ones((batch,), bool)
    if num_classes is not None:
        return Condition(label=jnp.full((batch,), num_classes, jnp.int32), is_null=is_null)
    empty = text.tokenize([""] * batch, max_length)
    return Condition(tokens=jnp.asarray(empty.ids), mask=jnp.asarray(empty.mask), is_null=is_null)


def drop_condition(cond: Condition, null: Condition, key: jax.Array, p_uncond) -> Condition:
    """Returns cond with each row replaced by the null condition with probability p_uncond
    (Ho & Salimans 2022, Alg. 1). null may have batch 1 or B; p_uncond may be traced."""
    return replace_rows(cond, null, jax.random.bernoulli(key, p_uncond, (cond.batch_size,)))


def replace_rows(cond: Condition, null: Condition, mask) -> Condition:
    """Returns cond with the rows where mask [B] is true replaced by null's (batch 1 or B)."""
    mask = jnp.asarray(mask)

    def pick(c, n):
        n = jnp.broadcast_to(n, c.shape)
        return jnp.where(mask.reshape((-1,) + (1,) * (c.ndim - 1)), n, c)

    return jax.tree_util.tree_map(pick, cond, null)


def check_null_mode(mode: str) -> None:
    if mode not in NULL_MODES:
        raise ValueError(f"unknown null condition {mode!r}; choose one of {NULL_MODES}.")


