"""LoRA files for the ported UNet (models/lora.py's factors), in the layouts people share.

Files (safetensors, torch's [out, in] layout): written as diffusers 0.42 writes
`StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(unet),
unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())`: keys
`unet.<module>.lora_A.weight` [r, in] and `unet.<module>.lora_B.weight` [out, r]; the file's
`__metadata__` is {"format": "pt", "lora_adapter_metadata": JSON of {"unet.r": r,
"unet.lora_alpha": alpha, "unet.target_modules": [...], ...}} (PEFT LoraConfig fields prefixed
"unet."), which `pipe.load_lora_weights` turns back into the LoraConfig, so alpha != r survives.
Read as well: PEFT keys without the "unet." prefix (`unet.save_lora_adapter`), diffusers' own
`lora.down`/`lora.up` and `lora_linear_layer.down`/`.up` names, the old attention-processor layout
(`<attn>.processor.to_q_lora.down.weight`, no alpha: alpha = r), and kohya / A1111's
(`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`). Text-encoder LoRA
keys are refused (the project's text encoder stays frozen) unless `skip_text_encoder=True`, which
drops them with a warning.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
from flax import traverse_util

from t2i_jax import files
from t2i_jax.models.lora import (EXAMPLE_LAYERS, LoraConfig, dense_layers, factor_pairs, matches,
                                 resolve_targets)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"             # diffusers' LORA_ADAPTER_METADATA_KEY
_PREFIX = "unet."
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")


def _diffusers_targets(cfg: LoraConfig, pmap) -> List[str]:
    """cfg.targets in diffusers' dotted form (a Flax-form target "to_out_0" -> "to_out.0": the
    two names differ only in their separators)."""
    dense, _ = dense_layers(pmap)
    out = []
    for t in cfg.targets:
        names = [n for m, (n, _, _) in dense.items() if matches(t, m, n)]
        forms = [t] if any(n == t or n.endswith("." + t) for n in names) else \
            sorted({n[-len(t):] for n in names})
        out += [f for f in forms if f not in out]
    return out


def _file(path: str) -> str:
    return os.path.join(path, WEIGHT_NAME) if os.path.isdir(path) else path


def save(path: str, factors, cfg: LoraConfig, pmap) -> str:
    """Writes the factors as diffusers' pytorch_lora_weights.safetensors (the module docstring
    gives the layout) at `path`, or inside it where it is a directory or does not end in
    .safetensors; returns the file's path. The factors must cover exactly cfg.targets' layers."""
    from safetensors.numpy import save as st_save
    dense, _ = dense_layers(pmap)
    pairs = factor_pairs(factors)
    want = resolve_targets(cfg.targets, pmap)
    if set(pairs) != set(want):
        extra, missing = sorted(set(pairs) - set(want)), sorted(set(want) - set(pairs))
        raise ValueError(f"LoRA save: the factors do not cover exactly the layers cfg.targets "
                         f"{list(cfg.targets)} match (extra {extra[:2]}, missing {missing[:2]}).")
    tensors = {}
    for m in want:
        name, d_in, d_out = dense[m]
        a, b = (np.asarray(x, np.float32) for x in pairs[m])
        if a.shape != (d_in, cfg.rank) or b.shape != (cfg.rank, d_out):
            raise ValueError(f"LoRA save: factors at {m} are A {a.shape} B {b.shape}, expected "
                             f"A {(d_in, cfg.rank)} B {(cfg.rank, d_out)} (rank {cfg.rank}).")
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)   # [r, in]
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)   # [out, r]
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    adapter = {"r": cfg.rank, "lora_alpha": alpha, "target_modules": _diffusers_targets(cfg, pmap),
               "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
               "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
               "fan_in_fan_out": False}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(
        {_PREFIX + k: v for k, v in adapter.items()}, indent=2, sort_keys=True)}
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, WEIGHT_NAME)
    with files.atomic_open(path, "wb") as f:
        f.write(st_save(tensors, metadata=metadata))
    return path


_PEFT = re.compile(r"^(?P<m>.+)\.(?:(?P<a>lora_A|lora\.down|lora_linear_layer\.down)|"
                   r"(?P<b>lora_B|lora\.up|lora_linear_layer\.up))\.weight$")
_OLD = re.compile(r"^(?P<m>.+?)\.(?:processor\.)?(?P<p>to_q|to_k|to_v|to_out)_lora\."
                  r"(?:(?P<a>down)|(?P<b>up))\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<m>[^.]+)\.(?:(?P<a>lora_down\.weight)|"
                    r"(?P<b>lora_up\.weight)|(?P<alpha>alpha))$")
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")


def _read(file: str):
    """(tensors as float32 numpy, __metadata__ dict) of a safetensors file; ValueError naming it."""
    from safetensors import safe_open
    if not os.path.isfile(file):
        raise ValueError(f"LoRA file {file} does not exist" + (
            f" (the directory has no {WEIGHT_NAME})" if os.path.isdir(os.path.dirname(file))
            and file.endswith(WEIGHT_NAME) else "") + ".")
    try:
        with safe_open(file, framework="numpy") as f:
            return ({k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()},
                    dict(f.metadata() or {}))
    except Exception as e:  # safetensors raises its own error type for a bad header or size
        raise ValueError(f"LoRA file {file} is not a readable safetensors file ({e}).") from e


def _adapter_metadata(meta: dict, file: str) -> Optional[dict]:
    """diffusers' LoraConfig kwargs for the UNet (prefix "unet." removed), or None."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        adapter = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"LoRA file {file}: its {METADATA_KEY} metadata is not JSON ({e}).") from e
    if any(k.startswith(_PREFIX) for k in adapter):
        return {k[len(_PREFIX):]: v for k, v in adapter.items() if k.startswith(_PREFIX)} or None
    return None if any("." in k for k in adapter) else adapter


