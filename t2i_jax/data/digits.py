"""`digits`: the real handwritten digits that scikit-learn ships (UCI optdigits test set).

1797 scans, 8x8 pixels, 17 grey levels (0..16), label = the digit. Stored as they are: the TFDS
image is the 8x8 scan with level v mapped to the byte (255 v + 8) // 16 (0 -> 0, 16 -> 255), so
nothing is lost; the input pipeline upscales to the configured image_size (16 or 32) with PIL's
bilinear filter ("bilinear", the default) or exactly with pixel replication
(data.resize="nearest").

Split (fixed, stored in the prepared files): a permutation of the 1797 scikit-learn indices with
numpy's default_rng(0); its first 297 are `test`, the other 1500 `train`; each split is stored in
increasing scikit-learn index, which every record keeps as `id`.

Captions: several phrasings of the label (CAPTION_STYLES), chosen per example and epoch by the
pipeline: "7", "seven", "a handwritten digit seven", "数字七", "a handwritten 7".
"""

from __future__ import annotations

import functools

import numpy as np

NAME = "t2i_digits"
NUM_EXAMPLES = 1797
NUM_TEST = 297
SPLIT_SEED = 0
SPLITS = ("train", "test")

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CHINESE = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九")
CLASS_NAMES = tuple(str(d) for d in range(10))
CAPTION_STYLES = ("numeral", "word", "sentence", "chinese", "sentence_numeral")


def captions(label: int) -> list:
    """All phrasings of digit `label`, in CAPTION_STYLES order."""
    d = int(label)
    return [str(d), WORDS[d], f"a handwritten digit {WORDS[d]}", f"数字{CHINESE[d]}",
            f"a handwritten {d}"]


def sample_prompts(style=None) -> list:
    """The ten digits, one prompt each; mixed phrasings ("0", "one", "a handwritten digit two",
    "数字三", ...) unless a fixed style is given."""
    if style in CAPTION_STYLES:
        k = CAPTION_STYLES.index(style)
        return [captions(d)[k] for d in range(10)]
    return [captions(d)[d % 4] for d in range(10)]


def to_bytes(levels: np.ndarray) -> np.ndarray:
    """Grey levels 0..16 (float or int) -> uint8 0..255, exactly: (255 v + 8) // 16."""
    v = np.rint(np.asarray(levels)).astype(np.int64)
    return ((255 * v + 8) // 16).astype(np.uint8)


def raw():
    """(images uint8 [1797, 8, 8], labels int64 [1797]) from scikit-learn (shipped, offline)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return to_bytes(d.images), d.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """The scikit-learn indices of `split`, increasing."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
    if split == "test":
        return np.sort(perm[:NUM_TEST])
    if split == "train":
        return np.sort(perm[NUM_TEST:])
    raise ValueError(f"digits has splits {SPLITS}, not {split!r}.")


def _make_builder():
    import tensorflow_datasets as tfds
    from PIL import Image

    class T2iDigits(tfds.core.GeneratorBasedBuilder):
        """scikit-learn's handwritten digits (8x8, 17 grey levels) with captions."""
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "1500/297 split by default_rng(0); 8x8 scans as PNG."}
        code_path = None  # see prepare.py: TFDS's lookup needs importlib_resources on Python >= 3.9

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "id": np.int32,  # index in sklearn.datasets.load_digits()
                }),
                supervised_keys=("image", "label"),
                homepage="https://archive.ics.uci.edu/dataset/80",
                disable_shuffling=True,  # record i of a split = i-th smallest sklearn index
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in SPLITS}

        def _generate_examples(self, split):
            images, labels = raw()
            for i in split_indices(split):
                yield int(i), {
                    "image": Image.fromarray(images[i]),
                    "label": int(labels[i]),
                    "captions": captions(labels[i]),
                    "id": int(i),
                }

    return T2iDigits


@functools.cache
def builder_class():
    """The TFDS builder class (defined on first use, so importing t2i_jax.data stays light)."""
    return _make_builder()


def builder(data_dir=None):
    """The prepared TFDS builder (prepared into data_dir on first use)."""
    from t2i_jax.data.builders import prepared_builder
    return prepared_builder(builder_class(), data_dir)


def convert(example: dict):
    """A stored record -> (image uint8 [8, 8, 1], captions, label)."""
    return example["image"], [c.decode() if isinstance(c, bytes) else c for c in example["captions"]], \
        int(example["label"])
