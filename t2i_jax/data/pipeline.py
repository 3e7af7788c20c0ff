"""The grain input pipeline: one seeded global order, each process's contiguous share of every
global batch, per-example randomness keyed by (seed, epoch, example), and an exact, JSON state.

Order. `grain.MapDataset.range(n).seed(seed).shuffle().repeat()` gives the record index at every
global position g (a new permutation each epoch: grain folds the epoch into the shuffle seed).
Step s's global batch is positions [s B, (s + 1) B); process p reads [s B + p b, s B + (p + 1) b)
with b = B / process_count, so the global batch never depends on how many processes read it.

Per example (a grain map, in grain's prefetch threads): read the record (array_record random
access; TFDS decodes the PNG/JPEG with PIL), convert it to (image, captions, label)
(catalog.py), choose the caption (data.caption: "random" or a style), convert grey <-> RGB to
data.channels, resize the shorter side to image_size and centre-crop (PIL, bilinear by default:
data.resize; a data set that renders natively at any size, shapes, is opened at image_size and
needs no resize), flip horizontally with probability 1/2 if data.random_flip, scale to [-1, 1],
tokenize. The random choices use numpy's default_rng([seed, epoch, record index, salt]).

State. `get_state()` is {"step": k, ...} plus what fixes the order (data set, size, seed, global
batch size; for imagefolder / webdataset the prepared set's hash, so changed data is refused);
`set_state` refuses a state from a different order and otherwise resumes at step k,
also on a different number of processes.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import warnings
from typing import Optional

import grain
import numpy as np

from t2i_jax.data import catalog

CAPTION_SALT = 0x7D1  # folded into the per-example seed: the caption choice and the flip
STATE_VERSION = 1
RESIZE_FILTERS = ("bilinear", "nearest", "bicubic")


def _get(cfg, key, default):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """data_config, read once and checked."""
    name: str
    image_size: int
    channels: int
    data_dir: Optional[str]
    random_flip: bool
    caption: str
    resize: str
    num_threads: int
    prefetch: int
    # imagefolder / webdataset (user_data.py): where the images are and how they are prepared
    path: Optional[str] = None
    caption_key: Optional[str] = None      # None: "text" (imagefolder), "caption" (webdataset)
    min_image_size: Optional[int] = None   # None: image_size (nothing is upscaled)
    max_bad_fraction: float = 0.05
    test_fraction: float = 0.05

    @property
    def spec(self) -> catalog.Spec:
        """The data set's Spec (a user source's bound to these settings: catalog.bind)."""
        return catalog.bind(catalog.get_spec(self.name), self)


def settings(data_config) -> DataSettings:
    name = _get(data_config, "name", "digits")
    spec = catalog.get_spec(name)  # ValueError listing the known names
    s = DataSettings(
        name=name,
        image_size=int(_get(data_config, "image_size", 32)),
        channels=int(_get(data_config, "channels", 3)),
        data_dir=_get(data_config, "data_dir", None),
        random_flip=bool(_get(data_config, "random_flip", False)),
        caption=str(_get(data_config, "caption", "random")),
        resize=str(_get(data_config, "resize", "bilinear")),
        num_threads=int(_get(data_config, "num_threads", 2)),
        prefetch=int(_get(data_config, "prefetch", 2)),
        path=_get(data_config, "path", None),
        caption_key=_get(data_config, "caption_key", None),
        min_image_size=_get(data_config, "min_image_size", None),
        max_bad_fraction=float(_get(data_config, "max_bad_fraction", 0.05)),
        test_fraction=float(_get(data_config, "test_fraction", 0.05)))
    if spec.user:  # data.path set, fractions and sizes in range (UsageError); nothing read yet
        from t2i_jax.data.user_sources import Options
        Options.of(s)
    if s.channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), got {s.channels}.")
    if s.image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {s.image_size}.")
    if s.random_flip and not spec.flip_ok:
        raise ValueError(
            f"data.random_flip=True is refused for {name!r}: a mirrored image would contradict its "
            "caption (\"left of\" becomes \"right of\"). Set data.random_flip=False.")
    styles = ("random", "first") + tuple(spec.caption_styles)
    if s.caption not in styles:
        raise ValueError(f"data.caption={s.caption!r} is not a caption style of {name!r}; choose one "
                         f"of {styles}.")
    if s.resize not in RESIZE_FILTERS:
        raise ValueError(f"data.resize must be one of {RESIZE_FILTERS}, got {s.resize!r}.")
    return s


# ---------------------------------------------------------------------------------------------
# Per-example processing


def process_image(image, image_size: int, channels: int, resize: str = "bilinear",
                  flip: bool = False) -> np.ndarray:
    """uint8 [H, W, C] (or [H, W]) -> float32 [image_size, image_size, channels] in [-1, 1]:
    grey <-> RGB, shorter side resized to image_size, centre crop, optional horizontal flip."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 4:  # RGBA: drop alpha
        img = img[..., :3]
    if img.shape[-1] == 1 and channels == 3:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 3 and channels == 1:
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))[..., None]
    h, w = img.shape[:2]
    if (h, w) != (image_size, image_size):
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        filt = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}[resize]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else np.ascontiguousarray(img))
        out = np.asarray(pil.resize((nw, nh), filt))
        img = out[..., None] if out.ndim == 2 else out
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        img = img[top:top + image_size, left:left + image_size]
    if flip:
        img = img[:, ::-1]
    return img.astype(np.float32) / 127.5 - 1.0


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index), CAPTION_SALT])


