"""Publisher weights: safetensors files (one, or shards with their index) read into Flax
parameters, one slice per device; their content hash; and the writer of that layout.

Tensors are read with the `safetensors` package into numpy (never torch), one slice per device:
with a mesh of fsdp > 1, each device reads only its 1/fsdp of each large tensor from the
memory-mapped file, so a T5-XXL encoder never sits whole on one device (or in host memory).

Each port (models/t5.py, models/hf_clip.py, models/unet2d_condition.py,
models/autoencoder_kl.py) gives a `param_map(cfg)` (a `ParamMap`): for every Flax parameter path,
the publisher's tensor name(s) (first present wins), its shape in the publisher's layout, and the
transform from that layout to Flax's ("none", "transpose" for torch Linear [out, in] ->
[in, out], "conv" for OIHW -> HWIO). A missing, misnamed or misshapen tensor is named in the
error. models/pretrained reads a whole publisher directory with it; diffusers' folders
(diffusion_pytorch_model[.fp16].safetensors, or shards with their index) go through the same
`weight_files`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from t2i_jax import files

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


def brief(problems: list, shown: int = 2) -> str:
    """The first `shown` problems and how many more: one readable line, however many tensors."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


def params_from_tensors(pmap: ParamMap, tensors: Dict[str, np.ndarray]) -> dict:
    """{"params": nested Flax params} from a dict of publisher tensors (host numpy, whole);
    ValueError naming each missing or misshapen tensor. The sharded path is `load_params`."""
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
        raise ValueError("the weights do not fit the model: " + brief(problems) + ".")
    return {"params": _nest(flat)}


def from_flax_layout(a: np.ndarray, transform: str) -> np.ndarray:
    """The inverse of to_flax_layout: a Flax parameter back in the publisher's layout."""
    if transform == "none":
        return a
    if transform == "transpose":
        return a.T
    if transform == "conv":  # [kh, kw, I, O] -> [O, I, kh, kw]
        return np.transpose(a, (3, 2, 0, 1))
    raise ValueError(f"unknown transform {transform!r}; one of {TRANSFORMS}.")


def write_safetensors(directory: str, tensors: Dict[str, np.ndarray], shards: int = 1,
                      stem: str = "model") -> None:
    """Writes tensors as the publisher does: `model.safetensors`, or with shards > 1
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json` (its weight_map);
    stem: the file names' ("diffusion_pytorch_model" in a diffusers folder)."""
    from safetensors.numpy import save

    def write(file, part):  # atomically, with the usual file mode (not safetensors' 0600)
        with files.atomic_open(os.path.join(directory, file), "wb") as f:
            f.write(save(part, metadata={"format": "pt"}))

    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    if shards <= 1:
        write(f"{stem}.safetensors", {n: np.ascontiguousarray(tensors[n]) for n in names})
        return
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"{stem}-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: np.ascontiguousarray(tensors[n]) for n in names[s::shards]}
        write(file, part)
        weight_map.update({n: file for n in part})
        total += sum(a.nbytes for a in part.values())
    with files.atomic_open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


WEIGHTS_INDEX = "model.safetensors.index.json"
# the files besides the weights that decide an encoder's output (part of its content hash)
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")


def _variant(filename: str) -> Optional[str]:
    """The variant a weight file's name carries, as diffusers names them: None for
    `model.safetensors`, `model-00001-of-00002.safetensors`, `x.safetensors.index.json`; "fp16"
    for `x.fp16.safetensors`, `x.fp16-00001-of-00002.safetensors`,
    `x.safetensors.index.fp16.json`."""
    if ".safetensors.index" in filename:
        middle = filename.split(".safetensors.index", 1)[1][:-len(".json")]  # "" or ".fp16"
        return middle[1:] or None
    stem = _SHARD_SUFFIX.sub("", filename[:-len(".safetensors")])
    return stem.split(".", 1)[1] if "." in stem else None


