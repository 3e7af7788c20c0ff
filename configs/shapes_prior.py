"""unCLIP's prior on the embedded shapes: caption -> the image embedding of configs/shapes_clip.py's
CLIP (python train.py --config configs/shapes_clip.py --workdir runs/shapes_clip first)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402
import unclip  # noqa: E402


def get_config():
    # 1500 steps of 64: the frozen CLIP's image tower on 32x32 images is most of a step
    # (4x digits' pixels), so this is what fits in the 20 minutes of a 2-core machine.
    return unclip.prior(shapes.get_config(), "runs/shapes_clip", num_steps=1500)
