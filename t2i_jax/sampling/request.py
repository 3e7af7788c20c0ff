"""What a user asks of a sampling job, in sample.py's terms, and the plan it becomes.

    request = Request(workdir="runs/digits", outdir="out", prompts=["seven"], guidance=[3.0])
    request.check()                 # the flags' refusals, before any model is read (no jax)
    plan = planner.build(request)   # the models loaded and checked together (sampling/planner.py)

`check` refuses what the flags alone show is wrong, and the planner what only the models show (a
prior given as --workdir, an SR stage that cannot follow the one before it). Both raise
ValueError naming the flag and the fix, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

from t2i_jax.errors import UsageError
from typing import Optional


from t2i_jax import files

THRESHOLDINGS = ("static", "dynamic", "none")
DEFAULT_STRENGTH = 0.8  # diffusers' StableDiffusionImg2ImgPipeline default
SR_FLAGS = ("sr_steps", "sr_sampler", "sr_guidance", "sr_aug_level", "sr_thresholding")


DASH_VALUES = ("--mask_box",)  # flags whose value may start with "-" (a negative coordinate)


def glue_values(argv: list) -> list:
    """argv with `--mask_box -1,0,4,4` passed as `--mask_box=-1,0,4,4`: argparse would take a
    value that starts with "-" for an option and say "expected one argument"."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in DASH_VALUES and i + 1 < len(argv) and argv[i + 1][:1] == "-" \
                and not argv[i + 1].startswith("--"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


