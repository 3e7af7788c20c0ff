"""Data: embedded TFDS data sets (digits, shapes; array_record, no TensorFlow), TFDS catalog data
sets by name, your own images (imagefolder, webdataset: user_data.py), and the grain input
pipeline (see pipeline.py).

The names below are imported on first use (PEP 562): a process that needs one submodule only (a
spawned worker decoding images for user_data, `python -m t2i_jax.data.prepare`) does not import
grain and TFDS for nothing."""

import importlib

_FROM = {
    "catalog": ("NAMES", "DatasetUnavailableError", "default_data_dir", "get_spec"),
    "pipeline": ("TrainIterator", "all_captions", "class_names", "data_identity", "iter_images",
                 "load_split", "make_train_iterator", "num_classes", "process_image",
                 "sample_prompts", "settings", "split_size"),
}
_WHERE = {name: module for module, names in _FROM.items() for name in names}

__all__ = [name for names in _FROM.values() for name in names]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
