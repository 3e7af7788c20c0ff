"""Every data set by name, and the one place where a data set's stored features become
(image, captions, label).

Embedded (prepared locally, offline, no TensorFlow): "digits", "shapes". "shapes" renders
natively at any size (`Spec.native_size`): `open_split(..., image_size=S)` opens its builder of
size S (prepared on first use), so the pipeline does not resize it; "digits" is always the 8x8
scans (the pipeline upscales them).
Your own images: "imagefolder", "webdataset" (data.path; user_data.py, user_sources.py),
prepared once into TFDS array_record files named by a hash of the source and the options. Their
Spec is bound to the data config (`bind`; pipeline.DataSettings.spec does it) so that open_split
and prompts read that source; prompts are up to 8 held-out captions.
TFDS catalog: "mnist", "fashion_mnist", "cifar10", "oxford_flowers102", "coco_captions". These
are read from array_record files already in data_dir (`DIR/<tfds name>/<version>/`). Preparing
them needs a network (to download) and TensorFlow (TFDS's catalog builders use it to prepare);
when the files are missing and that cannot be done, `DatasetUnavailableError` says what to do.

`Spec.converter(data_dir)(record)` returns (image uint8 [H, W, C], captions list[str], label int or -1);
the pipeline chooses one caption per example and epoch (data.caption="random") or a fixed style
(data.caption=<one of Spec.caption_styles>; "first" takes the first).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Callable, Optional, Sequence

from t2i_jax.data import digits as digits_lib
from t2i_jax.data import shapes as shapes_lib


def default_data_dir(data_dir: Optional[str] = None) -> str:
    """prepare.default_data_dir, imported on use: `python -m t2i_jax.data.prepare` runs that
    module, which importing t2i_jax.data must not have imported first."""
    from t2i_jax.data import builders as prepare
    return prepare.default_data_dir(data_dir)


class DatasetUnavailableError(RuntimeError):
    """A catalog data set is not prepared in data_dir and cannot be prepared here."""


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str                      # data.name
    tfds_name: str                 # the TFDS builder's name (directory under data_dir)
    splits: tuple                  # split names; the first is the training split
    converter: Callable            # data_dir -> (record -> (image uint8 [H, W, C], captions, label))
    caption_styles: tuple          # the order of convert's captions ("random" picks any)
    class_names: Optional[Callable[[Optional[str]], Sequence[str]]]  # data_dir -> names
    prompts: Callable              # style -> fixed prompts for progress grids
    embedded: bool = False
    flip_ok: bool = True           # False where a mirror image changes the caption's meaning
    builder: Optional[Callable] = None  # embedded: data_dir[, image_size] -> prepared TFDS builder
    native_size: bool = False      # embedded and rendered at any size: builder(data_dir, image_size)
    extras: Callable = lambda record: {}  # record -> per-example arrays load_split returns too
    user: bool = False             # read from data.path (imagefolder, webdataset): see `bind`
    source: Optional[Callable] = None   # a bound user source: split -> random-access source


def _text(x):
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _class_converter(names: Sequence[str], phrasings: Callable[[str], list]):
    def convert(record):
        label = int(record["label"])
        return record["image"], phrasings(names[label]), label
    return convert


def _photo_phrasings(noun):
    return [f"a photo of {_article(noun)}", noun, _article(noun)]


def _flower_phrasings(noun):
    return [f"a photo of {_article(noun)}, a type of flower", noun, f"{_article(noun)} flower"]


def _class_prompts(names, phrasings, styles):
    def prompts(style=None):
        k = styles.index(style) if style in styles else 0
        return [phrasings(n)[k] for n in names]
    return prompts


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
FASHION_NAMES = ("t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                 "sneaker", "bag", "ankle boot")  # TFDS: "T-shirt/top", "Trouser", ...
PHOTO_STYLES = ("photo", "name", "article")
FLOWER_STYLES = ("photo", "name", "flower")
COCO_PROMPTS = ("a man riding a wave on top of a surfboard", "a plate of food with broccoli",
                "a red double decker bus on a street", "a cat sitting on a laptop keyboard",
                "a giraffe standing next to a tree", "a bowl of fruit on a wooden table")


def _digit_convert(record):
    label = int(record["label"])
    return record["image"], digits_lib.captions(label), label


def _coco_convert(record):
    return record["image"], [_text(t) for t in record["captions"]["text"]], -1


def _flowers_names(data_dir=None):
    # The 102 names come with the prepared files, or with TFDS's package metadata (offline).
    b = _find_prepared("oxford_flowers102", data_dir)
    if b is None:
        import tensorflow_datasets as tfds
        b = tfds.builder("oxford_flowers102", data_dir=default_data_dir(data_dir))
    return [n.replace("_", " ") for n in b.info.features["label"].names]


def _shapes_extras(record):
    return {k: record[k] for k in shapes_lib.ATTRIBUTE_KEYS + ("id",)}


def _fixed(fn):
    return lambda data_dir=None: fn


def _user_convert(record):
    return record["image"], [_text(record["caption"])], -1


def _user_spec(name: str) -> Spec:
    def unbound(style=None):
        raise ValueError(f"the prompts of data.name={name!r} are its held-out captions: bind its "
                         "spec to the data config first (pipeline.settings(config.data).spec).")
    return Spec(name, f"t2i_{name}", ("train", "test"), _fixed(_user_convert), (), None, unbound,
                extras=lambda r: {"key": r["key"]}, user=True)


SPECS = {
    "digits": Spec("digits", digits_lib.NAME, digits_lib.SPLITS, _fixed(digits_lib.convert),
                   digits_lib.CAPTION_STYLES, lambda d=None: digits_lib.CLASS_NAMES,
                   digits_lib.sample_prompts, embedded=True, builder=digits_lib.builder,
                   extras=lambda r: {"id": r["id"]}),
    "shapes": Spec("shapes", shapes_lib.NAME, shapes_lib.SPLITS, _fixed(shapes_lib.convert),
                   shapes_lib.CAPTION_STYLES, None, shapes_lib.sample_prompts, embedded=True,
                   flip_ok=False, builder=shapes_lib.builder, native_size=True,
                   extras=_shapes_extras),
    "mnist": Spec("mnist", "mnist", ("train", "test"), _fixed(_digit_convert),
                  digits_lib.CAPTION_STYLES, lambda d=None: digits_lib.CLASS_NAMES,
                  digits_lib.sample_prompts),
    "fashion_mnist": Spec(
        "fashion_mnist", "fashion_mnist", ("train", "test"),
        _fixed(_class_converter(FASHION_NAMES, _photo_phrasings)), PHOTO_STYLES,
        lambda d=None: FASHION_NAMES, _class_prompts(FASHION_NAMES, _photo_phrasings, PHOTO_STYLES)),
    "cifar10": Spec(
        "cifar10", "cifar10", ("train", "test"),
        _fixed(_class_converter(CIFAR10_NAMES, _photo_phrasings)), PHOTO_STYLES,
        lambda d=None: CIFAR10_NAMES, _class_prompts(CIFAR10_NAMES, _photo_phrasings, PHOTO_STYLES)),
    "oxford_flowers102": Spec(
        "oxford_flowers102", "oxford_flowers102", ("train", "validation", "test"),
        lambda d=None: _class_converter(_flowers_names(d), _flower_phrasings), FLOWER_STYLES,
        _flowers_names,
        _class_prompts(("pink primrose", "sunflower", "rose", "daisy", "lotus", "tiger lily"),
                       _flower_phrasings, FLOWER_STYLES)),
    "coco_captions": Spec("coco_captions", "coco_captions", ("train", "val", "test"),
                          _fixed(_coco_convert), ("first",), None,
                          lambda style=None: list(COCO_PROMPTS)),
    "imagefolder": _user_spec("imagefolder"),
    "webdataset": _user_spec("webdataset"),
}
NAMES = tuple(SPECS)


def get_spec(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(NAMES)} "
                         "(set data.name).")
    return SPECS[name]


def bind(spec: Spec, data_config) -> Spec:
    """A user source's Spec bound to its data config (a ConfigDict or pipeline.DataSettings:
    data.path, caption_key, ...): open_split and prompts then read that source, prepared on
    first use. Other specs are returned as they are."""
    if not spec.user:
        return spec
    from t2i_jax.data import user_data
    return dataclasses.replace(
        spec, source=lambda split: user_data.open_split(data_config, split),
        prompts=lambda style=None: user_data.sample_prompts(data_config))


# ---------------------------------------------------------------------------------------------
# Opening the files


def _find_prepared(tfds_name: str, data_dir: Optional[str]):
    """A read-only builder for the newest prepared version of tfds_name in data_dir, or None."""
    import tensorflow_datasets as tfds
    root = os.path.join(default_data_dir(data_dir), tfds_name)
    infos = glob.glob(os.path.join(root, "*", "dataset_info.json")) + glob.glob(
        os.path.join(root, "*", "*", "dataset_info.json"))  # <name>/<version> or <name>/<config>/<version>
    infos = [p for p in infos if "incomplete." not in p]
    if not infos:
        return None

    def version_key(p):
        v = os.path.basename(os.path.dirname(p))
        try:
            return tuple(int(x) for x in v.split("."))
        except ValueError:
            return ()
    path = os.path.dirname(max(infos, key=version_key))
    return tfds.builder_from_directory(path)


def _has_array_record(builder, split: str) -> bool:
    pattern = os.path.join(str(builder.data_dir), f"{builder.name}-{split}.array_record*")
    return bool(glob.glob(pattern))


def unavailable_message(spec: Spec, data_dir: Optional[str], reason: str) -> str:
    """One line: what is missing, why it cannot be made here, and the commands that make it."""
    d = default_data_dir(data_dir)
    n = spec.tfds_name
    return (
        f"the TFDS data set {n!r} (data.name={spec.name!r}) is not prepared in {d} and cannot be "
        f"prepared here ({reason}). Preparing it needs a network and TensorFlow once: where both "
        f"are, run `pip install tensorflow tensorflow-datasets && tfds build {n} "
        f"--file_format=array_record --data_dir=DIR`, then copy DIR/{n} to {d}/ or pass "
        f"--config.data.data_dir=DIR. (The embedded data sets 'digits' and 'shapes' need "
        f"neither.)")


def open_split(spec: Spec, split: str, data_dir: Optional[str] = None,
               image_size: Optional[int] = None):
    """A random-access source (len, [i] -> record dict) for `split` of the data set. image_size:
    for a data set that renders natively at any size (spec.native_size), its records' size
    (None: the builder's default); ignored by the others (their stored size is what it is)."""
    if split not in spec.splits:
        raise ValueError(f"data set {spec.name!r} has splits {spec.splits}, not {split!r}.")
    if spec.user:
        if spec.source is None:
            raise ValueError(f"data.name={spec.name!r} is read from data.path: open it through "
                             "its data config (catalog.bind(spec, config.data), or "
                             "pipeline.settings(config.data).spec).")
        return spec.source(split)
    if spec.embedded:
        if spec.native_size and image_size is not None:
            return spec.builder(data_dir, image_size=int(image_size)).as_data_source(split=split)
        return spec.builder(data_dir).as_data_source(split=split)
    builder = _find_prepared(spec.tfds_name, data_dir)
    if builder is not None:
        if _has_array_record(builder, split):
            return builder.as_data_source(split=split)
        reason = (f"it is prepared in {builder.data_dir} but not as array_record files (grain "
                  f"needs random access; TFDS's default is tfrecord)")
    elif importlib.util.find_spec("tensorflow") is None:
        reason = "TensorFlow is not installed"
    else:  # try TFDS's own download-and-prepare (needs the network)
        import tensorflow_datasets as tfds
        try:
            return tfds.data_source(spec.tfds_name, split=split, data_dir=default_data_dir(data_dir),
                                    download=True)
        except Exception as e:  # noqa: BLE001  (any failure here means: not available)
            reason = f"downloading or preparing it failed ({type(e).__name__}: {str(e)[:300]})"
    raise DatasetUnavailableError(unavailable_message(spec, data_dir, reason))
