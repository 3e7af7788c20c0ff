"""unCLIP's decoder on the embedded shapes (32x32): configs/shapes.py's model, also conditioned on
the CLIP image embedding of configs/shapes_clip.py's CLIP, the embedding dropped 10% and the
caption 50% of the time, trained for the 20 minutes of a 2-core machine.

    python train.py --config configs/shapes_decoder.py --workdir runs/shapes_decoder
    python sample.py --workdir runs/shapes_decoder --prior runs/shapes_prior \\
        --prompt "a large red circle" --outdir out/unclip_shapes"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402
import unclip  # noqa: E402


def get_config():
    config = unclip.decoder(shapes.get_config(), "runs/shapes_clip")
    tr = config.train
    tr.num_steps = 1000          # ~1 s a step of 32 at 32x32 on 2 cores: 17 min
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.ema_decay = 0.995         # a short run: EMA 0.999 would still weigh the first steps
    tr.checkpoint_every = 500
    tr.sample_every = 500
    return config
