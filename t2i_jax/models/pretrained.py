"""Pretrained text and image encoders from a local directory in the Hugging Face layout.

    enc = pretrained.load("/data/t5-v1_1-xl")           # config.json + *.safetensors + tokenizer
    feats = enc.encode(["a red circle"])                 # TextFeatures [B, L, D], mask, pooled

Nothing is downloaded: a directory holds `config.json`, the weights as `model.safetensors` (or
shards `*.safetensors` with `model.safetensors.index.json`) and the tokenizer files (T5:
`spiece.model`; CLIP: `tokenizer.json`, or `vocab.json` + `merges.txt`). Tensors are read with
the `safetensors` package into numpy (never torch), one slice per device: with a mesh of
fsdp > 1, each device reads only its 1/fsdp of each large tensor from the memory-mapped file,
so a T5-XXL encoder never sits whole on one device (or in host memory).

Each port (models/t5.py, models/hf_clip.py) gives a `param_map(cfg)`: for every Flax parameter
path, the publisher's tensor name(s), its shape in the publisher's layout, and the transform
from that layout to Flax's ("none", "transpose" for torch Linear [out, in] -> [in, out], "conv"
for OIHW -> HWIO). A missing, misnamed or misshapen tensor is named in the error.

Command line:
    python -m t2i_jax.models.pretrained encode DIR --text "..." [--text ...] --out F.npz
    python -m t2i_jax.models.pretrained encode CLIP_DIR --image a.png [--image ...] --out F.npz
    python -m t2i_jax.models.pretrained make-tiny DIR [--kind t5|clip]
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np

TRANSFORMS = ("none", "transpose", "conv")
# flax path "a/b/kernel" -> (publisher names (first present wins), publisher shape, transform)
ParamMap = Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...], str]]


def flax_shape(shape: tuple, transform: str) -> tuple:
    """The Flax shape of a publisher tensor of `shape` after `transform`."""
    if transform == "none":
        return tuple(shape)
    if transform == "transpose":
        return tuple(shape[::-1])
    if transform == "conv":  # [O, I, kh, kw] -> [kh, kw, I, O]
        o, i, kh, kw = shape
        return (kh, kw, i, o)
    raise ValueError(f"unknown transform {transform!r}; one of {TRANSFORMS}.")


def to_flax_layout(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "none":
        return a
    if transform == "transpose":
        return a.T
    if transform == "conv":
        return np.transpose(a, (2, 3, 1, 0))
    raise ValueError(f"unknown transform {transform!r}; one of {TRANSFORMS}.")


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def params_from_tensors(pmap: ParamMap, tensors: Dict[str, np.ndarray]) -> dict:
    """{"params": nested Flax params} from a dict of publisher tensors (host numpy, whole);
    ValueError naming each missing or misshapen tensor. The loader's sharded path is `load`."""
    flat, problems = {}, []
    for path, (names, shape, transform) in pmap.items():
        name = next((n for n in names if n in tensors), None)
        if name is None:
            problems.append(f"missing tensor {names[0]!r} (for {path})")
            continue
        a = np.asarray(tensors[name])
        if tuple(a.shape) != tuple(shape):
            problems.append(f"tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
            continue
        flat[path] = to_flax_layout(a, transform)
    if problems:
        raise ValueError("the weights do not fit the model: " + "; ".join(problems) + ".")
    return {"params": _nest(flat)}


def write_safetensors(directory: str, tensors: Dict[str, np.ndarray], shards: int = 1) -> None:
    """Writes tensors as the publisher does: `model.safetensors`, or with shards > 1
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json` (its weight_map)."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: np.ascontiguousarray(tensors[n]) for n in names},
                  os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: np.ascontiguousarray(tensors[n]) for n in names[s::shards]}
        save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(a.nbytes for a in part.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Reading a directory

import dataclasses  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
from typing import Any, Optional  # noqa: E402

KINDS = ("t5", "clip")
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json")


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
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e


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


def weight_files(directory: str) -> Dict[str, str]:
    """{tensor name: file} of a directory's safetensors weights (one file, or the shards that
    model.safetensors.index.json lists)."""
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map: it is not a safetensors index.")
        missing = sorted({v for v in weight_map.values()
                          if not os.path.isfile(os.path.join(directory, v))})
        if missing:
            raise ValueError(f"{index} lists shards that are not in {directory}: {missing}; "
                             "copy every shard of the checkpoint.")
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        found = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))]
        hint = (f" (it has {found}: PyTorch pickles, which this loader does not read; convert "
                "them to safetensors)") if found else ""
        raise ValueError(f"{directory} has no *.safetensors weights{hint}: the loader reads "
                         "model.safetensors, or sharded *.safetensors with "
                         f"{WEIGHTS_INDEX}.")
    names = {}
    for path in files:
        with _open(path) as f:
            names.update({k: path for k in f.keys()})
    return names


def _open(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error type for a bad header or size
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or "
                         "damaged; copy it again from the publisher's files.") from e


class _Reader:
    """Open safetensors files; reads a tensor, or one slice of it, by publisher name."""

    def __init__(self, files: Dict[str, str]):
        self.files = files
        self._handles: Dict[str, Any] = {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open(path).__enter__()
        return self._handles[path]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index=None) -> np.ndarray:
        """The tensor, or its `index` (a tuple of slices in the publisher's layout)."""
        try:
            if index is None:
                return self._handle(name).get_tensor(name)
            return self._handle(name).get_slice(name)[index]
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"could not read tensor {name!r} from {self.files[name]} ({e}): the "
                             "file is truncated or damaged; copy it again.") from e

    def close(self):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _publisher_index(index: tuple, transform: str) -> tuple:
    if transform == "none":
        return tuple(index)
    if transform == "transpose":
        return tuple(index[::-1])
    kh, kw, i, o = index  # conv: Flax [kh, kw, I, O] <- publisher [O, I, kh, kw]
    return (o, i, kh, kw)


