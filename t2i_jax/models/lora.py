"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) for the
ported UNet (models/unet2d_condition.py): chosen Linear layers' kernels W [in, out] become
W + (alpha / r) A B, A [in, r], B [r, out]; only A and B are trained.

    cfg = LoraConfig(rank=4, alpha=4.0)                      # config.train.lora
    factors = init_factors(key, unet_params, cfg, param_map(unet_cfg))
    eps_hat = UNet2DConditionModel(unet_cfg).apply(merge(unet_params, factors, cfg.scale), ...)

Targets are diffusers module-name suffixes ("to_q", "to_out.0", "ff.net.2") or the Flax form
("to_out_0"); a target matches a layer whose name ends with "." + target (or "/" + target) or
equals it, as PEFT's `target_modules` match. Only Linear layers (2-D kernels) take factors: SD 1.x's
proj_in / proj_out are 1x1 convolutions and are refused as targets.

Files (diffusers/PEFT, older diffusers, kohya) are read and written by lora_files.py.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Linear layers named in the "matches no layer" error, where this UNet has them
EXAMPLE_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
             "proj_out", "time_emb_proj", "time_embedding.linear_1")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (None: r, so scale 1) and the target layers' module-name suffixes."""
    rank: int = 4
    alpha: Optional[float] = None
    targets: Tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) \
                or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        alpha = float(self.rank if self.alpha is None else self.alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}.")
        targets = self.targets
        if isinstance(targets, str) or not all(isinstance(t, str) and t.strip(". /") == t and t
                                               for t in targets) or not targets:
            raise ValueError("LoRA targets must be a non-empty list of module-name suffixes "
                             f"(e.g. ['to_q', 'to_v']), got {targets!r}.")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "targets", tuple(targets))

    @property
    def scale(self) -> float:
        """alpha / r, the factor of A B (Hu et al. 2021, section 4.1)."""
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config) -> Optional["LoraConfig"]:
        """From `config.train.lora` (rank, alpha, targets); None where it is None or rank is 0
        (full fine-tuning). alpha None or 0 means the rank."""
        if config is None:
            return None
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ValueError(f"config.train.lora must be a dict (rank, alpha, targets), got "
                             f"{type(config).__name__}.")
        unknown = sorted(set(config) - {"rank", "alpha", "targets"})
        if unknown:
            raise ValueError(f"config.train.lora: unknown key(s) {', '.join(unknown)}; it takes "
                             "rank, alpha, targets.")
        rank = config.get("rank", 4)
        if rank == 0:
            return None
        alpha = config.get("alpha", None)
        targets = config.get("targets", DEFAULT_TARGETS)
        if isinstance(targets, str):  # --config.train.lora.targets=to_q,to_v
            targets = [t.strip() for t in targets.split(",")]
        return cls(rank=rank, alpha=None if alpha in (None, 0) else alpha, targets=tuple(targets))


# ---- the UNet's layers ----

def dense_layers(pmap) -> Tuple[Dict[str, Tuple[str, int, int]], Dict[str, str]]:
    """({Flax module path: (diffusers module name, in, out)} of every Linear, in the map's order;
    {Flax module path: diffusers name} of every convolution)."""
    dense, convs = {}, {}
    for path, (names, shape, transform) in pmap.items():
        if not path.endswith("/kernel") or not names[0].endswith(".weight"):
            continue
        module, name = path[:-len("/kernel")], names[0][:-len(".weight")]
        if transform == "transpose" and len(shape) == 2:
            dense[module] = (name, int(shape[1]), int(shape[0]))
        elif transform == "conv":
            convs[module] = name
    return dense, convs


def matches(target: str, module: str, name: str) -> bool:
    return name == target or name.endswith("." + target) or module == target or \
        module.endswith("/" + target)


def resolve_targets(targets, pmap) -> List[str]:
    """The Flax module paths of the Linear layers `targets` match, in the map's order;
    ValueError naming each target that matches none."""
    dense, convs = dense_layers(pmap)
    bad, conv_only = [], []
    for t in targets:
        if not any(matches(t, m, n) for m, (n, _, _) in dense.items()):
            (conv_only if any(matches(t, m, n) for m, n in convs.items()) else bad).append(t)
    if bad or conv_only:
        examples = [e for e in EXAMPLE_LAYERS
                    if any(matches(e, m, n) for m, (n, _, _) in dense.items())]
        why = []
        if conv_only:
            why.append(f"{_listed(conv_only)} only convolution(s) here (on SD 1.x, "
                       "use_linear_projection false, proj_in / proj_out are 1x1 convs), and only "
                       "Linear layers take LoRA factors")
        if bad:
            why.append(f"{_listed(bad)} no layer of this UNet")
        raise ValueError(f"LoRA targets: {'; '.join(why)}. Targets are diffusers module-name "
                         f"suffixes; this UNet's Linear layers include {', '.join(examples)}.")
    return [m for m, (n, _, _) in dense.items() if any(matches(t, m, n) for t in targets)]


