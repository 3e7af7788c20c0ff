"""unCLIP's diffusion prior (Ramesh et al. 2022, sec. 2.2): diffusion over CLIP image embeddings,
conditioned on the caption, predicting the clean embedding itself (x0), not eps.

The diffusion family's loss, schedules, CFG dropout, samplers and guides run unchanged: they are
shape-agnostic, and here the chain's x is a vector [E] (image_shape = (E,)). What differs:
  x0    = sqrt(E) * z_i / |z_i|, z_i = the frozen CLIP's clean image embedding of the batch's
          images, computed inside the step (`to_prior_space`; DALLE2-pytorch's
          image_embed_scale = E ** 0.5: unit vectors have components of size 1/sqrt(E), which
          the schedule's unit-variance noise would drown);
  model = models/prior.py's transformer over [the CLIP text tower's token features, the CLIP
          text embedding, t, z_t, a learned query], read at the query; prediction "x0";
  null  = the empty prompt, through the same frozen CLIP (text dropped with train.p_uncond);
  out   = z_i = x0 / sqrt(E), renormalised to unit length (`from_prior_space`, the inverse).
Sampling draws `prior_candidates` embeddings per caption and keeps the one whose dot product
with the caption's CLIP text embedding is largest (`candidate_score`, sampling/best_of.py; sec. 2.2: "we generate
two samples of z_i and select the one with a higher dot product with z_t").
The prior writes embeddings, not images: it is a stage before a decoder (families/decoder.py),
`sample.py --workdir DECODER --prior PRIOR`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from t2i_jax.conditioning import Condition, Conditioning
from t2i_jax.families import clip as clip_lib
from t2i_jax.families.diffusion import Diffusion, LossConfig, schedule_of
from t2i_jax.families.frozen import Frozen
from t2i_jax.models.denoiser import Encoded
from t2i_jax.models.prior import PriorConfig, PriorTransformer


def to_prior_space(z: jax.Array) -> jax.Array:
    """CLIP embeddings [B, E] -> the prior's x0: L2-normalised, times sqrt(E)."""
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True) * math.sqrt(z.shape[-1])


def from_prior_space(x0: jax.Array) -> jax.Array:
    """The inverse of to_prior_space on its image: x0 / sqrt(E), renormalised to unit length
    (a sampled x0 is near, not on, the sphere of radius sqrt(E))."""
    z = x0 / math.sqrt(x0.shape[-1])
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Prior(Diffusion):
    clip: Frozen = None

    name = "prior"
    generates = False       # it writes embeddings: the stage before a decoder
    output_kind = "embedding"
    not_pixels = ("a prior", "the prior's x0 is a CLIP embedding scaled to norm sqrt(E), whose "
                  "components are not bounded by 1")
    batch_keys = ("image", "tokens", "mask")

    @classmethod
    def from_config(cls, config) -> "Prior":
        cls.refuse_pixel_thresholding(config.sample.get("thresholding", None),
                                      "config.sample.thresholding")
        if config.diffusion.prediction != "x0":
            raise ValueError(f"diffusion.prediction={config.diffusion.prediction!r}: unCLIP's prior "
                             "predicts the embedding itself (x0; sec. 2.2). Set "
                             "--config.diffusion.prediction=x0.")
        clip = clip_lib.load_clip(config)
        e = clip_lib.embed_dim(clip)
        prior = dict(config.model.get("prior", None) or {})
        if "embed_dim" in prior and prior.pop("embed_dim") != e:
            raise ValueError(f"model.prior.embed_dim is the CLIP's ({e}); leave it unset.")
        model = PriorTransformer(PriorConfig(embed_dim=e, **prior))
        t = config.train
        if not 0.0 <= t.p_uncond <= 1.0:
            raise ValueError(f"train.p_uncond must be in [0, 1], got {t.p_uncond}.")
        loss_cfg = LossConfig(prediction="x0", weighting=t.loss_weighting,
                              min_snr_gamma=t.min_snr_gamma, p_uncond=t.p_uncond)
        cond = Conditioning("text", max_length=clip.family.max_length, dataset=config.data.name)
        return cls(config=config, conditioning=cond, image_shape=(e,), model=model,
                   schedule=schedule_of(config), loss_cfg=loss_cfg, clip=clip)

    @property
    def embed_dim(self) -> int:
        return self.image_shape[0]

    @property
    def text_width(self) -> int:
        return int(self.clip.family.model.cfg.text.width)

    def init_params(self, key: jax.Array):
        e, length = self.embed_dim, self.max_length
        return self.model.init({"params": key, "dropout": key}, jnp.zeros((1, e)),
                               jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, self.text_width)),
                               jnp.ones((1, length), bool), jnp.zeros((1, e)))

    def hparams(self) -> dict:
        return dict(super().hparams(), clip=self.clip.params)

    def frozen_identity(self) -> dict:
        return {"clip": self.clip.identity()}

    def diffusion_data(self, batch: dict, key: jax.Array, hp: dict) -> jax.Array:
        return to_prior_space(clip_lib.image_embedding(self.clip, hp["clip"], batch["image"]))

    def apply_model(self, params, x_t, t, cond: Condition, dropout_key, hp: dict):
        enc = self.encode(params, cond, {"clip": hp["clip"]})
        return self.model.apply(params, x_t, t, enc.context, enc.context_mask, enc.pooled,
                                deterministic=False, rngs={"dropout": dropout_key})

    # --- sampling ------------------------------------------------------------------------
    def encode(self, params, cond: Condition, inputs=None) -> Encoded:
        """The caption through the frozen CLIP's text tower: token features (context), their
        mask and the text embedding (pooled)."""
        tokens, mask, z_t = clip_lib.text_encoding(self.clip, inputs["clip"], cond.tokens, cond.mask)
        return Encoded(context=tokens, context_mask=mask, pooled=z_t)

    def denoise_fn(self, params):
        return lambda x_t, t, enc: self.model.apply(params, x_t, t, enc.context,
                                                    enc.context_mask, enc.pooled)

    def sampling_inputs(self):
        return {"clip": self.clip.params}

    def to_output(self, inputs, x0: jax.Array) -> jax.Array:
        return from_prior_space(x0)

    def text_embedding(self, inputs, cond: Condition) -> jax.Array:
        """The CLIP text embedding [B, E] of a Condition's caption (the candidates' judge)."""
        return clip_lib.text_encoding(self.clip, inputs["clip"], cond.tokens, cond.mask)[2]

    def caption_embedding(self, cond: Condition) -> jax.Array:
        """text_embedding of the frozen CLIP's parameters, jitted once per family."""
        fn = self.program("text_embedding", lambda: jax.jit(self.text_embedding))
        return fn(self.sampling_inputs(), cond)

    def candidate_score(self, cond: Condition):
        """z [B, E] -> z . z_t [B]: a candidate's dot product with its caption's CLIP text
        embedding z_t (unCLIP sec. 2.2: the candidate with the larger one is kept)."""
        z_t = self.caption_embedding(cond)                                  # [B, E]
        return lambda z: jnp.einsum("be,be->b", z, z_t)

    def default_candidates(self) -> int:
        return int(self.config.sample.get("prior_candidates", 2))

    def next_command(self, workdir: str) -> str:
        import shlex
        prompt = self.grid_prompts()[0]
        return (f"python sample.py --workdir DECODER_WORKDIR --prior {shlex.quote(workdir)} "
                f"--prompt {shlex.quote(prompt)} --outdir OUT   (a decoder on the same CLIP, "
                f"{self.clip.workdir})")