def load_params(directory: str, pmap: ParamMap, *, mesh=None, dtype="float32"):
    """{"params": ...} of a port from a directory's safetensors weights, cast to dtype.

    mesh None: host numpy arrays. With a mesh: jax.Arrays laid out by sharding.leaf_sharding
    (split over "fsdp" along the largest divisible axis with fsdp > 1), each device's piece read
    from the memory-mapped file on its own, so no tensor is ever whole on one device.
    A missing, misnamed or misshapen tensor is named in the error (all of them at once)."""
    reader = _Reader(weight_files(directory))
    target = np.dtype(jax_dtype(dtype))
    try:
        chosen, problems = {}, []
        for path, (names, shape, transform) in pmap.items():
            name = next((n for n in names if n in reader), None)
            if name is None:
                near = [k for k in reader.files if k.rsplit(".", 1)[0].endswith(
                    names[0].rsplit(".", 2)[-2])][:3]
                problems.append(f"missing tensor {names[0]!r}" + (
                    f" (similar names in the files: {near})" if near else ""))
                continue
            got = reader.shape(name)
            if got != tuple(shape):
                problems.append(f"tensor {name!r} has shape {got}, the config says {tuple(shape)}")
                continue
            chosen[path] = (name, transform)
        if problems:
            raise ValueError(f"the weights in {directory} do not fit its config.json: "
                             + "; ".join(problems) + ".")
        flat = {}
        for path, (name, transform) in chosen.items():
            shape = flax_shape(pmap[path][1], transform)
            if mesh is None:
                flat[path] = to_flax_layout(reader.read(name), transform).astype(target)
                continue
            import jax
            from t2i_jax import sharding as mesh_lib

            def piece(index, name=name, transform=transform):
                a = reader.read(name, _publisher_index(index, transform))
                return to_flax_layout(a, transform).astype(target)

            flat[path] = jax.make_array_from_callback(
                shape, mesh_lib.leaf_sharding(shape, mesh), piece)
        return {"params": _nest(flat)}
    finally:
        reader.close()


