"""Pretrained text and image encoders from a local directory in the Hugging Face layout.

    enc = pretrained.load("/data/t5-v1_1-xl")           # config.json + *.safetensors + tokenizer
    feats = enc.encode(["a red circle"])                 # TextFeatures [B, L, D], mask, pooled

Nothing is downloaded: a directory holds `config.json`, the weights as `model.safetensors` (or
shards `*.safetensors` with `model.safetensors.index.json`) and the tokenizer files (T5:
`spiece.model`; CLIP: `tokenizer.json`, or `vocab.json` + `merges.txt`). The weights are read by
models/weights.py (one slice per device, with a mesh) through each port's `param_map`
(models/t5.py, models/hf_clip.py); the tokenizers are conditioning/'s.

Command line (pretrained/cli.py):
    python -m t2i_jax.models.pretrained encode DIR --text "..." [--text ...] --out F.npz
    python -m t2i_jax.models.pretrained encode CLIP_DIR --image a.png [--image ...] --out F.npz
    python -m t2i_jax.models.pretrained make-tiny DIR [--kind t5|clip]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import files
from t2i_jax.conditioning import CLIPTokenizer, T5Tokenizer
from t2i_jax.models import hf_clip, hf_clip_vision, t5
from t2i_jax.models.weights import content_sha256, load_params

KINDS = ("t5", "clip")


def read_hf_config(directory: str) -> dict:
    """config.json of a publisher directory; ValueError naming what is missing."""
    if not directory or not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is not a directory: point it at a local copy of the "
                         "model in the Hugging Face layout (config.json, *.safetensors, tokenizer "
                         "files); nothing is downloaded.")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no config.json: it is not a model directory in the "
                         "Hugging Face layout (config.json + model.safetensors + tokenizer files). "
                         "Point it at the folder that holds config.json (for Stable Diffusion, "
                         "its text_encoder/ subfolder).")
    return files.read_json(path)


def kind_of(hf_config: dict, directory: str = "") -> str:
    """"t5" or "clip" from config.json's model_type; ValueError for another architecture."""
    model_type = hf_config.get("model_type")
    if model_type == "t5":
        return "t5"
    if model_type in ("clip", "clip_text_model"):
        return "clip"
    raise ValueError(f"{os.path.join(directory, 'config.json')} describes a model of type "
                     f"{model_type!r} (architectures {hf_config.get('architectures')}); this loader "
                     "reads text encoders of type 't5' (T5 v1.1, Flan-T5, T5) and 'clip' / "
                     "'clip_text_model' (OpenAI CLIP, Stable Diffusion's text_encoder).")


# ---------------------------------------------------------------------------------------------
# A frozen text encoder

DEFAULT_T5_LENGTH = 128  # Imagen's maximum text length


def _port(kind: str):
    """(config from config.json, module class, param_map, tokenizer class) of a port."""
    if kind == "t5":
        return t5.T5Config.from_hf, t5.T5Encoder, t5.param_map, T5Tokenizer
    return hf_clip.text_config_from_hf, hf_clip.CLIPTextTransformer, hf_clip.text_param_map, \
        CLIPTokenizer


