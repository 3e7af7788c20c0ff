"""Sample images from a trained workdir: prompts in, PNGs, a grid and a JSON line per image out.

    python sample.py --workdir runs/digits --prompt "seven" --prompt "数字三" \\
        --num_per_prompt 16 --guidance 3 --sampler ddim --steps 50 --seed 0 --outdir out/digits
    python sample.py --workdir runs/digits --prompts_file prompts.txt --guidance 0 1 3 \\
        --num_per_prompt 100 --npz --outdir out/sweep          # a sweep over w: one compilation

Writes OUTDIR/grid.png (rows = prompts; with several w, the rows of w[0] first),
OUTDIR/images/*.png, OUTDIR/samples.jsonl (one object per image: file, prompt, index, seed,
guidance, sampler, steps, checkpoint step) and with --npz OUTDIR/samples.npz (ADM's reference layout).
Uses the newest checkpoint's EMA parameters and the config stored with it. Every device is used;
each image's noise comes from its own index, so the device count and --batch_size do not change
the images (bit-identical on CPU; up to float rounding where kernels depend on the batch shape). An interrupted job resumes where
it stopped when the same command is run again. On several hosts, run the same command on each
with --multihost or --coordinator_address/--num_processes/--process_id (or on one machine:
python -m t2i_jax.launch --num_processes 2 --devices_per_process 4 -- sample.py ARGS): the
images are the same, and only process 0 reads or writes OUTDIR.

A cascade (Imagen) is one resumable job: a base model, then super-resolution stages, each with
its own options (defaults from its own config; one value for every stage, or one per --sr):

    python sample.py --workdir runs/shapes16 --sr runs/shapes_sr64 --prompt "a large red circle" \
        --sr_steps 20 --sr_guidance 1 --sr_aug_level 0.2 --outdir out/cascade
    python sample.py --workdir runs/shapes_sr64 --low_res small_images/ --prompt "..." \
        --aug_level 0.2 --outdir out/sr                       # SR of given 16x16 images

The final images go to OUTDIR/images; stage k's before them to OUTDIR/stages/k/images (same
file names), with their own grid.png.

unCLIP (DALL-E 2): a decoder in --workdir, its CLIP image embeddings from a prior, an image or a
slerp (each record says which, under "embedding"):

    python sample.py --workdir runs/digits_decoder --prior runs/digits_prior --prompt seven \
        --prior_candidates 2 --outdir out/unclip          # text -> prior -> decoder, one job
    python sample.py --workdir runs/digits_decoder --variations a.png b.png --outdir out/var
    python sample.py --workdir runs/digits_decoder --interpolate a.png b.png --frames 8 \
        --outdir out/interp                               # slerp, DDIM eta = 0, one noise a row

The prior's embeddings go to OUTDIR/stages/0/embeddings/*.npy.

Inpainting: regenerate part of an image, keep the rest (every record says which method ran):

    python sample.py --workdir runs/shapes_inpaint --inpaint in.png --mask mask.png \
        --prompt "a large red circle" --outdir out/glide     # GLIDE's mask-conditioned model
    python sample.py --workdir runs/shapes16 --inpaint in.png --mask_box 8,0,16,16 \
        --repaint_jumps 4 --repaint_jump_length 5 --prompt "..." --outdir out/repaint  # any model

Improved DDPM's learned variance: --sampler ddpm --ddpm_variance learned (the default of a model
trained with diffusion.learn_sigma).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m")   # t2i_jax.diffusion.samplers.SAMPLERS (checked below)
THRESHOLDINGS = ("static", "dynamic", "none")


def parse_args(argv):
    from t2i_jax.errors import ArgumentParser  # imports no jax
    p = ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training workdir (its checkpoints/ is read)")
    p.add_argument("--outdir", required=True, help="where the images, grid and records go")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable); '' is the null condition (unconditional samples)")
    p.add_argument("--prompts_file", metavar="FILE",
                   help="UTF-8 text file, one prompt a line (blank lines are skipped)")
    p.add_argument("--num_per_prompt", type=int, default=8)
    p.add_argument("--guidance", nargs="+", metavar="W",
                   help="classifier-free guidance weight w (eps~ = (1 + w) eps(x, y) - w eps(x, "
                        "null)); several values (or 0,1,3) make a sweep. Default: the config's")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the config's")
    p.add_argument("--steps", type=int, help="sampling steps (1..T); default: the config's")
    p.add_argument("--eta", type=float, help="DDIM eta in [0, 1] (0 deterministic, 1 DDPM-like)")
    p.add_argument("--ddpm_variance", choices=("posterior", "beta", "learned"),
                   help="ddpm sampler's variance: posterior beta~, beta (DDIM paper's sigma-hat), or "
                        "learned (a model trained with diffusion.learn_sigma, IDDPM; also DDIM's "
                        "sigma at eta > 0); default: the config's")
    p.add_argument("--thresholding", choices=THRESHOLDINGS, help="x0 clipping; default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64,
                   help="images per device call (padded up to a multiple of the device count)")
    p.add_argument("--params", choices=("ema", "raw"), default="ema",
                   help="the EMA parameters (default) or the raw trained ones")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (uint8, ADM layout)")
    p.add_argument("--shard_size", type=int, default=256,
                   help="images per resumable shard (part of the job's identity)")
    p.add_argument("--grid_columns", type=int, default=16, help="images per grid row at most")
    p.add_argument("--no_progress", action="store_true")
    g = p.add_argument_group("gradient guides (sampling/guides.py): eps~ = eps - sqrt(1 - abar_t) "
                             "* scale * grad_x f(x_t, t), after classifier-free guidance")
    g.add_argument("--classifier", metavar="DIR",
                   help="a noisy_classifier workdir: ADM classifier guidance toward each "
                        "prompt's class (the prompts must be class names)")
    g.add_argument("--classifier_scale", type=float, metavar="S",
                   help="default: the classifier config's guide.classifier_scale")
    g.add_argument("--clip", metavar="DIR",
                   help="a contrastive (CLIP) workdir: SDG text guidance f = cos(E_img(x_t, t), "
                        "E_text(prompt)); an empty prompt has no text term")
    g.add_argument("--clip_scale", type=float, metavar="S",
                   help="default: the CLIP config's guide.clip_text_scale")
    g.add_argument("--guide_image", metavar="FILE",
                   help="SDG image-content guidance toward this image (needs --clip)")
    g.add_argument("--image_scale", type=float, metavar="S",
                   help="default: the CLIP config's guide.clip_image_scale")
    g.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="draw N candidates per image, keep the one the CLIP scores closest to "
                        "its prompt (needs --clip)")
    c = p.add_argument_group("cascades (Imagen): super-resolution stages after the --workdir model; "
                             "each --sr_* flag once (every stage) or once per --sr")
    c.add_argument("--sr", action="append", default=[], metavar="DIR",
                   help="a super_resolution workdir whose input is the previous stage's output "
                        "(repeatable: base -> SR -> SR)")
    c.add_argument("--sr_steps", action="append", type=int, metavar="N")
    c.add_argument("--sr_sampler", action="append", choices=SAMPLER_NAMES)
    c.add_argument("--sr_guidance", action="append", type=float, metavar="W",
                   help="classifier-free guidance weight of the SR stage (drops the text, "
                        "never the image)")
    c.add_argument("--sr_aug_level", action="append", type=float, metavar="S",
                   help="noise-conditioning augmentation level in [0, 1) the previous stage's "
                        "output is corrupted to (default: the SR config's sample.aug_level)")
    c.add_argument("--sr_thresholding", action="append", choices=THRESHOLDINGS)
    c.add_argument("--low_res", metavar="FILE_OR_DIR",
                   help="with an SR --workdir: super-resolve these images (PNGs, a directory of "
                        "PNGs in name order, or an npz's arr_0), one per prompt (or one prompt "
                        "for all)")
    c.add_argument("--aug_level", type=float, metavar="S",
                   help="with --low_res: the SR --workdir's augmentation level")
    u = p.add_argument_group("unCLIP (DALL-E 2): the --workdir model is a decoder")
    u.add_argument("--prior", metavar="DIR",
                   help="a prior workdir: text -> prior -> decoder as one resumable job (--guidance "
                        "is the decoder's)")
    u.add_argument("--prior_candidates", type=int, metavar="K",
                   help="prior samples per image; the one with the largest dot product with the "
                        "caption's CLIP text embedding is kept (default: the prior config's, 2)")
    u.add_argument("--prior_guidance", type=float, metavar="W",
                   help="the prior's classifier-free guidance weight (default: its config's)")
    u.add_argument("--prior_steps", type=int, metavar="N", help="the prior's sampling steps")
    u.add_argument("--variations", nargs="+", metavar="IMAGE",
                   help="decode each image's CLIP embedding again: --num_per_prompt variations "
                        "each, with stochastic sampling (DDIM eta = 1 unless --eta/--sampler)")
    u.add_argument("--interpolate", nargs="+", action="append", metavar="IMAGE",
                   help="two images A B (repeatable, one row per pair): slerp between their CLIP "
                        "embeddings, DDIM eta = 0, one shared noise per row")
    u.add_argument("--frames", type=int, default=8, metavar="K",
                   help="frames of each --interpolate row, the two ends included (>= 2)")
    i = p.add_argument_group("inpainting: regenerate the unknown region, keep the rest")
    i.add_argument("--inpaint", metavar="IMAGE",
                   help="the image to complete (the model's size); a mask-conditioned model "
                        "(model.inpaint) overwrites x0_hat's known pixels each step (GLIDE), any "
                        "other model replaces x_t's known region by q_sample(image, t) (RePaint)")
    i.add_argument("--mask", metavar="MASK.png",
                   help="the image's size: white = keep, black = regenerate")
    i.add_argument("--mask_box", metavar="x0,y0,x1,y1",
                   help="the pixel box to regenerate (x1 and y1 exclusive); everything else is kept")
    i.add_argument("--repaint_jumps", type=int, default=0, metavar="J",
                   help="RePaint's resampling: every --repaint_jump_length steps, go back up that "
                        "many steps and down again, J times (0: plain replacement)")
    i.add_argument("--repaint_jump_length", type=int, default=10, metavar="L")
    from t2i_jax import distributed  # imports no jax
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.group = distributed.from_args(args)
    except ValueError as e:
        p.error(str(e))
    for flag, value in (("--classifier_scale", args.classifier_scale),
                        ("--clip_scale", args.clip_scale), ("--image_scale", args.image_scale)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"{flag} must be a finite number >= 0 (0 turns the guide off), got {value}.")
    if args.classifier_scale is not None and not args.classifier:
        p.error("--classifier_scale needs --classifier DIR (a noisy_classifier workdir).")
    for flag, given in (("--clip_scale", args.clip_scale is not None),
                        ("--guide_image", args.guide_image is not None),
                        ("--image_scale", args.image_scale is not None),
                        ("--rerank", args.rerank != 1)):
        if given and not args.clip:
            p.error(f"{flag} needs --clip DIR (a contrastive workdir: the CLIP it uses).")
    if args.image_scale is not None and args.guide_image is None:
        p.error("--image_scale needs --guide_image FILE (the reference image).")
    if args.rerank < 1:
        p.error(f"--rerank must be >= 1 (candidates per image; 1: no reranking), got {args.rerank}.")
    for v in (args.sr_aug_level or []) + ([args.aug_level] if args.aug_level is not None else []):
        if not 0.0 <= v < 1.0:  # NaN fails too
            p.error(f"an augmentation level must be in [0, 1) (0: the clean low-resolution "
                    f"image; Imagen samples at 0.1-0.3), got {v}.")
    for v in args.sr_steps or []:
        if v < 1:
            p.error(f"--sr_steps must be >= 1, got {v}.")
    for v in args.sr_guidance or []:
        if not math.isfinite(v):
            p.error(f"--sr_guidance takes finite numbers, got {v}.")
    # Each --sr_* flag becomes one value per --sr stage (None: the stage's own config's).
    for flag in ("sr_steps", "sr_sampler", "sr_guidance", "sr_aug_level", "sr_thresholding"):
        values, n = getattr(args, flag) or [], len(args.sr)
        if values and not n:
            p.error(f"--{flag} needs --sr DIR (a super-resolution stage).")
        if len(values) not in (0, 1, n):
            p.error(f"--{flag} was given {len(values)} times for {n} --sr stage(s): give it once "
                    "(every stage) or once per --sr, in order.")
        setattr(args, flag, values * n if len(values) == 1 else values or [None] * n)
    if args.aug_level is not None and not args.low_res:
        p.error("--aug_level is the level of given --low_res images; an SR stage after the "
                "base takes --sr_aug_level.")
    if args.low_res and not os.path.exists(args.low_res):
        p.error(f"--low_res {args.low_res} does not exist.")
    given = [f for f, v in (("--prior", args.prior), ("--variations", args.variations),
                            ("--interpolate", args.interpolate)) if v]
    if len(given) > 1:
        p.error(f"{' and '.join(given)} are different jobs: a decoder's embeddings come from a "
                "prior, from images (variations) or from slerps (interpolations); pick one.")
    for flag, value in (("--prior_candidates", args.prior_candidates),
                        ("--prior_guidance", args.prior_guidance),
                        ("--prior_steps", args.prior_steps)):
        if value is not None and not args.prior:
            p.error(f"{flag} needs --prior DIR (an unCLIP prior workdir).")
    if args.prior_candidates is not None and args.prior_candidates < 1:
        p.error(f"--prior_candidates must be >= 1 (1: no selection), got {args.prior_candidates}.")
    if args.prior_steps is not None and args.prior_steps < 1:
        p.error(f"--prior_steps must be >= 1, got {args.prior_steps}.")
    if args.prior_guidance is not None and not math.isfinite(args.prior_guidance):
        p.error(f"--prior_guidance takes a finite number, got {args.prior_guidance}.")
    for pair in args.interpolate or []:
        if len(pair) != 2:
            p.error(f"--interpolate takes two images, A and B (one row from A to B), got "
                    f"{len(pair)}: {pair}. Repeat the flag for more rows.")
    if args.frames < 2:
        p.error(f"--frames must be >= 2 (a row runs from A, frame 0, to B, frame K - 1), got "
                f"{args.frames}.")
    if args.interpolate and ((args.sampler not in (None, "ddim")) or (args.eta or 0.0) != 0.0):
        p.error("--interpolate samples with DDIM eta = 0 (one deterministic map from noise and "
                "embedding to image, so the frames differ only by the embedding); drop --sampler "
                "and --eta.")
    for path in (args.variations or []) + [x for pair in args.interpolate or [] for x in pair]:
        if not os.path.isfile(path):
            flag = "--variations" if args.variations else "--interpolate"
            p.error(f"{flag}: {path} is not a file (pass image files, e.g. PNGs).")
    for flag, given in (("--mask", args.mask), ("--mask_box", args.mask_box),
                        ("--repaint_jumps", args.repaint_jumps),
                        ("--repaint_jump_length", args.repaint_jump_length != 10)):
        if given and not args.inpaint:
            p.error(f"{flag} needs --inpaint IMAGE (the image to complete).")
    if args.inpaint:
        if bool(args.mask) == bool(args.mask_box):
            p.error("--inpaint needs the region to regenerate: --mask MASK.png (white = keep, "
                    "black = regenerate) or --mask_box x0,y0,x1,y1, one of them.")
        if args.repaint_jumps < 0 or args.repaint_jump_length < 1:
            p.error(f"--repaint_jumps must be >= 0 and --repaint_jump_length >= 1, got "
                    f"{args.repaint_jumps} and {args.repaint_jump_length}.")
        for flag, value in (("--inpaint", args.inpaint), ("--mask", args.mask)):
            if value and not os.path.isfile(value):
                p.error(f"{flag} {value} is not a file (pass a PNG image).")
        if args.mask_box:
            from t2i_jax.sampling.inpaint import parse_box
            try:
                args.mask_box = parse_box(args.mask_box)
            except ValueError as e:
                p.error(str(e))
        if args.prior or args.variations or args.interpolate or args.low_res or args.sr:
            p.error("--inpaint completes an image with one base model (--workdir); it does not "
                    "combine with --prior, --variations, --interpolate, --low_res or --sr.")
    if args.prompts_file is None and not args.prompt and not (args.variations or args.interpolate):
        p.error("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    if min(args.num_per_prompt, args.batch_size, args.shard_size, args.grid_columns) < 1:
        p.error("--num_per_prompt, --batch_size, --shard_size and --grid_columns must be >= 1.")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed must be in [0, 2^32) (JAX keys hold 32 bits), got {args.seed}.")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}.")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:  # NaN fails too
        p.error(f"--eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), "
                f"got {args.eta}.")
    if args.guidance is not None:
        given = args.guidance
        try:
            args.guidance = [float(w) for g in given for w in g.split(",") if w.strip()]
        except ValueError:
            args.guidance = None
        if not args.guidance or not all(math.isfinite(w) for w in args.guidance):
            p.error(f"--guidance takes finite numbers (e.g. --guidance 0 1 3 or 0,1,3), got {given}.")
    from t2i_jax.files import check_output_dir  # no jax: refusals come before the backends start
    try:
        check_output_dir(args.outdir, "--outdir")
    except ValueError as e:
        p.error(str(e))
    return args


def read_prompts_file(path: str) -> list:
    """Prompts, one a line; raises ValueError naming the first line that is not valid UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read --prompts_file {path}: {e.strerror}.") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark
    prompts = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid UTF-8 (byte {e.start + 1} of the line: "
                             f"{line[e.start:e.start + 1]!r}); save the file as UTF-8.") from None
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path} holds no prompts (only blank lines).")
    return prompts