def _derived_targets(modules, pmap) -> Tuple[str, ...]:
    """Suffixes that match exactly `modules` among the UNet's Linear layers, in the map's order:
    per layer the usual name ("ff.net.2", not "net.2") where it fits, else the shortest suffix
    not starting with a digit. ("to_q", "to_k", "to_v", "to_out.0") for those layers."""
    dense, _ = dense_layers(pmap)
    chosen = set(modules)
    out: List[str] = []
    fits = lambda t: all(mm in chosen for mm, (n, _, _) in dense.items()  # noqa: E731
                         if matches(t, mm, n))
    for m in (m for m in dense if m in chosen):
        parts = dense[m][0].split(".")
        suffixes = [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]
        t = next((t for t in EXAMPLE_LAYERS if t in suffixes and fits(t)), None) or \
            next(t for t in suffixes if not t[0].isdigit() and fits(t))
        if t not in out:
            out.append(t)
    return tuple(out)


def _classify(file: str, tensors: dict, pmap):
    """({diffusers module: (key, A [r, in])}, the same of B [out, r], of alpha, text-encoder keys,
    unread keys) of a file's tensors; ValueError for a key naming no Linear layer."""
    dense, convs = dense_layers(pmap)
    by_name = {n for n, _, _ in dense.values()}
    conv_names = set(convs.values())
    kohya = {n.replace(".", "_"): n for n in by_name | conv_names}
    found: Dict[str, dict] = {"a": {}, "b": {}, "alpha": {}}
    text, unknown = [], []
    for key in sorted(tensors):
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if key.startswith(_TEXT_PREFIXES):
            text.append(key)
            continue
        hit = _KOHYA.match(k) or _OLD.match(k) or _PEFT.match(k) or _ALPHA.match(k)
        if hit is None:
            unknown.append(key)
            continue
        name = kohya.get(hit["m"], "lora_unet_" + hit["m"]) if hit.re is _KOHYA else hit["m"]
        if hit.re is _OLD:
            name += ".to_out.0" if hit["p"] == "to_out" else "." + hit["p"]
        if name not in by_name:
            what = (f"the convolution {name} (on SD 1.x, proj_in / proj_out are 1x1 convs): only "
                    "Linear layers take LoRA factors here" if name in conv_names
                    else "no Linear layer of this UNet" + (
                        " (kohya's LDM / SDXL block names are not read)" if re.search(
                            "input_blocks|middle_block|output_blocks", name) else ""))
            raise ValueError(f"LoRA file {file}: key {key!r} names {what}.")
        groups = hit.groupdict()
        kind = "a" if groups.get("a") else "b" if groups.get("b") else "alpha"
        found[kind][name] = (key, tensors[key])
    return found["a"], found["b"], found["alpha"], text, unknown


