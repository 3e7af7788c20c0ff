"""What every family (trainable kind of model) gives the one training loop and sampling.

A family is built from a config (`families.build(config)`) and supplies only what differs
between kinds of model: how to init its parameters, the per-example loss of a batch with its
metrics, a progress preview, and the condition it reads. Everything else (sharding, the
optimizer, EMA, checkpoints, exact resume, SIGTERM, the NaN guard, metrics) is the loop's, the
same for every family (google-research/vdm's Experiment, big_vision's model-by-name). A family
knows nothing of optimizers or train states: training builds those around `init_params`, and
sampling rebuilds the parameters' shapes from `init_params` alone.

Randomness: `loss` gets the step's key, fold_in(root, step); a family folds in its own streams.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from t2i_jax.conditioning import Conditioning


@dataclasses.dataclass
class Family:
    """The base of every family; subclasses fill in the model and the methods below."""
    config: Any
    conditioning: Conditioning
    image_shape: tuple

    name = "?"
    # The batch entries the loss reads (the data pipeline may give more; a cache of a frozen
    # text encoder's features adds text_features and text_pooled, which the loss reads too).
    # A class attribute, not a dataclass field: a family's own tuple is the one the loop reads.
    batch_keys: ClassVar[tuple] = ("image", "tokens", "mask", "label", "text_features",
                                   "text_pooled")

    @property
    def max_length(self) -> int:
        return self.conditioning.max_length

    @property
    def tokenizer(self):
        """The tokenizer of the captions the loss reads (conditioning/tokenizers.py), or None for a
        model that reads no text."""
        return self.conditioning.tokenizer if self.conditioning.kind == "text" else None

    def text_cache(self):
        """Precomputed per-caption batch fields the data pipeline adds (a frozen text
        encoder's features), or None."""
        return None

    def latent_cache(self):
        """Precomputed per-example batch fields the data pipeline adds by record index (a frozen
        VAE's posterior moments), or None."""
        return None

    def pretrained_params(self):
        """Initial parameters read from elsewhere (a pretrained model's), placed by the loop
        as they are; None: init_params draws them."""
        return None

    def sampling_params(self, params):
        """The parameters sampling runs from a checkpoint's (a LoRA's factors merged into its
        base); the identity for most families."""
        return params

    # --- what a family must supply -------------------------------------------------------
    def init_params(self, key: jax.Array):
        raise NotImplementedError

    def loss(self, params, batch: dict, key: jax.Array, hp: dict):
        """Returns (per-example loss [B], metrics: dict of scalars) for one training batch."""
        raise NotImplementedError

    def hparams(self) -> dict:
        """The loss's traced inputs that are not trained: scalar hyperparameters (values, not
        program constants) and the parameters of frozen models (an autoencoder, a CLIP), which
        the loop places on the devices once and passes to every step."""
        return {}

    def frozen_identity(self) -> dict:
        """{name: what identifies each frozen model this family reads} (its workdir, checkpoint
        step and a hash of its parameters), stored in the config of every checkpoint: a resume
        or a sampler with another frozen model is refused. {} for a family without one."""
        return {}

    def next_command(self, workdir: str) -> str:
        """The command a user runs after training (train.py prints it)."""
        import shlex
        return f"python -m t2i_jax.evaluation.guides --workdir {shlex.quote(workdir)}"

    # --- what sampling asks of a family (declared here: nothing outside families/ probes) ---
    generates = False        # draws images: a sampling job's last stage (training grids them)
    output_kind = "image"    # what a stage of it writes: "image" (PNGs) or "embedding" (.npy)
    stage_input = None       # what it takes from the stage before it (or given inputs): None
                             # (noise and the prompt alone), "image" (an SR stage's low-resolution
                             # input) or "embedding" (an unCLIP decoder's CLIP image embedding)
    low_res_shape = None     # (h, w, C) of the images a stage_input "image" model takes
    guide_flag = None        # the sample.py flag that takes it as a gradient guide
    latent = False           # its chain's x_t is a latent, decoded by to_output
    diffusers_export = False  # a fine-tuned diffusers folder: t2i_jax.export writes it back
    learn_sigma = False      # it predicts IDDPM's variance interpolation too (2C outputs)
    inpaint = False          # GLIDE's mask-conditioned model
    # (what, why) for a model whose chain's x0 is not pixels (a latent, an embedding): pixel
    # thresholding is refused for it, in its config and in any sampling options.
    not_pixels = None
    preview = None           # params -> images: training's progress grid of a non-generator
    final_statistics = None  # params -> dict stored with the final checkpoint

    def program(self, name, make):
        """make() (a jitted function of this family), made once per family object and kept
        with it: the jobs of a sweep and every call of a scorer share its compilation."""
        programs = self.__dict__.setdefault("_programs", {})
        if name not in programs:
            programs[name] = make()
        return programs[name]

    def stage_fields(self, given, level=None) -> dict:
        """The Condition fields (host arrays [B, ...]) of what this stage takes from the stage
        before it (stage_input): an SR stage's images, a decoder's embeddings."""
        raise ValueError(f"a {self.name} model takes no input from a stage before it.")

    def spacing_of(self, sampler: str):
        """The timestep spacing `sampler` visits for this model (None: the config's; a diffusers
        folder: its scheduler class's)."""
        return None

    def default_aug_level(self):
        """An SR stage's noise-conditioning augmentation level (None: it has none)."""
        return None

    def default_candidates(self) -> int:
        """Samples drawn per output, the best kept (an unCLIP prior's candidates)."""
        return 1

    def not_generator_hint(self, workdir: str) -> str:
        """What to do with a workdir of this family given to sample.py ("": nothing to add)."""
        return ""



PIXEL_THRESHOLDS = ("static", "dynamic")


def thresholding_refusal(thresholding, flag: str, what: str, why: str) -> str:
    """The refusal of pixel thresholding for a model whose x0 is not pixels (`what`: "a latent
    model", "a prior"; `why`: what its x0 is)."""
    return (f"{flag} {thresholding} is refused for {what}: it clips x0_hat to [-1, 1] "
            + ("(dynamic: rescales it into [-1, 1]) " if thresholding == "dynamic" else "")
            + f"each step, the range of pixels, but {why}. Use "
            + ("--config.sample.thresholding=none" if flag.startswith("config.") else f"{flag} none")
            + f" ({what}'s default).")


def image_shape(config) -> tuple:
    return (config.data.image_size, config.data.image_size, config.data.channels)


def quarter_means(per_example: jax.Array, t: jax.Array, num_timesteps: int, name: str) -> dict:
    """{name_q0..q3: the mean of per_example over the examples whose t is in each quarter of
    [0, T)} (NaN where a quarter has none)."""
    quarter = (t * 4) // num_timesteps
    out = {}
    for q in range(4):
        in_q = (quarter == q).astype(jnp.float32)
        out[f"{name}_q{q}"] = jnp.sum(per_example * in_q) / jnp.sum(in_q)
    return out