def choose_caption(captions, style: str, caption_styles, rng: Optional[np.random.Generator]) -> str:
    if not captions:
        return ""
    if style == "random":
        return captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]
    if style == "first":
        return captions[0]
    return captions[list(caption_styles).index(style)]


class _Process:
    """The grain map: (epoch, record index) -> one example's arrays."""

    def __init__(self, s: DataSettings, source, seed: int, tokenizer, text_cache=None,
                 latent_cache=None):
        # tokenizer None: the model reads no text; byte tokens of a default length, no warning.
        self._warn = tokenizer is not None
        self._tokenizer = _byte_tokenizer(16) if tokenizer is None else tokenizer
        self._s, self._source, self._seed = s, source, seed
        self._cache = text_cache
        self._latents = latent_cache
        self._convert = s.spec.converter(s.data_dir)
        self._styles = s.spec.caption_styles
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, item):
        epoch, index = item
        record = self._source[index]
        image, captions, label = self._convert(record)
        rng = example_rng(self._seed, epoch, index)
        caption = choose_caption(captions, self._s.caption, self._styles, rng)
        flip = bool(rng.random() < 0.5) if self._s.random_flip else False
        tokens = self._tokenizer([caption], warn=False)
        if self._warn and tokens.truncated[0] and not self._warned:
            with self._lock:
                if not self._warned:
                    self._warned = True
                    t = self._tokenizer
                    warnings.warn(
                        f"caption {caption!r} of {self._s.name!r} is longer than the {t.max_length} "
                        f"{t.name} tokens of the model's tokenizer and was truncated (reported "
                        "once); raise the text length (config.model.text.max_length, or "
                        "config.model.text_encoder.max_length) to keep captions whole.")
        out = {"image": process_image(image, self._s.image_size, self._s.channels, self._s.resize, flip),
               "tokens": tokens.ids[0], "mask": tokens.mask[0],
               "label": np.int32(label), "index": np.int64(index)}
        if self._cache is not None:  # a frozen encoder's features of this caption, precomputed
            out.update(self._cache.lookup(caption))
        if self._latents is not None:  # a frozen VAE's posterior moments of this record
            out.update(self._latents.lookup(index))
        return out


def _byte_tokenizer(max_length: int):
    from t2i_jax.conditioning.tokenizers import ByteTokenizer
    return ByteTokenizer(max_length)


# ---------------------------------------------------------------------------------------------
# Order and sharding


class _ProcessShare(grain.MapDataset):
    """Local position k -> (epoch, record index) at global position step * B + p * b + j,
    where (step, j) = divmod(k, b): this process's contiguous share of every global batch."""

    def __init__(self, order: grain.MapDataset, num_examples: int, global_batch: int,
                 local_batch: int, process_index: int):
        super().__init__(order)
        self._n, self._B, self._b, self._p = num_examples, global_batch, local_batch, process_index

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"ProcessShare(B={self._B}, b={self._b}, p={self._p})"

    def global_position(self, k: int) -> int:
        step, j = divmod(k, self._b)
        return step * self._B + self._p * self._b + j

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        g = self.global_position(k)
        return g // self._n, int(self._parent[g])