@dataclasses.dataclass
class Request:
    """sample.py's flags (see its --help), one field each."""
    workdir: str
    outdir: str
    prompts: list = dataclasses.field(default_factory=list)  # --prompt, in order
    prompts_file: Optional[str] = None       # more prompts, one a line (after --prompt's)
    num_per_prompt: int = 8
    guidance: Optional[list] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    eta: Optional[float] = None
    ddpm_variance: Optional[str] = None
    ode_variables: Optional[str] = None      # Heun's variables (default: the model's process)
    thresholding: Optional[str] = None
    seed: int = 0
    batch_size: int = 64
    params: str = "ema"
    step: Optional[int] = None
    npz: bool = False
    shard_size: int = 256
    grid_columns: int = 16
    progress: bool = True
    classifier: Optional[str] = None
    classifier_scale: Optional[float] = None
    clip: Optional[str] = None
    clip_scale: Optional[float] = None
    guide_image: Optional[str] = None
    image_scale: Optional[float] = None
    rerank: int = 1
    sr: list = dataclasses.field(default_factory=list)
    sr_steps: Optional[list] = None          # each --sr_* flag: once (every stage) or per --sr
    sr_sampler: Optional[list] = None
    sr_guidance: Optional[list] = None
    sr_aug_level: Optional[list] = None
    sr_thresholding: Optional[list] = None
    low_res: Optional[str] = None
    aug_level: Optional[float] = None
    prior: Optional[str] = None
    prior_candidates: Optional[int] = None
    prior_guidance: Optional[float] = None
    prior_steps: Optional[int] = None
    variations: Optional[list] = None
    interpolate: Optional[list] = None
    frames: int = 8
    inpaint: Optional[str] = None
    mask: Optional[str] = None
    mask_box: object = None                  # "x0,y0,x1,y1" or four ints
    repaint_jumps: int = 0
    repaint_jump_length: int = 10
    frozen: list = dataclasses.field(default_factory=list)  # --frozen RECORDED=DIR, repeatable
    negative_prompt: Optional[list] = None   # once (every prompt) or once per prompt
    init_image: Optional[str] = None         # img2img's start
    strength: Optional[float] = None         # with init_image (default 0.8, diffusers')
    init_noise: Optional[str] = None         # x_T of every image, [N, H, W, C] .npy
    lora: Optional[str] = None               # a LoRA file merged into a folder's UNet
    lora_scale: Optional[float] = None       # with lora: the factor on its alpha / rank
    guidance_rescale: float = 0.0            # stage 0's CFG rule (diffusion/cfg.py): phi
    guidance_interval: Optional[list] = None  # [LO, HI] of the chain's time (None: [0, 1])
    guidance_interval_sigma: Optional[list] = None  # (LO, HI] of sigma
    apg: bool = False                        # APG in place of CFG's linear rule
    apg_eta: Optional[float] = None          # with apg (default: cfg.DEFAULT_APG_ETA, 0)
    apg_norm_threshold: Optional[float] = None  # with apg (default 0: none)
    apg_momentum: Optional[float] = None     # with apg (default 0: none)

    @property
    def frozen_paths(self) -> dict:
        """{recorded workdir: new workdir} of --frozen (checked by check())."""
        return dict(item.split("=", 1) for item in self.frozen)

    def all_prompts(self) -> list:
        """--prompt's prompts, then --prompts_file's."""
        return list(self.prompts) + (read_prompts_file(self.prompts_file)
                                     if self.prompts_file else [])

    @property
    def unclip_flag(self) -> Optional[str]:
        return ("--prior" if self.prior else "--variations" if self.variations else
                "--interpolate" if self.interpolate else None)

    def check(self) -> None:
        """Refuses flags that cannot make a job (ValueError naming them); normalises --guidance
        ("0,1,3" -> floats), --mask_box (four ints) and the --sr_* flags (one value per stage)."""
        for i, text in enumerate(self.prompts):
            try:
                str(text).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"--prompt number {i + 1} is not valid UTF-8 (the shell passed "
                                 "bytes in another encoding); pass it as UTF-8 text, or use "
                                 "--prompts_file with a UTF-8 file.") from None
        for item in self.frozen:
            old, _, new = str(item).partition("=")
            if not old or not new:
                raise ValueError(f"--frozen takes RECORDED=DIR (the path the model recorded, its "
                                 f"new place), got {item!r}.")
            if not os.path.isdir(os.path.expanduser(new)):
                raise ValueError(f"--frozen {item}: {new} is not a directory.")
        if self.lora_scale is not None and not self.lora:
            raise ValueError("--lora_scale scales a --lora file; give the file with --lora FILE.")
        if self.lora_scale is not None and not math.isfinite(self.lora_scale):
            raise ValueError(f"--lora_scale must be a finite number, got {self.lora_scale}.")
        if self.lora and not os.path.isfile(os.path.expanduser(self.lora)):
            raise ValueError(f"--lora {self.lora}: no such file (pass a .safetensors LoRA file, "
                             "e.g. DIR/pytorch_lora_weights.safetensors).")
        for flag, value in (("--classifier_scale", self.classifier_scale),
                            ("--clip_scale", self.clip_scale), ("--image_scale", self.image_scale)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0 (0 turns the guide off), "
                                 f"got {value}.")
        if self.classifier_scale is not None and not self.classifier:
            raise ValueError("--classifier_scale needs --classifier DIR (a noisy_classifier workdir).")
        for flag, given in (("--clip_scale", self.clip_scale is not None),
                            ("--guide_image", self.guide_image is not None),
                            ("--image_scale", self.image_scale is not None),
                            ("--rerank", self.rerank != 1)):
            if given and not self.clip:
                raise ValueError(f"{flag} needs --clip DIR (a contrastive workdir: the CLIP it uses).")
        if self.image_scale is not None and self.guide_image is None:
            raise ValueError("--image_scale needs --guide_image FILE (the reference image).")
        if self.rerank < 1:
            raise ValueError(f"--rerank must be >= 1 (candidates per image; 1: no reranking), "
                             f"got {self.rerank}.")
        self._check_cascade()
        self._check_unclip()
        self._check_inpaint()
        self._check_img2img()
        self._check_after_cfg()
        if self.prompts_file is None and not self.prompts and not (self.variations or
                                                                   self.interpolate):
            raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
        if min(self.num_per_prompt, self.batch_size, self.shard_size, self.grid_columns) < 1:
            raise ValueError("--num_per_prompt, --batch_size, --shard_size and --grid_columns "
                             "must be >= 1.")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"--seed must be in [0, 2^32) (JAX keys hold 32 bits), got {self.seed}.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}.")
        if self.ode_variables is not None and self.sampler not in (None, "heun"):
            raise ValueError(f"--ode_variables chooses the variables Heun's steps solve the ODE "
                             f"in; --sampler {self.sampler} does not read it: pass --sampler "
                             "heun, or leave --ode_variables out.")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:  # NaN fails too
            raise ValueError(f"--eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's "
                             f"noise), got {self.eta}.")
        if self.guidance is not None:
            given = self.guidance
            try:
                self.guidance = [float(w) for g in given for w in str(g).split(",") if w.strip()]
            except ValueError:
                self.guidance = None
            if not self.guidance or not all(math.isfinite(w) for w in self.guidance):
                raise ValueError(f"--guidance takes finite numbers (e.g. --guidance 0 1 3 or "
                                 f"0,1,3), got {given}.")
        files.check_output_dir(self.outdir, "--outdir")

    def _check_after_cfg(self) -> None:
        """The CFG rule's flags: values in range, APG's options only with --apg, stage 0 a
        model that draws with --guidance (not --prior's)."""
        if not 0.0 <= self.guidance_rescale <= 1.0:  # NaN fails too
            raise ValueError(f"--guidance_rescale must be in [0, 1] (Lin et al. 2023 use 0.7; 0: "
                             f"off), got {self.guidance_rescale}.")
        for flag, bounds, top in (("--guidance_interval", self.guidance_interval, 1.0),
                                  ("--guidance_interval_sigma", self.guidance_interval_sigma,
                                   math.inf)):
            if bounds is None:
                continue
            lo, hi = bounds
            if not (0.0 <= lo < hi <= top and math.isfinite(hi)):
                raise ValueError(f"{flag} takes LO HI with 0 <= LO < HI"
                                 + (" <= 1 (the chain's time, 1: pure noise; default 0 1)"
                                    if top == 1.0 else " (finite sigmas, e.g. 0.28 5.42)")
                                 + f", got {lo:g} {hi:g}.")
        for name in ("eta", "norm_threshold", "momentum"):
            value = getattr(self, "apg_" + name)
            if value is not None and not self.apg:
                raise ValueError(f"--apg_{name} is adaptive projected guidance's: it needs --apg.")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--apg_{name} must be a finite number, got {value}.")
        if self.apg_norm_threshold is not None and self.apg_norm_threshold < 0:
            raise ValueError(f"--apg_norm_threshold must be >= 0 (0: no threshold), got "
                             f"{self.apg_norm_threshold}.")
        given = [f for f, on in (("--guidance_rescale", self.guidance_rescale != 0.0),
                                 ("--guidance_interval", self.guidance_interval is not None),
                                 ("--guidance_interval_sigma",
                                  self.guidance_interval_sigma is not None),
                                 ("--apg", self.apg)) if on]
        if given and self.prior:
            raise ValueError(f"{' and '.join(given)} act on stage 0's classifier-free guidance; "
                             "with --prior stage 0 is the prior, and the decoder's guidance takes "
                             "plain CFG: leave them out.")

    def _check_img2img(self) -> None:
        if self.strength is not None and not self.init_image:
            raise ValueError("--strength is img2img's: it needs --init_image IMAGE.")
        if self.init_image:
            if self.strength is None:
                self.strength = DEFAULT_STRENGTH
            if not 0.0 < self.strength <= 1.0:  # NaN fails too
                raise ValueError(f"--strength must be in (0, 1] (the part of the chain that runs "
                                 f"from the noised image; 1: all of it), got {self.strength}.")
            for flag, given in (("--inpaint", self.inpaint), ("--low_res", self.low_res),
                                ("--variations", self.variations), ("--prior", self.prior),
                                ("--interpolate", self.interpolate)):
                if given:
                    raise ValueError(f"--init_image (img2img) does not combine with {flag}.")
        for flag, path in (("--init_image", self.init_image), ("--init_noise", self.init_noise)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{flag} {path} is not a file.")
        if self.init_noise is not None and (self.rerank > 1 or (self.prior_candidates or 1) > 1):
            raise ValueError("--init_noise fixes each image's x_T, so --rerank / "
                             "--prior_candidates would draw the same candidate again: leave "
                             "them out.")
        if self.negative_prompt and self.prompts_file is None and \
                len(self.negative_prompt) not in (1, len(self.prompts)):
            raise ValueError(f"--negative_prompt was given {len(self.negative_prompt)} times for "
                             f"{len(self.prompts)} prompts: give it once (every prompt) or once "
                             "per --prompt, in order.")

    def _check_cascade(self) -> None:
        for v in (self.sr_aug_level or []) + ([self.aug_level] if self.aug_level is not None else []):
            if not 0.0 <= v < 1.0:  # NaN fails too
                raise ValueError(f"an augmentation level must be in [0, 1) (0: the clean "
                                 f"low-resolution image; Imagen samples at 0.1-0.3), got {v}.")
        for v in self.sr_steps or []:
            if v < 1:
                raise ValueError(f"--sr_steps must be >= 1, got {v}.")
        for v in self.sr_guidance or []:
            if not math.isfinite(v):
                raise ValueError(f"--sr_guidance takes finite numbers, got {v}.")
        n = len(self.sr)
        for flag in SR_FLAGS:  # each becomes one value per --sr stage (None: its config's)
            values = getattr(self, flag) or []
            if values and not n:
                raise ValueError(f"--{flag} needs --sr DIR (a super-resolution stage).")
            if len(values) not in (0, 1, n):
                raise ValueError(f"--{flag} was given {len(values)} times for {n} --sr stage(s): "
                                 "give it once (every stage) or once per --sr, in order.")
            setattr(self, flag, values * n if len(values) == 1 else values or [None] * n)
        if self.aug_level is not None and not self.low_res:
            raise ValueError("--aug_level is the level of given --low_res images; an SR stage "
                             "after the base takes --sr_aug_level.")
        if self.low_res and not os.path.exists(self.low_res):
            raise ValueError(f"--low_res {self.low_res} does not exist.")

    def _check_unclip(self) -> None:
        given = [f for f, v in (("--prior", self.prior), ("--variations", self.variations),
                                ("--interpolate", self.interpolate)) if v]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are different jobs: a decoder's embeddings "
                             "come from a prior, from images (variations) or from slerps "
                             "(interpolations); pick one.")
        for flag, value in (("--prior_candidates", self.prior_candidates),
                            ("--prior_guidance", self.prior_guidance),
                            ("--prior_steps", self.prior_steps)):
            if value is not None and not self.prior:
                raise ValueError(f"{flag} needs --prior DIR (an unCLIP prior workdir).")
        if self.prior_candidates is not None and self.prior_candidates < 1:
            raise ValueError(f"--prior_candidates must be >= 1 (1: no selection), got "
                             f"{self.prior_candidates}.")
        if self.prior_steps is not None and self.prior_steps < 1:
            raise ValueError(f"--prior_steps must be >= 1, got {self.prior_steps}.")
        if self.prior_guidance is not None and not math.isfinite(self.prior_guidance):
            raise ValueError(f"--prior_guidance takes a finite number, got {self.prior_guidance}.")
        for pair in self.interpolate or []:
            if len(pair) != 2:
                raise ValueError(f"--interpolate takes two images, A and B (one row from A to B), "
                                 f"got {len(pair)}: {pair}. Repeat the flag for more rows.")
        if self.frames < 2:
            raise ValueError(f"--frames must be >= 2 (a row runs from A, frame 0, to B, frame "
                             f"K - 1), got {self.frames}.")
        if self.interpolate and ((self.sampler not in (None, "ddim")) or (self.eta or 0.0) != 0.0):
            raise ValueError("--interpolate samples with DDIM eta = 0 (one deterministic map from "
                             "noise and embedding to image, so the frames differ only by the "
                             "embedding); drop --sampler and --eta.")
        for path in (self.variations or []) + [x for pair in self.interpolate or [] for x in pair]:
            if not os.path.isfile(path):
                flag = "--variations" if self.variations else "--interpolate"
                raise ValueError(f"{flag}: {path} is not a file (pass image files, e.g. PNGs).")

    def _check_inpaint(self) -> None:
        from t2i_jax.sampling.inpaint import parse_box
        for flag, given in (("--mask", self.mask), ("--mask_box", self.mask_box),
                            ("--repaint_jumps", self.repaint_jumps),
                            ("--repaint_jump_length", self.repaint_jump_length != 10)):
            if given and not self.inpaint:
                raise ValueError(f"{flag} needs --inpaint IMAGE (the image to complete).")
        if not self.inpaint:
            return
        if bool(self.mask) == bool(self.mask_box):
            raise ValueError("--inpaint needs the region to regenerate: --mask MASK.png (white = "
                             "keep, black = regenerate) or --mask_box x0,y0,x1,y1, one of them.")
        if self.repaint_jumps < 0 or self.repaint_jump_length < 1:
            raise ValueError(f"--repaint_jumps must be >= 0 and --repaint_jump_length >= 1, got "
                             f"{self.repaint_jumps} and {self.repaint_jump_length}.")
        for flag, value in (("--inpaint", self.inpaint), ("--mask", self.mask)):
            if value and not os.path.isfile(value):
                raise ValueError(f"{flag} {value} is not a file (pass a PNG image).")
        if self.mask_box and isinstance(self.mask_box, str):
            self.mask_box = parse_box(self.mask_box)
        if self.prior or self.variations or self.interpolate or self.low_res or self.sr:
            raise ValueError("--inpaint completes an image with one base model (--workdir); it "
                             "does not combine with --prior, --variations, --interpolate, "
                             "--low_res or --sr.")


def read_prompts_file(path: str) -> list:
    """Prompts, one a line; raises ValueError naming the first line that is not valid UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read --prompts_file {path}: {e.strerror}.") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark
    prompts = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}, line {n}: not valid UTF-8 (byte {e.start + 1} of the line: "
                             f"{line[e.start:e.start + 1]!r}); save the file as UTF-8.") from None
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise UsageError(f"{path} holds no prompts (only blank lines).")
    return prompts


def log(message: str) -> None:
    print(f"[t2i_jax] {message}", file=sys.stderr)
