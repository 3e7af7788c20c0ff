"""Text-to-image on `shapes` (16x16) conditioned on a FROZEN T5 encoder read from a local
directory in the Hugging Face layout (Imagen's recipe, scaled down), so the whole frozen-encoder
path runs offline: write a tiny random T5 first, then train, sample and resume as usual:

    python -m t2i_jax.models.pretrained make-tiny runs/tiny_t5
    python train.py --config configs/shapes_t5_tiny.py --workdir runs/shapes_t5_tiny

The encoder is never trained, averaged or checkpointed; the checkpoints record its directory and
content hash and refuse another. Its features of every training caption are computed once into
a cache (train.text_cache; --config.train.text_cache=False encodes in every step instead). A
real T5: --config.model.text_encoder.path=/data/t5-v1_1-base (and a larger max_length).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes16  # noqa: E402
from ml_collections import config_dict  # noqa: E402


def get_config():
    config = shapes16.get_config()
    config.model.text = None          # replaced by the frozen encoder
    config.model.text_encoder = dict(kind="t5", path="runs/tiny_t5", max_length=40,
                                     dtype="float32")
    tr = config.train
    tr.text_cache = True
    tr.text_cache_dir = config_dict.placeholder(str)  # None: $T2I_JAX_CACHE or ~/.cache/t2i_jax
    tr.num_steps = 3200
    return config