def weight_files(directory: str, variant: Optional[str] = None) -> Dict[str, str]:
    """{tensor name: file} of a directory's safetensors weights: one file, or the shards that its
    index (`*.safetensors.index.json`: transformers' `model.`, diffusers'
    `diffusion_pytorch_model.`) lists.

    variant: the files of that variant (diffusers' `*.fp16.safetensors`, `*.safetensors.index.fp16
    .json`). None reads the files without a variant, or, where every file has the same one (a
    folder holding only `*.fp16.safetensors`), those; a folder holding several is refused unless
    `variant` picks one, so two copies of the weights are never mixed."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors"))
                   + glob.glob(os.path.join(directory, "*.safetensors.index*.json")))
    by_variant: Dict[Optional[str], list] = {}
    for name in names:
        by_variant.setdefault(_variant(name), []).append(name)
    if not names:
        found = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))]
        hint = (f" (it has {found}: PyTorch pickles, which this loader does not read; convert "
                "them to safetensors)") if found else ""
        raise ValueError(f"{directory} has no *.safetensors weights{hint}: the loader reads "
                         "model.safetensors, or sharded *.safetensors with "
                         f"{WEIGHTS_INDEX} (diffusers: diffusion_pytorch_model[.fp16].safetensors "
                         "or its shards with their index).")
    if variant is None and None not in by_variant and len(by_variant) == 1:
        variant = next(iter(by_variant))
    if variant not in by_variant:
        held = sorted(by_variant, key=lambda v: v or "")
        raise ValueError(f"{directory} holds the weight variants {held} (None: files without "
                         f"one), not {variant!r}: pass variant= one of them.")
    chosen = by_variant[variant]
    indexes = [n for n in chosen if n.endswith(".json")]
    if len(indexes) > 1:
        raise ValueError(f"{directory} has several safetensors indexes {indexes}: keep the one "
                         "of the checkpoint to read.")
    if indexes:
        index = os.path.join(directory, indexes[0])
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
    tensors = {}
    for name in chosen:
        path = os.path.join(directory, name)
        with _open(path) as f:
            tensors.update({k: path for k in f.keys()})
    return tensors


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


def load_params(directory: str, pmap: ParamMap, *, mesh=None, dtype="float32",
                variant: Optional[str] = None):
    """{"params": ...} of a port from a directory's safetensors weights, cast to dtype.

    mesh None: host numpy arrays. With a mesh: jax.Arrays laid out by sharding.leaf_sharding
    (split over "fsdp" along the largest divisible axis with fsdp > 1), each device's piece read
    from the memory-mapped file on its own, so no tensor is ever whole on one device.
    A missing, misnamed or misshapen tensor is named in the error (all of them at once).
    variant: which weight files to read where a folder holds several (see `weight_files`)."""
    reader = _Reader(weight_files(directory, variant))
    target = None if dtype == "auto" else np.dtype(jax_dtype(dtype))  # "auto": the file's
    cast = lambda a: a if target is None or a.dtype == target else a.astype(target)  # noqa: E731
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
                             + brief(problems) + " (is config.json the one published with these "
                             "weights?).")
        flat = {}
        for path, (name, transform) in chosen.items():
            shape = flax_shape(pmap[path][1], transform)
            if mesh is None:
                flat[path] = cast(to_flax_layout(reader.read(name), transform))
                continue
            import jax
            from t2i_jax import sharding as mesh_lib

            def piece(index, name=name, transform=transform):
                a = reader.read(name, _publisher_index(index, transform))
                return cast(to_flax_layout(a, transform))

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


def content_sha256(directory: str, variant: Optional[str] = None) -> str:
    """A hash of what decides the encoder's output: config.json, the tokenizer files and every
    weight file's bytes (file names included). Weight files are hashed once per (path, size,
    mtime) and remembered in ~/.cache/t2i_jax/sha256.json ($T2I_JAX_CACHE), since a T5-XXL's are
    tens of GB."""
    h = hashlib.sha256()
    names = ["config.json"] + [n for n in TOKENIZER_FILES
                               if os.path.isfile(os.path.join(directory, n))]
    weights = sorted(set(weight_files(directory, variant).values()))
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
