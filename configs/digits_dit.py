"""The digits recipe (configs/digits.py) with a DiT backbone (Peebles & Xie 2023) that reads the
text by cross-attention (PixArt-alpha; t2i_jax/models/dit.py), on the same VP process (cosine
schedule, eps prediction), text encoder and training schedule:

    python train.py --config configs/digits_dit.py --workdir runs/digits_dit

16x16 grey digits in 2x2 patches: 64 tokens of width 116, 4 scanned blocks of 2 heads (width 58).
Its size is matched to the digits UNet: 1,224,732 parameters in the DiT against 1,223,937 in the
UNet (+0.06%; 1,343,068 and 1,342,273 with the shared text encoder; tests/test_dit.py checks
it within 2%). Speed on the 2 CPU cores, train.py, batch 32, measured while two other trainings
shared them: 72 images/s against 50 for configs/digits.py at the same time (and 92 with
--config.model.dit.scan=False: on the CPU a scan step is slower than the unrolled loop, see
bench/dit_compile.py). The UNet alone does 140-180 images/s (README), so 3000 steps should take
about 7-9 minutes alone.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.model.backbone = "dit"
    d = config.model.dit
    d.out_channels = 1
    d.patch_size = 2
    d.width = 116
    d.depth = 4
    d.num_heads = 2
    d.mlp_ratio = 4.0
    return config