def main(argv=None, boundary=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if boundary is not None:  # the outdir, as argparse understood it, for the log and Ctrl-C
        boundary.log_in(args.outdir)
        boundary.interrupted = (f"interrupted: the finished shards in {os.path.abspath(args.outdir)} "
                                "are kept; rerun the same command to finish the job.")
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from t2i_jax import distributed
    distributed.join(args.group)  # every process of a multi-host job, before any device is used
    own = ("group", "process_id")  # what may differ between the processes of one job
    distributed.check_same("command line", dict(
        {k: v for k, v in vars(args).items() if k not in own}, prompts=prompts))

    from t2i_jax.diffusion import samplers
    from t2i_jax.errors import UsageError
    from t2i_jax.sampling import job as job_lib
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.load import load_trained, require_generator
    assert set(SAMPLER_NAMES) == set(samplers.SAMPLERS), "sample.py's sampler list is stale"

    trained = load_trained(args.workdir, step=args.step, params=args.params)
    cfg, family = trained.config, trained.family
    if family.name == "prior":
        raise UsageError(f"--workdir {trained.workdir} holds an unCLIP prior, which writes CLIP "
                         "image embeddings, not images: pass the decoder as --workdir and this "
                         "one as --prior DIR.")
    try:
        require_generator(trained)
    except ValueError as e:
        raise UsageError(str(e)) from None
    unclip_flag = ("--prior" if args.prior else "--variations" if args.variations else
                   "--interpolate" if args.interpolate else None)
    if family.name == "decoder" and unclip_flag is None:
        raise UsageError(f"--workdir {trained.workdir} is an unCLIP decoder: each image needs a "
                         "CLIP image embedding. Pass --prior PRIOR (text -> prior -> decoder), "
                         "--variations IMAGE ... or --interpolate A B.")
    if unclip_flag and family.name != "decoder":
        raise UsageError(f"{unclip_flag} needs an unCLIP decoder in --workdir; {trained.workdir} "
                         f"holds a {family.name} model (train one with configs/digits_decoder.py).")
    if unclip_flag and (args.low_res or (unclip_flag == "--prior" and (
            args.classifier or args.clip))):
        raise UsageError(f"{unclip_flag} does not combine with "
                         + ("--low_res" if args.low_res else "--classifier/--clip guides (stage 0 "
                            "is the prior, which draws embeddings)") + ".")
    if unclip_flag in ("--variations", "--interpolate") and not prompts:
        prompts = [""]  # no caption: the embedding alone (the decoder's text is the null)
    method = (("glide" if getattr(family, "inpaint", False) else "repaint")
              if args.inpaint else None)
    if method == "glide" and (args.repaint_jumps or args.repaint_jump_length != 10):
        raise UsageError("--repaint_jumps / --repaint_jump_length are RePaint's, for a model that "
                         f"is not mask-conditioned; {trained.workdir} is GLIDE's inpainting "
                         "model, which overwrites x0_hat's known pixels instead: leave them out.")
    try:
        options = stages_lib.stage_options(trained, sampler=args.sampler, steps=args.steps,
                                           eta=args.eta, thresholding=args.thresholding,
                                           ddpm_variance=args.ddpm_variance, inpaint=method,
                                           repaint_jumps=args.repaint_jumps if args.inpaint else 0,
                                           repaint_jump_length=args.repaint_jump_length)
        known = inpaint_record = None
        if args.inpaint:
            from t2i_jax.sampling.inpaint import load_inpaint
            x, m, inpaint_record = load_inpaint(
                args.inpaint, family.image_shape, mask=args.mask, box=args.mask_box,
                method=method, jumps=args.repaint_jumps, jump_length=args.repaint_jump_length)
            known = (x, m)
    except ValueError as e:
        raise UsageError(str(e)) from None
    guidance = args.guidance if args.guidance is not None else [float(cfg.sample.guidance_weight)]

    for i, prompt in enumerate(prompts):
        if not prompt and family.conditioning.guidable and not unclip_flag:
            print(f"[t2i_jax] prompt {i + 1} is empty: it means the null condition, so its images "
                  "are unconditional samples (guidance does not change them).", file=sys.stderr)
    family.conditioning.check_prompts(prompts)
    if family.conditioning.kind == "text":  # reported here per prompt, not by the tokenizer again
        warnings.filterwarnings("ignore", message=r".*prompt\(s\) longer than")
        tokenizer = family.tokenizer
        max_length = tokenizer.max_length
        toks = tokenizer(prompts, warn=False)
        unit = ("" if tokenizer.name != "byte" else f" ({max_length - 2} UTF-8 bytes)")
        for i in map(int, toks.truncated.nonzero()[0]):
            kept = tokenizer.decode(toks.ids[i:i + 1])[0]
            print(f"[t2i_jax] warning: prompt {i + 1} is longer than the model's {max_length} "
                  f"{tokenizer.name if tokenizer.name != 'byte' else ''} tokens{unit}: it was "
                  f"truncated to {kept!r}.".replace("  ", " "), file=sys.stderr)

    try:
        stages, low_res, low_res_record, aug_level, prompts = load_stages(args, trained, prompts)
        plan = JobPlan(first=trained, options=options, guidance=guidance, prompts=prompts,
                       num_per_prompt=args.num_per_prompt)
        if unclip_flag:
            plan = load_unclip(args, plan)
    except ValueError as e:
        raise UsageError(str(e)) from None
    first, options, guidance, prompts = plan.first, plan.options, plan.guidance, plan.prompts
    num_per_prompt, stages = plan.num_per_prompt, plan.pre_stages + stages
    guides, clip = load_guides(args, trained)
    spec = job_lib.JobSpec.create(first, prompts, num_per_prompt=num_per_prompt,
                                  guidance=guidance, seed=args.seed, options=options,
                                  shard_size=args.shard_size, guides=guides, rerank=args.rerank,
                                  reranker=clip if args.rerank > 1 else None, stages=stages,
                                  aug_level=aug_level, low_res=low_res_record,
                                  embedding=plan.embedding, candidates=plan.candidates,
                                  shared_noise=plan.shared_noise, inpaint=inpaint_record)
    lead = distributed.is_lead()  # the others compute their rows and write nothing
    if lead:
        print(f"[t2i_jax] checkpoint {first.step} ({first.kind} parameters) of "
              f"{first.workdir}; {spec.num_images} images: {len(prompts)} prompt(s) x "
              f"{num_per_prompt} x {len(guidance)} guidance weight(s), {options.sampler} "
              f"{options.num_steps} steps" + (f", {distributed.process_count()} processes"
                                             if distributed.process_count() > 1 else "") + ".",
              file=sys.stderr)
        for k, st in enumerate(stages, start=1):
            o = st.options
            print(f"[t2i_jax] stage {k}: checkpoint {st.trained.step} of {st.trained.workdir}, "
                  f"{o.sampler} {o.num_steps} steps, guidance {st.guidance:g}, "
                  + ("augmentation " if st.aug_level is not None else "")
                  + (f"level {st.aug_level:g}, " if st.aug_level is not None else "")
                  + f"thresholding {o.thresholding or 'none'}.",
                  file=sys.stderr)
    # The files read on each host (a prompts file, a guide image) must be the same everywhere.
    distributed.check_same("job", spec.to_json())
    result = job_lib.run_job(first, spec, args.outdir, batch_size=args.batch_size,
                             progress=not args.no_progress, npz=args.npz,
                             grid_columns=args.grid_columns, guides=guides,
                             reranker=clip if args.rerank > 1 else None, stages=stages,
                             low_res=low_res, embeddings=plan.embeddings, known=known)
    if lead:
        job_lib.print_summary(result)
        print(os.path.join(os.path.abspath(args.outdir), job_lib.GRID_FILE))
    return 0


def load_stages(args, trained, prompts):
    """The --sr stages (each checked against the one before), stage 0's --low_res inputs and
    level: (stages, low_res uint8 [P, h, w, C] or None, its record, aug_level, prompts)."""
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.load import load_trained
    low_res = record = aug_level = None
    if stages_lib.is_sr(trained):
        if not args.low_res:
            raise ValueError(
                f"--workdir {trained.workdir} is a super-resolution model: it needs inputs. Pass a "
                "base model as --workdir and this one as --sr DIR, or give it --low_res "
                "FILE_OR_DIR (the images to super-resolve).")
        low_res, record = stages_lib.load_low_res(args.low_res, trained.family.low_res_shape)
        if len(prompts) == 1 and len(low_res) > 1:
            prompts = prompts * len(low_res)  # one prompt for every image
        if len(prompts) != len(low_res):
            raise ValueError(f"{len(low_res)} --low_res images for {len(prompts)} prompts: give "
                             "one prompt (for every image) or one per image, in order.")
        aug_level = args.aug_level if args.aug_level is not None else \
            trained.family.default_aug_level()
    elif args.low_res:
        raise ValueError(f"--low_res needs a super-resolution model in --workdir; "
                         f"{trained.workdir} holds a {trained.family.name} model.")
    steps, samplers_, weights = args.sr_steps, args.sr_sampler, args.sr_guidance
    levels, thresholds = args.sr_aug_level, args.sr_thresholding  # one per --sr (parse_args)
    stages, prev = [], trained
    for k, workdir in enumerate(args.sr):
        st = load_trained(workdir, params=args.params)
        stages_lib.check_follows(prev, st)
        options = stages_lib.stage_options(st, sampler=samplers_[k], steps=steps[k],
                                           thresholding=thresholds[k], flag="--sr_steps")
        w = weights[k] if weights[k] is not None else float(st.config.sample.guidance_weight)
        if not st.family.conditioning.guidable:
            w = 0.0
        level = levels[k] if levels[k] is not None else st.family.default_aug_level()
        stages.append(stages_lib.Stage(st, options, float(w), float(level)))
        prev = st
    return stages, low_res, record, aug_level, prompts


@dataclasses.dataclass
class JobPlan:
    """Stage 0 of the job and what it is given: the --workdir model and its options, or what
    --prior / --variations / --interpolate make of them (load_unclip)."""
    first: object                      # stage 0's Trained
    options: object                    # its SampleOptions
    guidance: list
    prompts: list
    num_per_prompt: int
    pre_stages: list = dataclasses.field(default_factory=list)  # before the --sr stages
    embeddings: object = None          # a decoder stage 0's given embeddings
    embedding: object = None           # JobSpec.embedding: where they come from
    candidates: int = 1
    shared_noise: bool = False


def load_unclip(args, plan: JobPlan) -> JobPlan:
    """The unCLIP job of the flags: with --prior, stage 0 is the prior and the decoder stage 1
    (with --guidance, one value, as its weight); with --variations / --interpolate the decoder
    is stage 0 with each image's (or each slerp frame's) CLIP embedding given."""
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling import unclip
    from t2i_jax.sampling.load import load_trained
    decoder, prompts, options, guidance = plan.first, plan.prompts, plan.options, plan.guidance
    fam = decoder.family
    if args.prior:
        prior = load_trained(args.prior, params=args.params)
        stages_lib.check_prior_decoder(prior, decoder)
        if len(guidance) != 1:
            raise ValueError(f"with --prior, --guidance is the decoder's weight: one value (got "
                             f"{guidance}); sweep it with one job per value.")
        p_options = stages_lib.stage_options(prior, steps=args.prior_steps, flag="--prior_steps")
        w_prior = (args.prior_guidance if args.prior_guidance is not None
                   else float(prior.config.sample.guidance_weight))
        k = (args.prior_candidates if args.prior_candidates is not None
             else prior.family.default_candidates())
        prior.family.conditioning.check_prompts(prompts)
        dec = stages_lib.Stage(decoder, options, float(guidance[0]), None)
        print(f"[t2i_jax] prior: checkpoint {prior.step} of {prior.workdir}, {p_options.sampler} "
              f"{p_options.num_steps} steps, guidance {w_prior:g}, {k} candidate(s) per image.",
              file=sys.stderr)
        return dataclasses.replace(plan, first=prior, options=p_options, guidance=[w_prior],
                                   pre_stages=[dec], candidates=int(k),
                                   embedding={"source": "prior"})
    shape = tuple(fam.output_shape)
    if args.variations:
        x, rows = unclip.load_images(args.variations, shape, "--variations")
        if len(prompts) == 1:
            prompts = prompts * len(x)
        if len(prompts) != len(x):
            raise ValueError(f"{len(x)} --variations images for {len(prompts)} prompts: give no "
                             "prompt (the embedding alone), one for every image, or one per image.")
        z = fam.embed_images(stages_lib.to_float(x))
        if args.sampler is None and args.eta is None:
            options = dataclasses.replace(options, eta=1.0)  # stochastic: variations
        return dataclasses.replace(plan, prompts=prompts, options=options, embeddings=z,
                                   embedding={"source": "image", "rows": rows})
    pairs = args.interpolate
    flat, rows = unclip.load_images([p for pair in pairs for p in pair], shape, "--interpolate")
    z = fam.embed_images(stages_lib.to_float(flat)).reshape(len(pairs), 2, -1)
    t = np.linspace(0.0, 1.0, args.frames)
    frames = np.stack([unclip.slerp(a, b, t) for a, b in z])                 # [P, K, E]
    if len(prompts) == 1:
        prompts = prompts * len(pairs)
    if len(prompts) != len(pairs):
        raise ValueError(f"{len(pairs)} --interpolate rows for {len(prompts)} prompts: give no "
                         "prompt, one for every row, or one per row.")
    options = dataclasses.replace(options, sampler="ddim", eta=0.0)
    rec_rows = [{"a": rows[2 * i]["path"], "a_sha256": rows[2 * i]["sha256"],
                 "b": rows[2 * i + 1]["path"], "b_sha256": rows[2 * i + 1]["sha256"]}
                for i in range(len(pairs))]
    return dataclasses.replace(plan, prompts=prompts, options=options, embeddings=frames,
                               num_per_prompt=args.frames, shared_noise=True,
                               embedding={"source": "slerp", "rows": rec_rows})


def load_guides(args, trained):
    """The guides the flags ask for, each checked against the model: (guides, the CLIP or None)."""
    from t2i_jax.sampling import guides as guides_lib
    out, clip = [], None
    if args.classifier:
        c = guides_lib.load_guide_model(args.classifier, "--classifier", trained)
        scale = args.classifier_scale if args.classifier_scale is not None else \
            guides_lib.default_scale(c, "classifier")
        out.append(guides_lib.Guide("classifier", c, scale))
    if args.clip:
        clip = guides_lib.load_guide_model(args.clip, "--clip", trained)
        scale = args.clip_scale if args.clip_scale is not None else \
            guides_lib.default_scale(clip, "clip_text")
        out.append(guides_lib.Guide("clip_text", clip, scale))
        if args.guide_image:
            ref = guides_lib.load_reference(args.guide_image, trained)
            scale = args.image_scale if args.image_scale is not None else \
                guides_lib.default_scale(clip, "clip_image")
            out.append(guides_lib.Guide("clip_image", clip, scale, args.guide_image, ref))
    for g in out:
        print(f"[t2i_jax] guide {g.kind}: {g.trained.workdir} step {g.trained.step}, scale "
              f"{g.scale:g}.", file=sys.stderr)
    return out, clip


def run(argv=None) -> int:
    """main() behind the error boundary (t2i_jax/errors.py): one line per mistake, the exit code
    returned (argparse's refusals exit 2 through SystemExit; T2I_DEBUG=1 shows tracebacks)."""
    from t2i_jax.errors import Boundary
    boundary = Boundary("sample.py")
    return boundary.run(main, sys.argv[1:] if argv is None else argv, boundary)


if __name__ == "__main__":
    from t2i_jax.errors import Boundary
    _boundary = Boundary("sample.py")
    _boundary.exit(main, sys.argv[1:], _boundary)
