"""GLIDE's inpainting model on 16x16 shapes: configs/shapes16.py whose UNet also reads the known
image and the mask (input [x_t, image * mask, mask], 3 + 3 + 1 channels), trained with a random
box or free-form strokes erased from every training image (Nichol et al. 2022, sec. 4).
Sampling overwrites the known region of x0_hat at every step, so it comes out exact:

    python train.py --config configs/shapes_inpaint.py --workdir runs/shapes_inpaint
    python sample.py --workdir runs/shapes_inpaint --inpaint image.png --mask mask.png \\
        --prompt "a large red circle" --outdir out/inpaint
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes16  # noqa: E402


def get_config():
    config = shapes16.get_config()
    config.model.inpaint = True
    config.train.num_steps = 3000
    return config
