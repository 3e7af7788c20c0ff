"""A classifier of the clean embedded data, used to score generated images where no InceptionV3
weights are at hand (offline): its penultimate features give an FID-like Fréchet distance, its
predictions give text-image alignment.

  digits: the digit (10-way softmax); a generated image is aligned when the predicted digit is
          the one its prompt names (any phrasing, Chinese included).
  shapes: which (colour, shape, size) objects the scene contains (30 sigmoid outputs,
          multi-label); a generated image is aligned when the SET of predicted colour+shape
          pairs is the prompt's and every size the prompt names is among the predictions ("a
          small red circle above a large blue square" needs a small red circle, a large blue
          square and no other kind of object). Sets cannot count: two red circles read as one.
          The spatial relation is not scored.
          Prompts with a held-out pair (red triangle, blue circle, yellow square: never seen in
          training the generator) are scored separately: compositional generalisation.

The classifier is trained on the data set at the generator's resolution, with the generator's
preprocessing (t2i_jax.data.load_split): digits on `train`, scored on `test`; shapes on `train`
plus 1500 extra scenes drawn like `heldout` from indices the split never uses (the evaluator
must know the held-out pairs; the generator never sees them), scored on `test` and `heldout`. Training is deterministic
(seeded) and its result is cached as an .npz next to its accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import zipfile
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t2i_jax import files

FEATURE_DIM = 128
KINDS = ("digits", "shapes")


class FeatureNet(nn.Module):
    """conv-conv-pool-conv-conv-pool-dense(128) -> outputs; (features, logits)."""
    num_outputs: int
    width: int = 32

    @nn.compact
    def __call__(self, x):
        for mult in (1, 2):
            for _ in range(2):
                x = nn.relu(nn.Conv(self.width * mult, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(self.num_outputs)(features)


def kind_of(data_config) -> str:
    name = data_config.name
    if name not in KINDS:
        raise ValueError(f"the classifier evaluator covers the embedded data sets {KINDS}, not "
                         f"{name!r}; for other data use FID with InceptionV3 "
                         "(t2i_jax/evaluation/inception.py).")
    return name


# ---------------------------------------------------------------- prompts -> targets

def _digit_targets() -> dict:
    from t2i_jax.data import digits
    return {c.strip().lower(): d for d in range(10) for c in digits.captions(d)}


NUM_SHAPE_OUTPUTS = 30  # (colour c, shape s, size z) -> output (c * 3 + s) * 2 + z


def shape_objects(prompt: str) -> Optional[frozenset]:
    """The (colour, shape, size or None) index triples a shapes prompt names, or None."""
    from t2i_jax.data import shapes
    pattern = r"\b(?:(%s)\s+)?(%s)\s+(%s)\b" % ("|".join(shapes.SIZES), "|".join(shapes.COLOURS),
                                               "|".join(shapes.SHAPES))
    found = re.findall(pattern, prompt.lower())
    if not found:
        return None
    return frozenset((shapes.COLOURS.index(c), shapes.SHAPES.index(s),
                      shapes.SIZES.index(z) if z else None) for z, c, s in found)


def shape_pairs(prompt: str) -> Optional[frozenset]:
    """The (colour, shape) index pairs a shapes prompt names, or None if it names none."""
    objects = shape_objects(prompt)
    return None if objects is None else frozenset((c, s) for c, s, _ in objects)


def objects_match(predicted: frozenset, target: frozenset) -> bool:
    """Same colour+shape pairs, and every size the target names is among the predictions."""
    if {(c, s) for c, s, _ in predicted} != {(c, s) for c, s, _ in target}:
        return False
    return all(t in predicted for t in target if t[2] is not None)


def target_of(kind: str, prompt: str):
    """digits: the digit a prompt names (or None); shapes: its objects (shape_objects) or None."""
    if kind == "digits":
        return _digit_targets().get(prompt.strip().lower())
    return shape_objects(prompt)


def is_held_out_prompt(prompt: str) -> bool:
    from t2i_jax.data import shapes
    pairs = shape_pairs(prompt) or frozenset()
    return any(shapes.is_held_out(c, s) for c, s in pairs)


# ---------------------------------------------------------------- the evaluator

@dataclasses.dataclass
class Evaluator:
    kind: str
    params: dict
    accuracy: float          # on the evaluator's own held-out images (see the module docstring)

    @property
    def net(self) -> FeatureNet:
        return FeatureNet(num_outputs=10 if self.kind == "digits" else NUM_SHAPE_OUTPUTS)

    def apply(self, images, batch: int = 512):
        """(features [N, 128], logits [N, K]) of images [-1, 1] float or uint8 NHWC."""
        x = np.asarray(images)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 127.5 - 1.0
        fn = _apply_fn(self.net)
        feats, logits = [], []
        for s in range(0, len(x), batch):
            f, lg = fn(self.params, jnp.asarray(x[s:s + batch], jnp.float32))
            feats.append(np.asarray(f))
            logits.append(np.asarray(lg))
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        return self.apply(images)[0]

    def read(self, logits):
        """Predictions from logits: digits int [N]; shapes bool [N, 30] (object (c * 3 + s) * 2
        + size present)."""
        return logits.argmax(-1) if self.kind == "digits" else logits > 0.0

    def predict(self, images):
        return self.read(self.apply(images)[1])

    def aligned(self, images, prompts: Sequence[str], logits=None) -> np.ndarray:
        """float [N]: 1 where the prediction matches the prompt, 0 where not, NaN where the
        prompt names nothing this evaluator knows (e.g. the empty prompt). Pass the images'
        logits (from apply) when already computed, so the network does not run again."""
        pred = self.predict(images) if logits is None else self.read(logits)
        out = np.full(len(prompts), np.nan)
        for i, p in enumerate(prompts):
            t = target_of(self.kind, p)
            if t is None:
                continue
            if self.kind == "digits":
                out[i] = float(pred[i] == t)
            else:
                got = frozenset((int(j) // 6, int(j) // 2 % 3, int(j) % 2)
                                for j in np.flatnonzero(pred[i]))
                out[i] = float(objects_match(got, t))
        return out


@functools.cache
def _apply_fn(net: FeatureNet):
    """One jitted apply per network shape (flax modules hash by their fields)."""
    return jax.jit(net.apply)


def _targets(kind: str, split: dict) -> np.ndarray:
    if kind == "digits":
        return split["label"].astype(np.int32)
    y = np.zeros((len(split["image"]), NUM_SHAPE_OUTPUTS), np.float32)
    for i in range(len(y)):
        for k in range(int(split["num_shapes"][i])):
            c, s, z = (int(split[key][i][k]) for key in ("colour", "shape", "size"))
            y[i, (c * 3 + s) * 2 + z] = 1.0
    return y


def evaluator_data(data_config) -> tuple:
    """((train images, targets), (eval images, targets)) as the module docstring describes."""
    from t2i_jax import data as data_lib
    kind = kind_of(data_config)
    if kind == "digits":
        tr, ev = data_lib.load_split(data_config, "train"), data_lib.load_split(data_config, "test")
        return (tr["image"], _targets(kind, tr)), (ev["image"], _targets(kind, ev))
    tr, te, ho = (data_lib.load_split(data_config, s) for s in ("train", "test", "heldout"))
    extra = extra_heldout_scenes(data_config, EXTRA_HELDOUT)
    train = (np.concatenate([tr["image"], extra["image"]]),
             np.concatenate([_targets(kind, tr), _targets(kind, extra)]))
    evals = (np.concatenate([te["image"], ho["image"]]),
             np.concatenate([_targets(kind, te), _targets(kind, ho)]))
    return train, evals


EXTRA_HELDOUT = 1500          # procedurally drawn held-out-pair scenes for the evaluator only
EXTRA_HELDOUT_START = 100_000  # their indices in the generator's "heldout" stream (the split has 0..299)


def extra_heldout_scenes(data_config, n: int) -> dict:
    """n scenes drawn like the `heldout` split but with indices the split never uses, rendered
    natively at data.image_size and processed as load_split does: the evaluator learns the
    held-out pairs without seeing the official heldout images it is scored on (and the generator
    never sees any of them)."""
    from t2i_jax.data import shapes
    from t2i_jax.data.pipeline import process_image
    rows = [shapes.example("heldout", EXTRA_HELDOUT_START + i, image_size=int(data_config.image_size))
            for i in range(n)]
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in ("num_shapes", "colour", "shape", "size")}
    out["image"] = np.stack([process_image(r["image"], data_config.image_size, data_config.channels)
                             for r in rows])
    return out


# (steps, learning rate) per data set (accuracies in docs/architecture.md).
TRAINING = {"digits": (800, 1e-3), "shapes": (2000, 2e-3)}


def train_evaluator(data_config, *, seed: int = 0, steps: Optional[int] = None,
                    batch_size: int = 64, learning_rate: Optional[float] = None,
                    noise_std: float = 0.05) -> Evaluator:
    """Trains the classifier (Adam; Gaussian pixel noise of noise_std as the only augmentation,
    so slightly imperfect generated images are still read); returns it with its accuracy
    (digits: fraction right; shapes: fraction whose whole set of objects, sizes included, is
    right)."""
    kind = kind_of(data_config)
    steps = TRAINING[kind][0] if steps is None else steps
    learning_rate = TRAINING[kind][1] if learning_rate is None else learning_rate
    (x_tr, y_tr), (x_ev, y_ev) = evaluator_data(data_config)
    net = FeatureNet(num_outputs=10 if kind == "digits" else NUM_SHAPE_OUTPUTS)
    key = jax.random.key(seed)
    params = net.init(key, jnp.zeros((1,) + x_tr.shape[1:], jnp.float32))
    tx = optax.adam(learning_rate)

    def loss_fn(p, x, y):
        logits = net.apply(p, x)[1]
        if kind == "digits":
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    @jax.jit
    def step(p, opt, x, y, k):
        x = x + noise_std * jax.random.normal(k, x.shape)
        g = jax.grad(loss_fn)(p, x, y)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt

    opt = tx.init(params)
    rng = np.random.default_rng(seed)
    x_tr, y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
    for i in range(steps):
        b = rng.integers(0, len(x_tr), batch_size)
        params, opt = step(params, opt, x_tr[b], y_tr[b], jax.random.fold_in(key, i))
    ev = Evaluator(kind, jax.device_get(params), float("nan"))
    pred = ev.predict(x_ev)
    acc = (pred == y_ev).mean() if kind == "digits" else (pred == (y_ev > 0.5)).all(-1).mean()
    ev.accuracy = float(acc)
    return ev


def cache_path(directory: str, data_config) -> str:
    return os.path.join(directory, f"evaluator_{data_config.name}_{data_config.image_size}px.npz")


def load_or_train(data_config, directory: str, *, seed: int = 0) -> Evaluator:
    """The evaluator cached in `directory` (trained and saved there on first use)."""
    path = cache_path(directory, data_config)
    kind = kind_of(data_config)
    if os.path.exists(path):
        try:
            tree = files.load_tree_npz(path)
            return Evaluator(kind, tree["variables"], float(tree["accuracy"]))
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            print(f"[t2i_jax] the cached evaluator {path} is unreadable ({type(e).__name__}: "
                  f"{e}); training it again.", file=sys.stderr)
    ev = train_evaluator(data_config, seed=seed)
    save_evaluator(path, ev)
    return ev


def save_evaluator(path: str, ev: Evaluator) -> None:
    files.save_tree_npz(path, {"variables": ev.params, "accuracy": np.float64(ev.accuracy)})