def global_order(num_examples: int, seed: int) -> grain.MapDataset:
    """Record index at each global position: a seeded permutation per epoch, forever."""
    return grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat()


class TrainIterator(grain.DatasetIterator):
    """This process's batches; `get_state()` / `set_state()` resume exactly (see module doc)."""

    def __init__(self, inner: grain.DatasetIterator, meta: dict, local_batch: int):
        super().__init__(inner)
        self._meta = dict(meta)
        self._step = 0
        self.local_batch_size = local_batch

    @property
    def step(self) -> int:
        """How many batches this iterator has returned (or was resumed at)."""
        return self._step

    def __next__(self) -> dict:
        batch = next(self._parent)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, **self._meta}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"not a data iterator state: {state!r}")
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._meta.items()
                if state.get(k) != v]
        if diff:
            raise ValueError(
                "the saved data iterator state belongs to a different data order, so resuming would "
                "not see the batches the run would have seen: " + "; ".join(diff) + ". Use the "
                "original settings, or start a fresh run in a new workdir.")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"invalid data iterator step {step}.")
        self._parent.set_state({"next_index": step})
        self._step = step

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def make_train_iterator(data_config, *, seed: int, global_batch_size: int,
                        max_length: Optional[int] = None, tokenizer=None, text_cache=None,
                        latent_cache=None, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> TrainIterator:
    """The training batches of this process: dicts of numpy arrays
      image  float32 [b, H, W, C] in [-1, 1]     tokens int32 [b, L]     mask bool [b, L]
      label  int32 [b] (-1: no classes)          index  int64 [b] (record index in the train split)
    with b = global_batch_size // process_count; the global batch of every step is the same
    whatever process_count is. Captions are tokenized by `tokenizer` (conditioning/tokenizers.py; or
    bytes to max_length); neither: a model that reads no text (byte tokens of length 16, no
    truncation warning). text_cache (families/frozen_text.TextCache): each example also gets
    its caption's precomputed text_features [L, D] and text_pooled [P]. latent_cache
    (families/latent_cache.LatentCache): each example also gets its record's latent_mean and
    latent_logvar [h, w, c]. Prepares an embedded data set on first use."""
    s = settings(data_config)
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"the global batch size {global_batch_size} must be a positive multiple of "
                         f"the number of processes ({process_count}).")
    if not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"the data seed must be in [0, 2**32), got {seed}.")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}.")
    if tokenizer is None and max_length is not None:
        tokenizer = _byte_tokenizer(max_length)
    b = global_batch_size // process_count
    train_split = s.spec.splits[0]
    source = catalog.open_split(s.spec, train_split, s.data_dir, s.image_size)
    n = len(source)
    if n == 0:
        raise ValueError(f"the {train_split!r} split of {s.name!r} is empty.")
    share = _ProcessShare(global_order(n, int(seed)), n, global_batch_size, b, process_index)
    if latent_cache is not None and s.random_flip:
        raise ValueError("train.latent_cache stores each image's latents once, unflipped, and "
                         "data.random_flip=True would flip the image the latents no longer see: "
                         "set one of them False.")
    ds = share.map(_Process(s, source, int(seed), tokenizer, text_cache, latent_cache)).batch(
        b, drop_remainder=True)
    options = grain.ReadOptions(num_threads=max(0, s.num_threads), prefetch_buffer_size=max(0, s.prefetch))
    inner = iter(ds.to_iter_dataset(options))
    meta = {"dataset": s.name, "split": train_split, "num_examples": n, "seed": int(seed),
            "global_batch_size": int(global_batch_size), "caption": s.caption,
            "random_flip": s.random_flip}
    meta.update(getattr(source, "state_meta", {}))  # a user source: its prepared set's hash
    return TrainIterator(inner, meta, b)


# ---------------------------------------------------------------------------------------------
# Small helpers for training and evaluation


def sample_prompts(data_config) -> list:
    """Fixed prompts for progress grids (digits: the ten digits in mixed phrasings; shapes:
    a handful including held-out colour+shape pairs; imagefolder / webdataset: up to 8 held-out
    captions)."""
    s = settings(data_config)
    return list(s.spec.prompts(None if s.caption in ("random", "first") else s.caption))


