"""unCLIP's decoder on the embedded digits: configs/digits.py's model, also conditioned on the
CLIP image embedding of configs/digits_clip.py's CLIP (into the time embedding and as 4 extra
context tokens), the embedding dropped 10% and the caption 50% of the time.

    python train.py --config configs/digits_decoder.py --workdir runs/digits_decoder
    python sample.py --workdir runs/digits_decoder --variations some_digit.png --outdir out/var"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402
import unclip  # noqa: E402


def get_config():
    return unclip.decoder(digits.get_config(), "runs/digits_clip")
