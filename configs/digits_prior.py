"""unCLIP's prior on the embedded digits: caption -> the image embedding of configs/digits_clip.py's
CLIP (train that first: python train.py --config configs/digits_clip.py --workdir runs/digits_clip).

    python train.py --config configs/digits_prior.py --workdir runs/digits_prior
    python sample.py --workdir runs/digits_decoder --prior runs/digits_prior --prompt seven \\
        --outdir out/unclip"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402
import unclip  # noqa: E402


def get_config():
    return unclip.prior(digits.get_config(), "runs/digits_clip")
