"""Imagen's recipe on COCO at 64x64 (Saharia et al. 2022, scaled down): the GLIDE-like base of
configs/coco64.py conditioned on a FROZEN T5 v1.1 encoder instead of a jointly trained one,
with its features of every training caption precomputed once (Imagen precomputes its T5-XXL
embeddings), layer-normalised and cross-attended with the padding mask, pooled into the time
embedding, and the empty prompt's encoding as the null (p_uncond 0.1).

Point it at a local copy of the weights (nothing is downloaded), e.g. google/t5-v1_1-xl or
-xxl (config.json, model*.safetensors [+ index], spiece.model):

    python train.py --config configs/coco64_t5.py --workdir runs/coco64_t5 \
        --config.model.text_encoder.path=/data/t5-v1_1-xxl

Sized for accelerators. With train.fsdp > 1 the encoder's parameters are split over the "fsdp"
axis as they load (T5-XXL's 4.7B never sit whole on one device).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coco64  # noqa: E402
from ml_collections import config_dict  # noqa: E402


def get_config():
    config = coco64.get_config()
    config.model.text = None          # replaced by the frozen encoder
    config.model.text_encoder = dict(kind="t5", path="checkpoints/t5-v1_1-xl", max_length=128,
                                     dtype="bfloat16")
    tr = config.train
    tr.text_cache = True              # encode every caption once (bf16 compute, float32 cache)
    tr.text_cache_dir = config_dict.placeholder(str)
    tr.p_uncond = 0.1                 # Imagen: 10% dropped to the empty prompt
    config.sample.thresholding = "dynamic"   # Imagen's dynamic thresholding
    return config