def jax_dtype(name: str):
    import jax.numpy as jnp
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}; one of float32, bfloat16, float16.")
    return jnp.dtype(name)


def content_sha256(directory: str) -> str:
    """A hash of what decides the encoder's output: config.json, the tokenizer files and every
    weight file's bytes (file names included). Weight files are hashed once per (path, size,
    mtime) and remembered in ~/.cache/t2i_jax/sha256.json ($T2I_JAX_CACHE), since a T5-XXL's are
    tens of GB."""
    h = hashlib.sha256()
    names = ["config.json"] + [n for n in TOKENIZER_FILES
                               if os.path.isfile(os.path.join(directory, n))]
    weights = sorted(set(weight_files(directory).values()))
    memo = _HashMemo()
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            h.update(f"{name}|".encode() + hashlib.sha256(f.read()).hexdigest().encode())
    for path in weights:
        h.update(f"{os.path.basename(path)}|{memo.file_sha256(path)}".encode())
    memo.save()
    return h.hexdigest()


def cache_root(directory: Optional[str] = None) -> str:
    """Where t2i_jax keeps what it derives from pretrained weights (file hashes, text feature
    caches): `directory`, else $T2I_JAX_CACHE, else ~/.cache/t2i_jax."""
    return directory or os.environ.get("T2I_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "t2i_jax")


class _HashMemo:
    def __init__(self):
        self.path = os.path.join(cache_root(), "sha256.json")
        self.changed = False
        try:
            with open(self.path, encoding="utf-8") as f:
                self.table = json.load(f)
        except (OSError, ValueError):
            self.table = {}

    def file_sha256(self, path: str) -> str:
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.table:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            self.table[key] = h.hexdigest()
            self.changed = True
        return self.table[key]

    def save(self):
        if not self.changed:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.table, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: hash again next time


# ---------------------------------------------------------------------------------------------
# A frozen text encoder

DEFAULT_T5_LENGTH = 128  # Imagen's maximum text length


def _port(kind: str):
    """(config from config.json, module class, param_map, tokenizer class) of a port."""
    if kind == "t5":
        from t2i_jax.models import t5
        return t5.T5Config.from_hf, t5.T5Encoder, t5.param_map, t5.T5Tokenizer
    from t2i_jax.models import hf_clip
    return hf_clip.text_config_from_hf, hf_clip.CLIPTextTransformer, hf_clip.text_param_map, \
        hf_clip.CLIPTokenizer


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
        import jax
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
        import jax
        import jax.numpy as jnp
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
         mesh=None, dtype: str = "float32") -> TextEncoder:
    """The text encoder of a local publisher directory (config.json, safetensors, tokenizer).

    kind: "t5" or "clip" (None: from config.json's model_type; given, it must agree).
    max_length: the tokenizer's row length (default: 128 for T5, the position table's for CLIP).
    mesh: place the parameters sharded on it (see load_params); None keeps host arrays.
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
    tokenizer = tokenizer_cls.from_dir(directory, max_length, cfg.vocab_size)
    params = load_params(directory, pmap_fn(cfg), mesh=mesh, dtype="float32")
    return TextEncoder(found, directory, hf, cfg, module_cls(cfg), params, tokenizer)


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
        import jax
        from t2i_jax.models import hf_clip
        if not hasattr(self, "_jitted"):
            def run(params, images):
                pixels = hf_clip.preprocess(images, self.cfg.image_size,
                                            processor_config=self.processor)
                return self.module.apply(params, pixels)
            self._jitted = jax.jit(run)
        out = self._jitted(self.params, np.asarray(images, np.float32))
        return type(out)(*(np.asarray(a) for a in out))


def load_image_encoder(directory: str, *, mesh=None) -> ImageEncoder:
    """CLIP's image tower of a local publisher directory (see `load`)."""
    from t2i_jax.models import hf_clip
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
    return ImageEncoder(directory, cfg, hf_clip.CLIPVisionTransformer(cfg), params, processor)