@dataclasses.dataclass
class TextEncoder:
    """A pretrained text encoder read from a publisher directory: its Flax module, parameters
    and tokenizer. `apply(params, ids, mask)` is pure (jit it, pass params as an argument);
    `encode(texts)` tokenizes and runs it (jitted once) for host callers."""
    kind: str
    directory: str
    hf_config: dict
    cfg: Any
    module: Any
    params: Any
    tokenizer: Any

    def apply(self, params, ids, mask):
        """TextFeatures(tokens [B, L, D], mask [B, L], pooled [B, P]) of token rows."""
        return self.module.apply(params, ids, mask)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def encode(self, texts, warn: bool = True):
        """TextFeatures of texts as numpy arrays (float32)."""
        if not hasattr(self, "_jitted"):
            sharding = getattr(jax.tree_util.tree_leaves(self.params)[0], "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding):  # parameters on a mesh: the
                # features come back replicated, readable on every process
                rep = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                self._jitted = jax.jit(self.apply, out_shardings=rep)
            else:
                self._jitted = jax.jit(self.apply)
        toks = self.tokenizer(texts, warn=warn)
        feats = self._jitted(self.params, np.asarray(toks.ids), np.asarray(toks.mask))
        return type(feats)(*(np.asarray(a) for a in feats)), toks

    def feature_shapes(self) -> tuple:
        """((L, D) of the token features, (P,) of the pooled vector)."""
        L = self.max_length
        out = jax.eval_shape(self.apply, self.params, jnp.zeros((1, L), jnp.int32),
                             jnp.ones((1, L), bool))
        return tuple(out.tokens.shape[1:]), tuple(out.pooled.shape[1:])

    def identity(self) -> dict:
        """What a checkpoint records of it: kind, directory and a content hash."""
        if not hasattr(self, "_sha256"):
            self._sha256 = content_sha256(self.directory)
        return dict(kind=self.kind, workdir=self.directory, step=0, sha256=self._sha256)


def load(directory: str, *, kind: Optional[str] = None, max_length: Optional[int] = None,
         mesh=None, dtype: str = "float32", tokenizer_dir: Optional[str] = None,
         mask_padding: bool = True) -> TextEncoder:
    """The text encoder of a local publisher directory (config.json, safetensors, tokenizer).

    kind: "t5" or "clip" (None: from config.json's model_type; given, it must agree).
    max_length: the tokenizer's row length (default: 128 for T5, the position table's for CLIP).
    mesh: place the parameters sharded on it (see weights.load_params); None keeps host arrays.
    tokenizer_dir: where the tokenizer files are (default: `directory`; a diffusers pipeline
    keeps them in tokenizer/ beside text_encoder/).
    mask_padding: False runs CLIP as diffusers' Stable Diffusion pipelines do, with no attention
    mask (positions after the EOS see the padding; models/hf_clip.py).
    Every problem is a ValueError that names the file, the tensor or the config field."""
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    hf = read_hf_config(directory)
    found = kind_of(hf, directory)
    if kind is not None and kind != found:
        raise ValueError(f"{directory} holds a {found} model (config.json model_type="
                         f"{hf.get('model_type')!r}), not a {kind} one: point the {kind} "
                         f"setting at a {kind} directory, or set the kind to {found}.")
    from_hf, module_cls, pmap_fn, tokenizer_cls = _port(found)
    try:
        cfg = from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{os.path.join(directory, 'config.json')}: {e}") from e
    if dtype != "float32":
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if max_length is None:
        max_length = DEFAULT_T5_LENGTH if found == "t5" else cfg.max_position_embeddings
    if found == "clip" and max_length > cfg.max_position_embeddings:
        raise ValueError(f"max_length {max_length} exceeds this CLIP's "
                         f"max_position_embeddings={cfg.max_position_embeddings}.")
    tokenizer = tokenizer_cls.from_dir(tokenizer_dir or directory, max_length, cfg.vocab_size)
    params = load_params(directory, pmap_fn(cfg), mesh=mesh, dtype="float32")
    module = module_cls(cfg) if found == "t5" else module_cls(cfg, mask_padding=mask_padding)
    return TextEncoder(found, directory, hf, cfg, module, params, tokenizer)


@dataclasses.dataclass
class ImageEncoder:
    """CLIP's vision tower read from a publisher directory (model_type "clip" or
    "clip_vision_model"), with the directory's preprocessor_config.json (resize, crop, mean,
    std) when it has one."""
    directory: str
    cfg: Any
    module: Any
    params: Any
    processor: Optional[dict]

    def encode(self, images):
        """VisionFeatures (numpy) of images in [-1, 1] [B, H, W, C] (any size: resized and
        centre-cropped as CLIPImageProcessor does)."""
        if not hasattr(self, "_jitted"):
            def run(params, images):
                pixels = hf_clip_vision.preprocess(images, self.cfg.image_size,
                                                   processor_config=self.processor)
                return self.module.apply(params, pixels)
            self._jitted = jax.jit(run)
        out = self._jitted(self.params, np.asarray(images, np.float32))
        return type(out)(*(np.asarray(a) for a in out))


def load_image_encoder(directory: str, *, mesh=None) -> ImageEncoder:
    """CLIP's image tower of a local publisher directory (see `load`)."""
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    hf = read_hf_config(directory)
    if hf.get("model_type") not in ("clip", "clip_vision_model"):
        raise ValueError(f"{os.path.join(directory, 'config.json')} describes a model of type "
                         f"{hf.get('model_type')!r}, which has no CLIP image tower: image "
                         "embeddings need a 'clip' (CLIPModel) or 'clip_vision_model' directory.")
    try:
        cfg = hf_clip.vision_config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{os.path.join(directory, 'config.json')}: {e}") from e
    processor = None
    path = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            processor = json.load(f)
    params = load_params(directory, hf_clip.vision_param_map(cfg), mesh=mesh)
    return ImageEncoder(directory, cfg, hf_clip_vision.CLIPVisionTransformer(cfg), params, processor)
