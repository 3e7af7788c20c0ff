"""A frozen pretrained text encoder as a diffusion model's condition: Imagen's frozen T5 (Saharia
et al. 2022, sec. 2.1), Stable Diffusion's CLIP text encoder (Rombach et al. 2022).

    config.model.text_encoder = dict(kind="t5", path="/data/t5-v1_1-xl", max_length=128)
    config.train.text_cache = True         # optional: precompute the captions' features once

kind "trained" (the default) is GLIDE's byte-level encoder trained with the UNet (models/text.py);
"t5" and "clip" read a local publisher directory (models/pretrained). The encoder's
parameters never enter the TrainState: the family passes them to the loss through `hparams()`
and to sampling through `sampling_inputs()`, so they are not trained, not averaged, not in the
optimizer state and not in this model's checkpoints, which record the encoder's kind, directory
and content hash instead (config["frozen"]["text_encoder"]) and refuse another.

The text features of a batch are computed inside the jitted step (under stop_gradient), or with
`train.text_cache=True` read from a cache of every caption of the training split, encoded once (as Imagen
precomputes its T5 embeddings): the data pipeline then delivers text_features [B, L, D] and
text_pooled [B, P] with each batch, and the step never runs the encoder. The null condition is
the encoding of the empty prompt (SD, Imagen), computed once with the encoder and used both by
training dropout and by sampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("trained", "t5", "clip")
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    kind: str = "trained"
    path: Optional[str] = None          # the publisher directory (t5, clip)
    max_length: Optional[int] = None    # tokens per caption (None: the port's default)
    dtype: str = "float32"              # the encoder's compute dtype

    @classmethod
    def from_config(cls, model_config) -> "TextEncoderConfig":
        section = model_config.get("text_encoder", None) if hasattr(model_config, "get") else None
        section = dict(section or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"unknown model.text_encoder settings {unknown}; it reads "
                             f"{sorted(names)}.")
        cfg = cls(**section)
        if cfg.kind not in KINDS:
            raise ValueError(f"model.text_encoder.kind={cfg.kind!r}; choose one of {KINDS}.")
        if cfg.frozen and not cfg.path:
            raise ValueError(f"model.text_encoder.kind={cfg.kind!r} needs model.text_encoder.path: "
                             f"a local directory holding the {cfg.kind} in the Hugging Face layout "
                             "(config.json, *.safetensors, tokenizer files); nothing is downloaded. "
                             "For a tiny offline one: python -m t2i_jax.models.pretrained make-tiny "
                             f"DIR --kind {cfg.kind}.")
        return cfg

    @property
    def frozen(self) -> bool:
        return self.kind != "trained"


@dataclasses.dataclass
class FrozenText:
    """A loaded frozen text encoder with its null features (the empty prompt's)."""
    cfg: TextEncoderConfig
    encoder: object      # models.pretrained.TextEncoder (parameters on all devices)
    null_tokens: np.ndarray    # [1, L, D]
    null_pooled: np.ndarray    # [1, P]

    @classmethod
    def load(cls, cfg: TextEncoderConfig, fsdp: int = 1) -> "FrozenText":
        """The encoder's parameters are read straight onto all devices laid out as training lays
        out parameters (split over "fsdp" with fsdp > 1: each device reads its slice of the
        files), so a large encoder is never whole on one device, also not for the null's and the
        cache's encodings. fsdp falls back to 1 where it does not divide the device count (a
        model trained on 8 devices sampled on 1)."""
        from t2i_jax import sharding as mesh_lib
        from t2i_jax.models import pretrained
        n = jax.device_count()
        mesh = mesh_lib.make_mesh(fsdp if fsdp >= 1 and n % fsdp == 0 else 1)
        enc = pretrained.load(cfg.path, kind=cfg.kind, max_length=cfg.max_length, dtype=cfg.dtype,
                              mesh=mesh)
        feats, _ = enc.encode([""])
        return cls(cfg, enc, feats.tokens, feats.pooled)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def params(self):
        return self.encoder.params

    @property
    def width(self) -> int:
        return int(self.null_tokens.shape[-1])

    def identity(self) -> dict:
        return self.encoder.identity()

    def features(self, params, tokens, mask):
        """(token features [B, L, D], pooled [B, P]) of token rows, held fixed (no gradient)."""
        out = self.encoder.apply(params, tokens, mask)
        return (jax.lax.stop_gradient(out.tokens.astype(jnp.float32)),
                jax.lax.stop_gradient(out.pooled.astype(jnp.float32)))

    # --- the cache ----------------------------------------------------------------------
    @property
    def workdir(self) -> str:
        return self.encoder.directory

    def cache_path(self, data_config, cache_dir: Optional[str] = None) -> str:
        """The cache directory of this encoder (content hash), tokenizer length and data set."""
        from t2i_jax import data as data_lib
        ident = self.identity()
        s = data_lib.settings(data_config)
        key = hashlib.sha256(json.dumps(dict(
            v=CACHE_VERSION, sha256=ident["sha256"], L=self.tokenizer.max_length,
            dtype=self.cfg.dtype, data=data_config.name,
            data_dir=data_lib.default_data_dir(s.data_dir),
            examples=data_lib.split_size(data_config),
            **data_lib.data_identity(data_config)), sort_keys=True).encode()).hexdigest()
        from t2i_jax.models.weights import cache_root
        return os.path.join(cache_root(cache_dir), "text_features", f"{data_config.name}-{key[:16]}")

    def open_cache(self, data_config, cache_dir: Optional[str] = None, *, build: bool = True,
                   batch_size: int = 64) -> "TextCache":
        """The cache of every caption of data_config's training split (built now if absent)."""
        path = self.cache_path(data_config, cache_dir)
        if not os.path.isfile(os.path.join(path, "captions.json")):
            if not build:
                raise ValueError(f"no text feature cache at {path}.")
            self._build_cache(data_config, path, batch_size)
        return TextCache.open(path)

    def _build_cache(self, data_config, path: str, batch_size: int) -> None:
        from t2i_jax import data as data_lib
        captions = sorted(set(data_lib.all_captions(data_config)) | {""})
        L, D = self.null_tokens.shape[1:]
        P = self.null_pooled.shape[-1]
        size = len(captions) * (L * D * 4 + P * 4 + L * 5)
        print(f"[t2i_jax] encoding the {len(captions)} captions of {data_config.name}'s training "
              f"split with the frozen {self.cfg.kind} into {path} ({size / 2 ** 30:.2f} GiB), once.",
              file=sys.stderr)
        _remove_abandoned(path)
        tmp = f"{path}.{os.getpid()}.tmp"
        os.makedirs(tmp, exist_ok=True)
        tokens = np.lib.format.open_memmap(os.path.join(tmp, "tokens.npy"), "w+", np.float32,
                                           (len(captions), L, D))
        pooled = np.zeros((len(captions), P), np.float32)
        masks = np.zeros((len(captions), L), bool)
        ids = np.zeros((len(captions), L), np.int32)
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            pad = batch_size - len(chunk)  # one program: every call has batch_size rows
            feats, toks = self.encoder.encode(chunk + [""] * pad, warn=False)
            end = start + len(chunk)
            tokens[start:end] = feats.tokens[:len(chunk)]
            pooled[start:end] = feats.pooled[:len(chunk)]
            masks[start:end] = toks.mask[:len(chunk)]
            ids[start:end] = toks.ids[:len(chunk)]
        tokens.flush()
        del tokens
        np.save(os.path.join(tmp, "pooled.npy"), pooled)
        np.save(os.path.join(tmp, "mask.npy"), masks)
        np.save(os.path.join(tmp, "ids.npy"), ids)
        with open(os.path.join(tmp, "captions.json"), "w", encoding="utf-8") as f:
            json.dump(dict(captions=captions, encoder=self.identity(), data=data_config.name,
                           max_length=self.tokenizer.max_length), f)
        try:
            os.replace(tmp, path)  # whole or absent: a killed build is never mistaken for a cache
        except OSError:  # another process finished the same cache first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned(path: str) -> None:
    """Removes the partial caches that killed builds left (PATH.PID.tmp of a dead process)."""
    import glob
    import shutil
    for tmp in glob.glob(f"{path}.*.tmp"):
        try:
            os.kill(int(tmp.rsplit(".", 2)[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class TextCache:
    """The features of a data set's captions on disk: caption -> (tokens [L, D] (memory-mapped),
    pooled [P]), with the token ids and mask the tokenizer gave."""

    def __init__(self, path: str, captions: list, tokens, pooled, mask, ids):
        self.path = path
        self.row = {c: i for i, c in enumerate(captions)}
        self.tokens, self.pooled, self.mask, self.ids = tokens, pooled, mask, ids

    @classmethod
    def open(cls, path: str) -> "TextCache":
        with open(os.path.join(path, "captions.json"), encoding="utf-8") as f:
            meta = json.load(f)
        load = lambda name, mmap=None: np.load(os.path.join(path, name), mmap_mode=mmap)
        return cls(path, meta["captions"], load("tokens.npy", "r"), load("pooled.npy"),
                   load("mask.npy"), load("ids.npy"))

    def __len__(self) -> int:
        return len(self.row)

    @property
    def bytes_per_example(self) -> int:
        return int(self.tokens[0].nbytes + self.pooled[0].nbytes + self.mask[0].nbytes)

    def lookup(self, caption: str) -> dict:
        """The batch fields of one caption: text_features [L, D], text_pooled [P]."""
        i = self.row.get(caption)
        if i is None:
            raise KeyError(f"caption {caption!r} is not in the text feature cache {self.path}: "
                           "the cache holds the training split's captions; delete the directory "
                           "to rebuild it.")
        return {"text_features": np.asarray(self.tokens[i]), "text_pooled": self.pooled[i]}
