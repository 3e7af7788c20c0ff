"""Text-to-image on `shapes` at 32x32 with both of this issue's new parts: a DiT backbone
(Peebles & Xie 2023; cross-attention to the text, PixArt-alpha; t2i_jax/models/dit.py) trained
by flow matching (rectified flow, logit-normal time as SD3; t2i_jax/diffusion/flow.py), sampled
with Euler:

    python train.py --config configs/shapes_dit_flow.py --workdir runs/shapes_dit_flow
    python -m t2i_jax.evaluation.reproduce flow --workdir runs/shapes_dit_flow --parts shapes

32x32 RGB in 4x4 patches: 64 tokens of width 128, 4 scanned blocks of 4 heads; the byte-level
text encoder of configs/shapes.py. 2000 steps of batch 32 fit the 15 minutes this config is
given on a 2-core CPU (configs/shapes.py's UNet runs 20 000). Three choices make the short run
draw shapes, each measured in docs/results.md ("Shapes, DiT + flow"):
- the network predicts x0 and is trained on the velocity's loss (JiT, Li & He 2025: a pixel
  transformer with large patches learns the clean image where it struggles to pass the noise
  through; diffusion.prediction = "x0");
- JiT's time density, logit-normal(0.8, 0.8) in tau (more weight near noise, where the layout
  and the shape are decided);
- a 3x3 conv stem (32 channels) before patchify and U-ViT's 3x3 conv after unpatchify, which
  let tokens see their neighbours' edges.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.model.backbone = "dit"
    d = config.model.dit
    d.out_channels = 3
    d.patch_size = 4
    d.width = 128
    d.depth = 4
    d.num_heads = 4
    d.mlp_ratio = 4.0
    d.conv_stem = 32
    d.conv_head = 3      # U-ViT's 3x3 conv after unpatchify
    config.diffusion.process = "flow"
    config.diffusion.flow_time = "logit_normal"
    config.diffusion.prediction = "x0"      # JiT: x-prediction, the velocity's loss
    config.diffusion.flow_logit_mean = 0.8  # JiT's time density (its -0.8 with t = 1 - tau)
    config.diffusion.flow_logit_std = 0.8
    config.diffusion.shift = 1.0
    tr = config.train
    tr.num_steps = 2000
    tr.learning_rate = 1e-3
    tr.warmup_steps = 200
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.ema_decay = 0.999
    tr.checkpoint_every = 500
    tr.sample_every = 1000
    config.sample.sampler = "euler"
    config.sample.num_steps = 50
    config.sample.guidance_weight = 3.0
    return config