def _listed(targets) -> str:
    return ("target " if len(targets) == 1 else "targets ") + ", ".join(map(repr, targets)) + (
        " matches" if len(targets) == 1 else " match")


def targets_of(base_params, cfg: LoraConfig, pmap) -> List[str]:
    """The Flax module paths ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q") of
    the Linear layers cfg.targets match; ValueError (one line) where a target matches none."""
    modules = resolve_targets(cfg.targets, pmap)
    flat = _flat(base_params)
    dense, _ = dense_layers(pmap)
    for m in modules:
        kernel = flat.get(f"{m}/kernel")
        _, d_in, d_out = dense[m]
        if kernel is None or tuple(kernel.shape) != (d_in, d_out):
            raise ValueError(f"LoRA: the UNet parameters have no [{d_in}, {d_out}] kernel at "
                             f"{m}/kernel (got {None if kernel is None else kernel.shape}); the "
                             "parameters are not this param map's model.")
    return modules


def _flat(tree) -> Dict[str, Any]:
    if "params" in tree:
        tree = tree["params"]
    return traverse_util.flatten_dict(dict(tree), sep="/")


def factor_pairs(factors) -> Dict[str, Tuple[Any, Any]]:
    """{Flax module path: (A [in, r], B [r, out])} of a factors tree."""
    flat = _flat(factors)
    modules = {k.rsplit("/", 1)[0] for k in flat}
    out = {}
    for m in sorted(modules):
        leaves = sorted(k.rsplit("/", 1)[1] for k in flat if k.startswith(m + "/"))
        if leaves != ["lora_a", "lora_b"]:
            raise ValueError(f"LoRA factors at {m} must be lora_a and lora_b, got {leaves}.")
        out[m] = (flat[f"{m}/lora_a"], flat[f"{m}/lora_b"])
    return out


# ---- init and merge ----

def init_factors(key, base_params, cfg: LoraConfig, pmap) -> dict:
    """{"params": {...module: {"lora_a": [in, r], "lora_b": [r, out]}}} for every targeted Linear:
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B = 0, so the merged
    model starts as the base exactly (Hu et al. 2021, section 4.1). Float32; each layer's key is
    fold_in(key, crc32(path)), so adding a target leaves the others' draws unchanged."""
    flat, dense = {}, dense_layers(pmap)[0]
    for m in targets_of(base_params, cfg, pmap):
        _, d_in, d_out = dense[m]
        bound = 1.0 / math.sqrt(d_in)
        k = jax.random.fold_in(key, zlib.crc32(m.encode()) & 0x7FFFFFFF)
        flat[f"{m}/lora_a"] = jax.random.uniform(k, (d_in, cfg.rank), jnp.float32, -bound, bound)
        flat[f"{m}/lora_b"] = jnp.zeros((cfg.rank, d_out), jnp.float32)
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def merge(base_params, factors, scale) -> dict:
    """base_params with each factored kernel W [in, out] replaced by W + scale A B (Hu et al.
    2021, eq. 3), formed in float32 and cast back to W's dtype: with B = 0 the result is W bit
    for bit (but for a -0.0 weight, which becomes +0.0). Pure and jittable (scale may be traced)."""
    flat = dict(_flat(base_params))
    for m, (a, b) in factor_pairs(factors).items():
        kernel = flat.get(f"{m}/kernel")
        if kernel is None or kernel.ndim != 2 or a.ndim != 2 or b.ndim != 2 or \
                a.shape[0] != kernel.shape[0] or b.shape[1] != kernel.shape[1] or \
                a.shape[1] != b.shape[0]:
            raise ValueError(f"LoRA factors at {m}: A {tuple(a.shape)} B {tuple(b.shape)} do not "
                             f"fit the kernel {None if kernel is None else tuple(kernel.shape)}.")
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)           # [in, out]
        flat[f"{m}/kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return {**base_params, "params": traverse_util.unflatten_dict(flat, sep="/")}
