"""A Stable Diffusion pipeline folder in the diffusers layout, read without torch.

    folder = pipeline.load("/data/stable-diffusion-v1-5")
    folder.unet, folder.vae          # (config, {"params": ...}) of each port
    folder.text                      # pretrained.TextEncoder (CLIP, run without a padding mask)
    folder.scheduler                 # diffusion/diffusers_scheduler.DiffusersScheduler

A folder holds `model_index.json` and the subfolders it lists: `unet/` and `vae/` (config.json +
diffusion_pytorch_model[.fp16].safetensors, or shards with their index), `text_encoder/` (a
CLIPTextModel: config.json + model[.fp16].safetensors), `tokenizer/` (vocab.json + merges.txt, or
tokenizer.json) and `scheduler/scheduler_config.json`. safety_checker and feature_extractor are
not read. Every problem is a ValueError naming the file and the field, raised before anything is
computed: a folder without model_index.json, a pipeline class or component this reader does not
follow (SDXL's second text encoder, an inpainting UNet), a missing subfolder or weight file,
`.bin`-only weights (named with the conversion), a misshapen tensor, an unsupported config field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from t2i_jax import files
from t2i_jax.diffusion.diffusers_scheduler import DiffusersScheduler

MODEL_INDEX = "model_index.json"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
              "text_encoder": "CLIPTextModel", "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
              "scheduler": None}
IGNORED = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")
CONVERT = ("convert it to safetensors where torch is installed: python -c \"from diffusers import "
           "StableDiffusionPipeline as P; P.from_pretrained('{d}').save_pretrained('{d}-st', "
           "safe_serialization=True)\", then point --workdir at {d}-st")


def is_pipeline_folder(directory: str) -> bool:
    return bool(directory) and os.path.isfile(os.path.join(directory, MODEL_INDEX))


def read_index(directory: str) -> dict:
    """model_index.json, checked: a pipeline this reader follows, with each component it needs."""
    path = os.path.join(directory, MODEL_INDEX)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {MODEL_INDEX}: it is not a diffusers pipeline folder "
                         "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
    index = files.read_json(path)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{path}: _class_name={name!r} is a pipeline this project does not read; "
                         f"it reads {list(PIPELINES)} (Stable Diffusion 1.x and 2.x).")
    for component, want in COMPONENTS.items():
        entry = index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ValueError(f"{path} lists no {component!r} component: a Stable Diffusion folder "
                             f"has {sorted(COMPONENTS)}.")
        if want is not None and entry[1] not in (want if isinstance(want, tuple) else (want,)):
            raise ValueError(f"{path}: {component} is a {entry[1]}, which this project does not "
                             f"read (it reads {want}).")
        sub = os.path.join(directory, component)
        if not os.path.isdir(sub):
            raise ValueError(f"{directory} has no {component}/ subfolder, which {MODEL_INDEX} "
                             "lists: copy the whole pipeline folder.")
    extra = sorted(k for k in index if not k.startswith("_") and k not in COMPONENTS
                   and k not in IGNORED and index[k] not in (None, [None, None], False))
    if extra:
        raise ValueError(f"{path} lists components this project does not read: {extra} (SDXL "
                         "and other pipelines have more than Stable Diffusion 1.x / 2.x).")
    return index


def _weights_or_refuse(sub: str, directory: str) -> None:
    import glob
    if glob.glob(os.path.join(sub, "*.safetensors")) or glob.glob(
            os.path.join(sub, "*.safetensors.index*.json")):
        return
    bins = sorted(os.path.basename(p) for p in glob.glob(os.path.join(sub, "*.bin")))
    if bins:
        raise ValueError(f"{sub} holds only PyTorch pickles {bins}, which this project reads "
                         "without torch only as safetensors: " + CONVERT.format(d=directory) + ".")
    raise ValueError(f"{sub} has no weights (diffusion_pytorch_model[.fp16].safetensors, "
                     "model[.fp16].safetensors or a sharded index).")


@dataclasses.dataclass
class PipelineFolder:
    directory: str
    index: dict
    unet: tuple        # (UNet2DConditionConfig, {"params": ...})
    vae: tuple         # (AutoencoderKLConfig, {"params": ...})
    text: Any          # pretrained.TextEncoder
    scheduler: DiffusersScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae[0].block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The pixel size the UNet was trained at: its sample_size times the VAE's factor."""
        return int(self.unet[0].sample_size) * self.vae_scale_factor

    def identity(self) -> dict:
        """What a job records of the folder: its path and a hash of every file it reads."""
        if not hasattr(self, "_sha256"):
            self._sha256 = folder_sha256(self.directory)
        return dict(kind="diffusers", workdir=self.directory, step=0, sha256=self._sha256)


