"""A fine-tuned Stable Diffusion workdir written back in the diffusers layout.

    python -m t2i_jax.export --workdir runs/sd_ft --out runs/sd_ft_diffusers          # full folder
    python -m t2i_jax.export --workdir runs/sd_lora --out runs/sd_lora_weights        # LoRA file
    python -m t2i_jax.export --workdir runs/sd_lora --out runs/sd_merged --full       # merged folder

A full folder is the base folder the workdir was fine-tuned from (model_index.json, vae/,
text_encoder/, tokenizer/, scheduler/ and whatever else it holds, copied byte for byte) with its
unet/ replaced: the base's config.json and `diffusion_pytorch_model.safetensors` holding the
checkpoint's EMA parameters (--params raw: the raw ones) in diffusers' names and torch's layout
(the inverse of the port's param map: HWIO -> OIHW, [in, out] -> [out, in]), float32 or
--dtype float16. A LoRA workdir writes `pytorch_lora_weights.safetensors` (diffusers' PEFT
names, alpha in its metadata: models/lora.py), which `pipe.load_lora_weights(DIR)` reads; --full
merges the factors into the weights and writes a whole folder instead.

The output is written into OUT.partial-PID and renamed to OUT when whole, so an interrupted
export is never mistaken for a finished one; an OUT that exists is refused (nothing is touched).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import numpy as np

from t2i_jax import files
from t2i_jax.errors import ArgumentParser, Boundary, UsageError
from t2i_jax.models.weights import from_flax_layout, write_safetensors

PROG = "python -m t2i_jax.export"
UNET_STEM = "diffusion_pytorch_model"
UNET_WEIGHTS = UNET_STEM + ".safetensors"
DTYPES = ("float32", "float16", "bfloat16")


def unet_tensors(unet_cfg, params, dtype: str = "float32") -> dict:
    """{diffusers name: torch-layout array of `dtype`} of a ported UNet's {"params": ...}."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from t2i_jax.models.unet2d_condition import param_map
    flat = traverse_util.flatten_dict(jax.device_get(params["params"]), sep="/")
    pmap = param_map(unet_cfg)
    missing = sorted(set(pmap) - set(flat))
    if missing or len(flat) != len(pmap):
        raise ValueError(f"the parameters do not fit the folder's UNet: missing {missing[:3]}, "
                         f"{len(flat)} leaves for {len(pmap)} tensors.")
    target = jnp.dtype(dtype)
    return {names[0]: from_flax_layout(np.asarray(flat[path], np.float32), transform).astype(target)
            for path, (names, _, transform) in pmap.items()}


def write_unet(directory: str, unet_cfg, params, base_unet_dir: str, dtype: str) -> None:
    """unet/: the base's config.json, the parameters as diffusion_pytorch_model.safetensors."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy2(os.path.join(base_unet_dir, "config.json"), os.path.join(directory, "config.json"))
    write_safetensors(directory, unet_tensors(unet_cfg, params, dtype), stem=UNET_STEM)


def export(workdir: str, out: str, *, full: Optional[bool] = None, step: Optional[int] = None,
           params: str = "ema", dtype: str = "float32") -> str:
    """Writes the workdir's model to `out` (a diffusers folder, or a LoRA file's folder);
    returns what was written. full None: a folder for a full fine-tune, the LoRA file for LoRA."""
    from t2i_jax.sampling.load import load_trained
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {DTYPES}.")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise UsageError(f"--out {out} exists; pass a new directory (nothing was written).")
    parent = files.check_writable_dir(os.path.dirname(out), "--out's parent directory")
    trained = load_trained(workdir, step=step, params=params, merge=False)
    family = trained.family
    if not family.diffusers_export or trained.kind == "pretrained":
        raise UsageError(f"{workdir} is not a fine-tuned Stable Diffusion workdir (its family is "
                         f"{family.name}{', a folder itself' if trained.kind == 'pretrained' else ''})"
                         ": export writes one trained with configs/sd_finetune.py.")
    lora = family.lora is not None
    full = (not lora) if full is None else bool(full)
    if not full and not lora:
        raise UsageError("--lora_only: this workdir fine-tuned the whole UNet; it has no LoRA "
                         "factors to write. Leave the flag out to write a full folder.")
    base = family.folder.directory
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if full:
            unet = family.sampling_params(trained.params)   # LoRA: merged into the weights
            shutil.copytree(base, tmp, ignore=lambda d, names: (
                ["unet"] if os.path.abspath(d) == base else []))
            write_unet(os.path.join(tmp, "unet"), family.folder.unet[0], unet,
                       os.path.join(base, "unet"), dtype)
        else:
            from t2i_jax.models import lora_files
            os.makedirs(tmp)
            lora_files.save(os.path.join(tmp, lora_files.WEIGHT_NAME), trained.params, family.lora,
                          family.unet_param_map)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "a diffusers folder" if full else f"LoRA weights (rank {family.lora.rank})"
    print(f"[t2i_jax] wrote {what} of {trained.workdir} (checkpoint {trained.step}, "
          f"{trained.kind} parameters) to {out}", file=sys.stderr)
    return out


def _main(argv=None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a fine-tuned Stable Diffusion workdir")
    parser.add_argument("--out", required=True, help="the directory to write (must not exist)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", default=None,
                      help="a LoRA workdir: merge the factors and write a whole folder")
    kind.add_argument("--lora_only", dest="full", action="store_false",
                      help="write only pytorch_lora_weights.safetensors (LoRA's default)")
    parser.add_argument("--step", type=int, default=None, help="a checkpoint step (default newest)")
    parser.add_argument("--params", choices=("ema", "raw"), default="ema")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    export(args.workdir, args.out, full=args.full, step=args.step, params=args.params,
           dtype=args.dtype)


def main(argv=None) -> None:
    Boundary(PROG).exit(_main, argv)


if __name__ == "__main__":
    main()