# ---------------------------------------------------------------------------------------------
# Command line


def _read_images(paths) -> np.ndarray:
    from PIL import Image
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0)
        except (OSError, ValueError) as e:
            raise ValueError(f"--image {p} is not a readable image ({e}).") from e
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"the --image files have different sizes {sorted({a.shape for a in out})}; "
                         "encode images of one size per call.")
    return np.stack(out)


def _encode_main(args) -> None:
    if not args.text and not args.image:
        raise ValueError("give --text PROMPT (repeatable) and/or --image FILE (a CLIP directory).")
    arrays, said = {}, []
    if args.image:
        images = _read_images(args.image)  # refused before the model is read
    if args.text:
        enc = load(args.directory, max_length=args.max_length)
        feats, toks = enc.encode(args.text)
        arrays.update(tokens=feats.tokens, mask=feats.mask, pooled=feats.pooled,
                      ids=toks.ids, truncated=toks.truncated, text=np.asarray(args.text))
        said.append(f"{enc.kind} text encoder: {len(args.text)} prompt(s) -> tokens "
                    f"{feats.tokens.shape}, mask {feats.mask.shape}, pooled {feats.pooled.shape}")
    if args.image:
        vis = load_image_encoder(args.directory)
        out = vis.encode(images)
        arrays.update(image_embeds=out.image_embeds, image_pooled=out.pooled,
                      image_tokens=out.last_hidden_state)
        said.append(f"CLIP image tower: {len(images)} image(s) -> image_embeds "
                    f"{out.image_embeds.shape}, image_tokens {out.last_hidden_state.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"[t2i_jax] {args.directory}: " + "; ".join(said) + f": {args.out}")


# t5-v1_1-base's shapes (with the tiny vocabulary): for timing an encoder of the real size
T5_BASE_SHAPES = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128)


def _make_tiny_main(args) -> None:
    if args.kind == "t5":
        from t2i_jax.models import t5 as port
    else:
        from t2i_jax.models import hf_clip as port
    if os.path.exists(os.path.join(args.directory, "config.json")) and not args.overwrite:
        raise SystemExit(f"error: {args.directory} already holds a model (config.json); pass "
                         "--overwrite to replace it, or choose another directory.")
    overrides = {}
    if args.size == "base":
        if args.kind != "t5":
            raise ValueError("--size base is available for --kind t5 only.")
        overrides = T5_BASE_SHAPES
    port.write_tiny(args.directory, seed=args.seed, shards=args.shards, **overrides)
    print(f"[t2i_jax] wrote a {args.size} random {args.kind} in the publisher's layout to "
          f"{args.directory}: {sorted(os.listdir(args.directory))}")


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m t2i_jax.models.pretrained",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("encode", help="encode prompts (T5, CLIP) or images (CLIP) into an .npz")
    p.add_argument("directory", help="the model's directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--text", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--image", action="append", default=[],
                   help="an image file for CLIP's image tower (repeatable)")
    p.add_argument("--out", required=True, help="the .npz to write: tokens [B, L, D], mask, "
                   "pooled (text); image_embeds [B, P], image_pooled, image_tokens (images)")
    p.add_argument("--max_length", type=int, default=None, help="tokens per prompt")
    p = sub.add_parser("make-tiny", help="write a tiny random T5 or CLIP in the publisher's layout")
    p.add_argument("directory")
    p.add_argument("--kind", choices=KINDS, default="t5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="weight files (>1: with an index)")
    p.add_argument("--size", choices=("tiny", "base"), default="tiny",
                   help="base: t5-v1_1-base's layer sizes (random, tiny vocabulary), for timing")
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        (_encode_main if args.command == "encode" else _make_tiny_main)(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
