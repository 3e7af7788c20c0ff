"""Best of N: draw N candidates per output and keep the one a score prefers.

One mechanism serves both selections of the papers:
  unCLIP's prior (Ramesh et al. 2022, sec. 2.2)   N embeddings, the largest z_i . z_t kept
  CLIP reranking (DALL-E, CogView)                N images, the highest CLIP score kept
Candidate 0 is the stage's own draw (so N = 1 changes nothing); candidate c >= 1 is drawn with
fold_in(fold_in(stage key, stream), c), so no draw depends on the batch or the device count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from t2i_jax import sharding as mesh_lib

RERANK_STREAM = 17  # candidate c >= 1 of a reranked image: fold_in(fold_in(job key, 17), c)
PRIOR_STREAM = 19   # prior candidate c >= 1: fold_in(fold_in(stage key, 19), c)


@dataclasses.dataclass(frozen=True)
class BestOf:
    """A stage's selection: n candidates, their key stream, the score of a call's rows
    (score_for(cond, rows_of) -> (x [B, ...] -> [B]), rows_of(per-prompt rows [P, ...]) -> this
    call's rows on its devices) and the names its records give the winner and its score."""
    n: int
    stream: int
    score_for: Callable
    names: tuple             # the records' keys of the winner and its score, in their order
    finite_only: bool = False  # a non-finite score is recorded as None (no text to score)

    def select(self, draw: Callable, cond, rows_of: Callable, rng: jax.Array, first: jax.Array):
        """(the kept candidates [B, ...], their index [B], their score [B]) for one call."""
        return best_of(draw, self.score_for(cond, rows_of), first, self.n, rng, self.stream)

    def records(self, won, score) -> list:
        """Per row, the record fields of its selection (names: "..._candidate", "..._score")."""
        out = []
        for c, sc in zip(won, score):
            sc = None if self.finite_only and not math.isfinite(sc) else float(sc)
            out.append({k: (int(c) if k.endswith("_candidate") else sc) for k in self.names})
        return out


def best_of(draw: Callable, score: Callable, first: jax.Array, n: int, rng: jax.Array,
            stream: int):
    """Of n candidates per row (candidate 0 is `first`, candidate c >= 1 is draw(key_c)), the one
    with the largest score(x) [B], the first of ties; a NaN score never wins over candidate 0:
    (x [B, ...], winning candidate [B] int32, its score [B])."""
    best_x, best = first, score(first)
    won = jnp.zeros(best.shape, jnp.int32)
    for c in range(1, n):
        key = jax.random.fold_in(jax.random.fold_in(rng, stream), c)
        x = draw(mesh_lib.put(key, rng.sharding))
        sc = score(x)
        better = sc > best  # False for NaN: a non-finite candidate or no text never wins
        best_x = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x, best_x)
        won, best = jnp.where(better, c, won), jnp.where(better, sc, best)
    return best_x, won, best