def load(path: str, unet_cfg, pmap=None, *, skip_text_encoder: bool = False):
    """(factors {"params": ...} float32, LoraConfig) from a LoRA safetensors file (or a directory
    holding pytorch_lora_weights.safetensors) in any layout the module docstring lists. alpha:
    the file's adapter metadata, else its per-layer `alpha` tensors, else the rank (diffusers'
    and kohya's convention). pmap: param_map(unet_cfg) where None. ValueError naming the file for
    anything it cannot read exactly."""
    if pmap is None:
        from t2i_jax.models.unet2d_condition import param_map
        pmap = param_map(unet_cfg)
    file = _file(path)
    tensors, meta = _read(file)
    a_of, b_of, alpha_of, text, unknown = _classify(file, tensors, pmap)
    if not a_of and not b_of:
        raise ValueError(f"LoRA file {file} holds no UNet LoRA keys (" + (
            f"{len(text)} text-encoder LoRA keys" if text else
            f"{len(tensors)} keys, e.g. {sorted(tensors)[:1]}") + ").")
    if unknown:
        raise ValueError(f"LoRA file {file}: key {unknown[0]!r} is not a UNet LoRA tensor in a "
                         "layout read here (lora_A/lora_B, lora.down/lora.up, processor.to_q_lora, "
                         f"kohya lora_unet_*.lora_down/lora_up/alpha; DoRA, LoHa, LoKr and "
                         f"bias-carrying LoRA are not supported); {len(unknown)} such key(s).")
    if text and not skip_text_encoder:
        raise ValueError(f"LoRA file {file} holds {len(text)} text-encoder LoRA keys (e.g. "
                         f"{text[0]!r}): not supported (the text encoder stays frozen here); "
                         "pass skip_text_encoder=True to load the UNet's alone.")
    if text:
        warnings.warn(f"LoRA file {file}: {len(text)} text-encoder LoRA keys skipped; the "
                      "images will differ from a pipeline that applies them.", stacklevel=2)
    flat, ranks = {}, {}
    dense, _ = dense_layers(pmap)
    by_name = {n: m for m, (n, _, _) in dense.items()}
    for name in sorted(set(a_of) | set(b_of) | set(alpha_of)):
        if name not in a_of or name not in b_of:
            have = (a_of.get(name) or b_of.get(name) or alpha_of[name])[0]
            raise ValueError(f"LoRA file {file}: layer {name} has no " +
                             ("down / A" if name not in a_of else "up / B") +
                             f" matrix (only {have!r}).")
        m, (_, d_in, d_out) = by_name[name], dense[by_name[name]]
        (ka, a), (_, b) = a_of[name], b_of[name]
        r = a.shape[0] if a.ndim == 2 else None
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(f"LoRA file {file}: {name} has down / A {ka!r} {a.shape} and up / B "
                             f"{b.shape}; the layer ({d_in} in, {d_out} out) needs [r, {d_in}] "
                             f"and [{d_out}, r].")
        ranks[name] = r
        flat[f"{m}/lora_a"], flat[f"{m}/lora_b"] = a.T, b.T      # [in, r], [r, out]
    if len(set(ranks.values())) > 1:
        low, high = min(ranks, key=ranks.get), max(ranks, key=ranks.get)
        raise ValueError(f"LoRA file {file} has inconsistent ranks: {low} {ranks[low]}, {high} "
                         f"{ranks[high]}; one rank for every layer is supported.")
    rank = next(iter(ranks.values()))
    alpha, targets = _alpha_and_targets(file, meta, alpha_of, rank, list(flat), pmap)
    factors = {"params": traverse_util.unflatten_dict(
        {k: np.ascontiguousarray(v) for k, v in flat.items()}, sep="/")}
    modules = sorted({k.rsplit("/", 1)[0] for k in flat})
    return factors, LoraConfig(rank=rank, alpha=alpha,
                               targets=targets or _derived_targets(modules, pmap))


def _alpha_and_targets(file, meta, alpha_of, rank, flat_keys, pmap):
    """(alpha, metadata's target_modules where they match the file's layers exactly, else None)."""
    modules = {k.rsplit("/", 1)[0] for k in flat_keys}
    alphas = {float(np.asarray(v).reshape(-1)[0]) for _, v in alpha_of.values()}
    if len(alphas) > 1:
        raise ValueError(f"LoRA file {file} has per-layer alphas {sorted(alphas)[:4]}; one alpha "
                         "for every layer is supported.")
    alpha = alphas.pop() if alphas else None
    adapter, targets = _adapter_metadata(meta, file), None
    if adapter is not None:
        for flag in ("use_rslora", "use_dora", "lora_bias"):
            if adapter.get(flag):
                raise ValueError(f"LoRA file {file}: its adapter metadata sets {flag}, which is "
                                 "not supported.")
        for pattern in ("rank_pattern", "alpha_pattern"):
            if adapter.get(pattern):
                raise ValueError(f"LoRA file {file}: its adapter metadata has a per-layer "
                                 f"{pattern}; one rank and one alpha for all layers are read.")
        if adapter.get("r") not in (None, rank):
            raise ValueError(f"LoRA file {file}: its metadata says r={adapter['r']}, its tensors "
                             f"rank {rank}.")
        if adapter.get("lora_alpha") is not None:
            meta_alpha = float(adapter["lora_alpha"])
            if alpha is not None and alpha != meta_alpha:
                raise ValueError(f"LoRA file {file}: its alpha tensors say {alpha}, its metadata "
                                 f"lora_alpha {meta_alpha}.")
            alpha = meta_alpha
        tm = adapter.get("target_modules")
        if isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm):
            try:
                if set(resolve_targets(tm, pmap)) == modules:
                    targets = tuple(tm)
            except ValueError:
                pass
    return alpha, targets
