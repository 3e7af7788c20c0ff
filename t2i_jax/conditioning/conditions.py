"""The condition pytree, its null value, and condition dropout (classifier-free guidance).

A `Condition` holds text tokens and their mask, or class labels, or nothing, plus `is_null` [B];
a super-resolution stage's also holds its low-resolution image and augmentation level, which
classifier-free guidance never drops (Imagen: CFG drops the text, not the image).
`Conditioning` is the ONE place that decides, from a model's config, what the model is
conditioned on: how a training batch and a list of prompts become a Condition (through the
model's tokenizer: bytes, T5's SentencePiece or CLIP's BPE; conditioning/tokenizers.py), and
what the null is. Training dropout, the progress grids, sampling jobs and guides all go through it.
The null condition is ONE thing chosen in the config and used both by training dropout and by
sampling:
  "empty_prompt": the tokens of "" ([BOS, EOS]); the model encodes them like any prompt;
  "learned":      the model replaces the text features of null rows by learned ones.
For class labels the null is the extra label `num_classes` (its own embedding row).
A negative prompt (sampling only) replaces the null in classifier-free guidance's unconditional
branch, per row: `negative` holds those rows as a Condition of their own (an empty negative
prompt is the null row), and the sampler encodes them in place of the null.
A model on a frozen pretrained text encoder (T5, CLIP) reads `features` / `pooled`, the
encoder's output for the tokens (computed in the step or read from a cache of the data set's
captions); its null is the encoding of the empty prompt (families/frozen_text.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from t2i_jax.conditioning.tokenizers import ByteTokenizer

NULL_MODES = ("empty_prompt", "learned")
KINDS = ("text", "label", "none")  # what a model is conditioned on


@struct.dataclass
class Condition:
    tokens: Optional[jax.Array] = None   # int32 [B, L]
    mask: Optional[jax.Array] = None     # bool [B, L]
    label: Optional[jax.Array] = None    # int32 [B]
    is_null: Optional[jax.Array] = None  # bool [B]
    low_res: Optional[jax.Array] = None  # float32 [B, h, w, C] in [-1, 1] (SR stages)
    aug_level: Optional[jax.Array] = None  # float32 [B]: its noise-augmentation level in [0, 1)
    embedding: Optional[jax.Array] = None  # float32 [B, E]: a CLIP image embedding (unCLIP's
                                           # decoder); the null is the zero vector
    features: Optional[jax.Array] = None   # float32 [B, L, D]: a frozen text encoder's tokens
    pooled: Optional[jax.Array] = None     # float32 [B, P]: and its pooled vector
    known: Optional[jax.Array] = None      # float32 [B, H, W, C] in [-1, 1]: the image to inpaint
    known_mask: Optional[jax.Array] = None  # float32 [B, H, W, 1]: 1 where known, 0 to regenerate
    init_image: Optional[jax.Array] = None  # float32 [B, H, W, C] in [-1, 1]: img2img's start
    negative: Optional["Condition"] = None  # the null branch's rows of CFG: negative prompts

    @property
    def batch_size(self) -> int:
        return jax.tree_util.tree_leaves(self)[0].shape[0]


def text_condition(prompts: Sequence[str], max_length=None, *, tokenizer=None,
                   tokens=None) -> Condition:
    """Returns the Condition of prompts, tokenized by `tokenizer` (default: bytes to max_length;
    truncation is reported by the tokenizer), or of their given `tokens` (tokenized once)."""
    if tokens is None:
        tokenizer = ByteTokenizer(max_length) if tokenizer is None else tokenizer
        tokens = tokenizer(list(prompts))
    return Condition(tokens=jnp.asarray(tokens.ids), mask=jnp.asarray(tokens.mask),
                     is_null=jnp.zeros((len(prompts),), bool))


def class_condition(labels) -> Condition:
    labels = jnp.asarray(labels, jnp.int32)
    return Condition(label=labels, is_null=jnp.zeros(labels.shape, bool))


def null_condition(batch: int, *, max_length: Optional[int] = None,
                   num_classes: Optional[int] = None, tokenizer=None) -> Condition:
    """Returns the null Condition for `batch` rows: the empty prompt (text) or label num_classes.

    The empty prompt's tokens are also what a "learned" null replaces inside the model, so the
    same value serves both null modes.
    """
    if tokenizer is not None:
        max_length = tokenizer.max_length
    if (max_length is None) == (num_classes is None):
        raise ValueError("pass max_length (text conditioning) or num_classes (class labels), not both.")
    is_null = jnp.ones((batch,), bool)
    if num_classes is not None:
        return Condition(label=jnp.full((batch,), num_classes, jnp.int32), is_null=is_null)
    empty = (ByteTokenizer(max_length) if tokenizer is None else tokenizer)([""] * batch)
    return Condition(tokens=jnp.asarray(empty.ids), mask=jnp.asarray(empty.mask), is_null=is_null)


# parts of a condition the null keeps (never dropped): an SR stage's input, an inpainting's
# known image and mask (GLIDE: guidance drops the text, not the image)
UNDROPPED = ("low_res", "aug_level", "known", "known_mask")


def keep_undropped(null, cond):
    """Returns null (a Condition or an Encoded, batch 1 or B) with cond's parts that classifier-
    free guidance never drops (the low-resolution image and its level): the null row of an SR
    stage is "no text, the same image"."""
    return null.replace(**{k: getattr(cond, k) for k in UNDROPPED})


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


# The parts of a condition that are dropped independently (unCLIP's decoder drops its image
# embedding 10% and its text 50% of the time): part -> the Condition fields it replaces.
PARTS = {"text": ("tokens", "mask", "label", "is_null", "features", "pooled"),
         "embedding": ("embedding",)}


def drop_parts(cond: Condition, null: Condition, key: jax.Array, rates: dict) -> Condition:
    """Returns cond with each part of `rates` ({"text": p, "embedding": q}) replaced by null's,
    each row and part independently with its own probability (stream i of key for the i-th part
    of PARTS; rates may be traced)."""
    unknown = sorted(set(rates) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown condition parts {unknown}; the parts are {sorted(PARTS)}.")
    n = cond.batch_size
    for i, (part, fields) in enumerate(PARTS.items()):
        if part not in rates:
            continue
        drop = jax.random.bernoulli(jax.random.fold_in(key, i), rates[part], (n,))
        picked = {f: getattr(cond, f) for f in fields if getattr(cond, f) is not None}
        nulls = {f: getattr(null, f) for f in picked}
        swapped = replace_rows(Condition(**picked), Condition(**nulls), drop)
        cond = cond.replace(**{f: getattr(swapped, f) for f in picked})
    return cond


def null_embedding(batch: int, dim: int) -> jax.Array:
    """The null image embedding [batch, dim]: zeros (unCLIP sets the CLIP embedding to zero; a
    CLIP embedding is a unit vector, so zero is never a real one)."""
    return jnp.zeros((batch, dim), jnp.float32)


def check_null_mode(mode: str) -> None:
    if mode not in NULL_MODES:
        raise ValueError(f"unknown null condition {mode!r}; choose one of {NULL_MODES}.")




@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What one model is conditioned on ("text", "label" or "none") and what follows from it.

    text:  prompts are tokenized by `tokenizer` (default: bytes to max_length); the null is the
           empty prompt.
    label: prompts are class names of the data set (class_names[i] is label i); the null is
           the extra label len(class_names).
    none:  an unconditional model; every row is null (there is nothing to drop or guide with
           classifier-free guidance). Prompts are read by guides only.
    """
    kind: str
    max_length: int = 16
    class_names: tuple = ()
    dataset: str = ""
    embedding_dim: Optional[int] = None  # also conditioned on a CLIP image embedding [E]
    tokenizer: Any = dataclasses.field(default=None, compare=False)  # None: ByteTokenizer

    def __post_init__(self):
        if self.kind == "text":
            if self.tokenizer is None:
                object.__setattr__(self, "tokenizer", ByteTokenizer(self.max_length))
            object.__setattr__(self, "max_length", self.tokenizer.max_length)
        if self.kind not in KINDS:
            raise ValueError(f"unknown condition kind {self.kind!r}; choose one of {KINDS}.")
        if self.kind == "label" and not self.class_names:
            raise ValueError(f"a class-conditional model needs a data set with class labels; "
                             f"{self.dataset or 'this data set'} has none.")

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance applies (the model has a condition to drop)."""
        return self.kind != "none"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def null(self, batch: int = 1) -> Condition:
        """The null Condition for `batch` rows: what dropout inserts and sampling guides with
        (with an image embedding: the null text and the null embedding, both dropped)."""
        if self.kind == "text":
            null = null_condition(batch, tokenizer=self.tokenizer)
        elif self.kind == "label":
            null = null_condition(batch, num_classes=self.num_classes)
        else:
            null = Condition(is_null=jnp.ones((batch,), bool))
        return self._with_null_embedding(null)

    def _with_null_embedding(self, cond: Condition) -> Condition:
        if self.embedding_dim is None:
            return cond
        return cond.replace(embedding=null_embedding(cond.batch_size, self.embedding_dim))

    def of_batch(self, batch: dict) -> Condition:
        """The Condition a training batch carries (tokens/mask or label [B]; with a cache of a
        frozen encoder's features, text_features [B, L, D] and text_pooled [B, P] too)."""
        n = batch["image"].shape[0]
        if self.kind == "text":
            cond = Condition(tokens=batch["tokens"], mask=batch["mask"],
                             is_null=jnp.zeros((n,), bool),
                             features=batch.get("text_features"), pooled=batch.get("text_pooled"))
        elif self.kind == "label":
            cond = class_condition(batch["label"])
        else:
            return self.null(n)
        return self._with_null_embedding(cond)  # a decoder's family fills in the embedding

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuses prompts this model cannot take (a class-conditional model takes class names)."""
        if self.kind == "label":
            unknown = [p for p in prompts if p and p not in self.class_names]
            if unknown:
                raise ValueError(f"this model is class-conditional; {unknown} are not class names "
                                 f"of {self.dataset} (use one of {list(self.class_names)}, or "
                                 "'' for the null class).")

    def of_prompts(self, prompts: Sequence[str], tokens=None,
                   negative: Optional[Sequence[str]] = None) -> Condition:
        """One Condition row per prompt; an empty prompt is the null row (is_null). tokens: the
        prompts' Tokens from this model's tokenizer, when they were already tokenized.
        negative: one negative prompt per prompt (text models): the rows classifier-free
        guidance's unconditional branch reads in place of the null ("": the null itself)."""
        prompts = list(prompts)
        if negative is not None:
            if self.kind != "text":
                raise ValueError("a negative prompt needs a text-conditioned model; this one is "
                                 f"conditioned on {self.kind}.")
            negative = list(negative)
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts: "
                                 "give one for all, or one per prompt.")
            return self.of_prompts(prompts, tokens=tokens).replace(
                negative=self.of_prompts(negative))
        self.check_prompts(prompts)
        if self.kind == "none":
            return self.null(len(prompts))
        if self.kind == "text":
            cond = text_condition(prompts, tokenizer=self.tokenizer, tokens=tokens)
        else:
            cond = class_condition([self.class_names.index(p) if p else 0 for p in prompts])
        empty = jnp.asarray([not p for p in prompts])
        # With an image embedding: the null one, until a job gives each row its own.
        return replace_rows(self._with_null_embedding(cond), self.null(1), empty)

    def label_of(self, prompts: Sequence[str]):
        """The class indices [B] of prompts that are class names (a classifier guide's target)."""
        if not self.class_names:
            raise ValueError(f"{self.dataset} has no class labels.")
        unknown = [p for p in prompts if p not in self.class_names]
        if unknown:
            raise ValueError(f"{unknown} are not class names of {self.dataset}; the class names "
                             f"are {list(self.class_names)}.")
        return jnp.asarray([self.class_names.index(p) for p in prompts], jnp.int32)
