"""unCLIP's decoder (Ramesh et al. 2022, sec. 2.1): the diffusion family conditioned on a CLIP
image embedding z_i and on the caption (GLIDE's text encoder, trained with it).

z_i enters twice (models/denoiser.py, models/unet.py): projected and added to the timestep
embedding, and projected into `model.embedding_tokens` (4) extra context tokens concatenated
with the text encoder's tokens for cross-attention. In training z_i is the frozen CLIP's
(`config.model.clip`, families/clip.py) clean image embedding of the batch's own image, computed
inside the step. Classifier-free guidance drops the two independently: the embedding with
`train.p_image` (0.1; its null is the zero vector) and the text with `train.p_text` (0.5; its
null the empty prompt), both nulls defined once in t2i_jax/conditioning/conditions.py. Sampling's null row
drops both. A sampling job gives every image its embedding: a prior's sample (`--prior`), a
given image's (`--variations`), a slerp between two (`--interpolate`), or none (text alone).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import conditioning
from t2i_jax.conditioning import Condition
from t2i_jax.families import clip as clip_lib
from t2i_jax.families.diffusion import Diffusion
from t2i_jax.families.frozen import Frozen
from t2i_jax.models.denoiser import Denoiser

@dataclasses.dataclass
class Decoder(Diffusion):
    clip: Frozen = None
    p_text: float = 0.5
    p_image: float = 0.1

    name = "decoder"
    stage_input = "embedding"   # what an earlier stage (a prior) or the job gives it

    @classmethod
    def from_config(cls, config) -> "Decoder":
        clip = clip_lib.load_clip(config)
        e = clip_lib.embed_dim(clip)
        base = Diffusion.from_config(config)
        if base.conditioning.kind == "label":
            raise ValueError("an unCLIP decoder is conditioned on text and an image embedding, "
                             f"not class labels: set model.{base.model.cfg.backbone}.num_classes=None.")
        t = config.train
        rates = dict(p_text=float(t.get("p_text", 0.5)), p_image=float(t.get("p_image", 0.1)))
        for k, v in rates.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"train.{k} must be in [0, 1], got {v}.")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Diffusion)}
        fields["model"] = Denoiser(dataclasses.replace(base.model.cfg, embedding_dim=e))
        fields["conditioning"] = dataclasses.replace(base.conditioning, embedding_dim=e)
        return cls(**fields, clip=clip, **rates)

    @property
    def embed_dim(self) -> int:
        return clip_lib.embed_dim(self.clip)

    def hparams(self) -> dict:
        return dict(super().hparams(), clip=self.clip.params,
                    p_text=jnp.asarray(self.p_text, jnp.float32),
                    p_image=jnp.asarray(self.p_image, jnp.float32))

    def frozen_identity(self) -> dict:
        return dict(super().frozen_identity(), clip=self.clip.identity())

    def training_condition(self, batch: dict, key: jax.Array, hp: dict) -> Condition:
        z = clip_lib.image_embedding(self.clip, hp["clip"], batch["image"])
        return super().training_condition(batch, key, hp).replace(embedding=z)

    def drop(self, cond: Condition, key: jax.Array, hp: dict) -> Condition:
        rates = {"embedding": hp["p_image"]}
        if self.conditioning.kind == "text":
            rates["text"] = hp["p_text"]
        return conditioning.drop_parts(cond, self.null(), key, rates)

    def sampling_condition(self, cond: Condition, rng: jax.Array, sample_ids) -> Condition:
        if cond.embedding is None or cond.embedding.shape[-1] != self.embed_dim:
            raise ValueError(f"a decoder needs each image's CLIP embedding [B, {self.embed_dim}] "
                             "in the Condition (from a prior, an image or a slerp).")
        return cond

    def stage_fields(self, given, level=None) -> dict:
        return {"embedding": np.asarray(given, np.float32)}

    # --- grids ---------------------------------------------------------------------------
    def embed_images(self, x) -> np.ndarray:
        """Clean CLIP image embeddings [N, E] (host) of images [N, H, W, C] in [-1, 1] (one
        program per family, compiled once per batch shape)."""
        fn = self.program("embed_images", lambda: jax.jit(
            lambda p, x: clip_lib.image_embedding(self.clip, p, x)))
        return np.asarray(fn(self.clip.params, jnp.asarray(x, jnp.float32)))

    def grid_prompts(self) -> list:
        return list(self.grid_examples()["caption"])

    def grid_condition(self, prompts, n: int) -> Condition:
        """Rows of variations: each of the first test images' caption and CLIP embedding."""
        cond = super().grid_condition(prompts, n)
        z = self.embed_images(self.grid_examples()["image"][:len(prompts)])
        return cond.replace(embedding=jnp.repeat(jnp.asarray(z), n, axis=0))

    def next_command(self, workdir: str) -> str:
        import shlex
        w = shlex.quote(workdir)
        return (f"python sample.py --workdir {w} --prior PRIOR_WORKDIR --prompt '...' --outdir OUT"
                f"   (or --workdir {w} --variations IMAGE.png --outdir OUT)")