def folder_sha256(directory: str) -> str:
    """A hash of what decides the pipeline's output: model_index.json, every subfolder's config,
    tokenizer and scheduler files, and the weight files each port reads (names included; large
    files hashed once per (path, size, mtime): models/weights.py)."""
    from t2i_jax.models import weights
    h = hashlib.sha256()
    with open(os.path.join(directory, MODEL_INDEX), "rb") as f:
        h.update(hashlib.sha256(f.read()).hexdigest().encode())
    for sub in ("unet", "vae", "text_encoder"):
        h.update(f"{sub}|{weights.content_sha256(os.path.join(directory, sub))}".encode())
    for sub in ("tokenizer", "scheduler"):
        folder = os.path.join(directory, sub)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(f"{sub}/{name}|{hashlib.sha256(f.read()).hexdigest()}".encode())
    return h.hexdigest()


def load(directory: str, *, mesh=None, dtype: str = "float32",
         param_dtype: str = "auto") -> PipelineFolder:
    """The pipeline folder's models read onto `mesh` (None: host arrays); dtype: the computation
    dtype of the UNet, the VAE and the text encoder; param_dtype: the UNet's and VAE's
    parameters' ("auto": as the files hold them, so an fp16 folder takes half the memory;
    computed in `dtype` all the same, its values exact in float32)."""
    from t2i_jax.models import autoencoder_kl, unet2d_condition
    from t2i_jax.models.pretrained import load as load_text
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    index = read_index(directory)
    sched_path = os.path.join(directory, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise ValueError(f"{directory}/scheduler has no scheduler_config.json.")
    try:
        scheduler = DiffusersScheduler.from_config(files.read_json(sched_path))
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from None
    ports = {}
    for sub, port in (("unet", unet2d_condition), ("vae", autoencoder_kl)):
        folder = os.path.join(directory, sub)
        _weights_or_refuse(folder, directory)
        try:
            ports[sub] = port.load(folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        except ValueError as e:
            if folder in str(e):
                raise
            raise ValueError(f"{folder}: {e}") from None
    _weights_or_refuse(os.path.join(directory, "text_encoder"), directory)
    text = load_text(os.path.join(directory, "text_encoder"), kind="clip", mesh=mesh, dtype=dtype,
                     tokenizer_dir=os.path.join(directory, "tokenizer"), mask_padding=False)
    unet_cfg, vae_cfg = ports["unet"][0], ports["vae"][0]
    ctx = unet_cfg.cross_attention_dim
    if any(int(c) != text.cfg.hidden_size for c in (ctx if isinstance(ctx, (tuple, list)) else (ctx,))):
        raise ValueError(f"{directory}/unet/config.json: cross_attention_dim="
                         f"{unet_cfg.cross_attention_dim}, but the text encoder's hidden_size is "
                         f"{text.cfg.hidden_size}: the folder mixes two models.")
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise ValueError(f"{directory}/unet/config.json: in_channels={unet_cfg.in_channels}, but "
                         f"the VAE's latent_channels is {vae_cfg.latent_channels} (a 9-channel "
                         "inpainting UNet is not read here).")
    return PipelineFolder(directory, index, ports["unet"], ports["vae"], text, scheduler)