def data_identity(data_config) -> dict:
    """What names the records beyond data_config's fields: a user source's prepared-set hash
    ({"data_hash": ...}, prepared on first use), {} for the embedded and catalog data sets. A
    cache of per-record or per-caption features keys on it too."""
    s = settings(data_config)
    source = catalog.open_split(s.spec, s.spec.splits[0], s.data_dir, s.image_size)
    return dict(getattr(source, "state_meta", {}))


def split_size(data_config, split: Optional[str] = None) -> int:
    """The number of records of a split (default the training split)."""
    s = settings(data_config)
    return len(catalog.open_split(s.spec, split or s.spec.splits[0], s.data_dir, s.image_size))


def all_captions(data_config, split: Optional[str] = None) -> list:
    """Every caption (every phrasing) of a split (default the training split), in record order
    with repeats removed: what a cache of a frozen text encoder's features must hold."""
    s = settings(data_config)
    split = split or s.spec.splits[0]
    source = catalog.open_split(s.spec, split, s.data_dir, s.image_size)
    convert = s.spec.converter(s.data_dir)
    seen = {}
    for i in range(len(source)):
        for c in convert(source[i])[1] or [""]:
            seen.setdefault(c, None)
    return list(seen)


def class_names(data_config) -> Optional[list]:
    """The class names (label i is class_names[i]), or None for data sets without classes."""
    s = settings(data_config)
    return None if s.spec.class_names is None else list(s.spec.class_names(s.data_dir))


def num_classes(data_config) -> Optional[int]:
    names = class_names(data_config)
    return None if names is None else len(names)


def load_split(data_config, split: str, *, max_examples: Optional[int] = 50_000,
               limit: Optional[int] = None) -> dict:
    """Every example of a (small) split (or its first `limit`), processed like training data but
    without flips:
      image float32 [N, H, W, C] in [-1, 1], caption list[str] (data.caption's style; the first
      for "random"), captions list[list[str]] (all phrasings), label int32 [N], index int64 [N],
      and the data set's recorded extras (shapes: num_shapes, colour, shape, size, centre, bbox,
      relation, id; digits: id), stacked."""
    s = settings(data_config)
    source = catalog.open_split(s.spec, split, s.data_dir, s.image_size)
    n = len(source) if limit is None else min(len(source), int(limit))
    if max_examples is not None and n > max_examples:
        raise ValueError(f"split {split!r} of {s.name!r} has {n} examples > max_examples={max_examples}; "
                         "load_split is for small evaluation splits.")
    convert = s.spec.converter(s.data_dir)
    images, caption, captions, labels, extras = [], [], [], [], {}
    for i in range(n):
        record = source[i]
        image, caps, label = convert(record)
        images.append(process_image(image, s.image_size, s.channels, s.resize))
        caption.append(choose_caption(caps, "first" if s.caption == "random" else s.caption,
                                      s.spec.caption_styles, None))
        captions.append(list(caps))
        labels.append(label)
        for k, v in s.spec.extras(record).items():
            extras.setdefault(k, []).append(np.asarray(v))
    shape = (0, s.image_size, s.image_size, s.channels)
    out = {"image": np.stack(images) if images else np.zeros(shape, np.float32),
           "caption": caption, "captions": captions,
           "label": np.asarray(labels, np.int32), "index": np.arange(n, dtype=np.int64)}
    out.update({k: np.stack(v) for k, v in extras.items()})
    return out


def iter_images(data_config, split: Optional[str] = None, batch_size: int = 64):
    """(record indices int64 [n], images float32 [n, H, W, C]) of a split (default the training
    split) in record order, batch_size at a time, processed like training data without flips:
    what a cache of a frozen encoder's outputs per record is built from."""
    s = settings(data_config)
    split = split or s.spec.splits[0]
    source = catalog.open_split(s.spec, split, s.data_dir, s.image_size)
    convert = s.spec.converter(s.data_dir)
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)), dtype=np.int64)
        yield idx, np.stack([process_image(convert(source[int(i)])[0], s.image_size, s.channels,
                                           s.resize) for i in idx])
