"""Data: embedded TFDS data sets (digits, shapes; array_record, no TensorFlow), TFDS catalog data
sets by name, and the grain input pipeline (see pipeline.py)."""

from t2i_jax.data.catalog import NAMES, DatasetUnavailableError, get_spec
from t2i_jax.data.pipeline import (TrainIterator, all_captions, class_names, load_split, make_train_iterator,
                                   num_classes, process_image, sample_prompts, settings,
                                   split_size)
from t2i_jax.data.prepare import default_data_dir

__all__ = ["NAMES", "DatasetUnavailableError", "get_spec", "TrainIterator", "all_captions", "class_names",
           "load_split", "make_train_iterator", "num_classes", "process_image", "sample_prompts",
           "settings", "split_size", "default_data_dir"]
