"""Sample images from a trained workdir: prompts in, PNGs, a grid and a JSON line per image out.

    python sample.py --workdir runs/digits --prompt "seven" --prompt "数字三" \\
        --num_per_prompt 16 --guidance 3 --sampler ddim --steps 50 --seed 0 --outdir out/digits
    python sample.py --workdir runs/digits --prompts_file prompts.txt --guidance 0 1 3 \\
        --num_per_prompt 100 --npz --outdir out/sweep          # a sweep over w: one compilation
    python sample.py --workdir runs/digits --prompt "seven" --guidance 9 --guidance_rescale 0.7 \
        --guidance_interval 0.1 0.9 --apg --apg_momentum -0.5 --outdir out/apg  # after CFG

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
trained with diffusion.learn_sigma). Heun on a VP model: --sampler heun --ode_variables flow solves
the ODE in the flow path's time tau in [0, 1]; the default sigma form's sigma_max (3e4 on the cosine
schedule, inf at zero terminal SNR) scales its corrector's errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a", "heun", "pndm")  # samplers.SAMPLERS
THRESHOLDINGS = ("static", "dynamic", "none")


def parse_args(argv):
    """The flags, checked (argparse's refusals, exit 2): args.request is the sampling Request."""
    from t2i_jax.errors import ArgumentParser  # imports no jax
    from t2i_jax.sampling.request import Request, glue_values  # imports no jax
    p = ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training workdir (its checkpoints/ is read), or a diffusers Stable Diffusion pipeline folder (model_index.json)")
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
    p.add_argument("--ode_variables", choices=("sigma", "flow"),
                   help="Heun's variables: sigma (k-diffusion's x / sqrt(abar) in sigma = "
                        "sqrt((1 - abar) / abar)) or flow (the flow path's, time tau in [0, 1]: "
                        "well conditioned where sigma_max is large, e.g. the cosine schedule's "
                        "3e4); default: the model's process (flow on a flow model, else sigma)")
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
    p.add_argument("--frozen", action="append", default=[], metavar="RECORDED=DIR",
                   help="a frozen model (autoencoder, CLIP, T5) that moved: its recorded path, "
                        "its new one (the content is checked against the recorded hash)")
    a = p.add_argument_group("guidance after classifier-free guidance (t2i_jax/diffusion/cfg.py): how "
                             "stage 0's conditional and null predictions combine; values are "
                             "traced (a sweep compiles once), and each needs --guidance W != 0")
    a.add_argument("--guidance_rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescale (Lin et al. 2023, eqs. 15-17) in [0, 1] on the model's "
                        "CFG prediction: phi x_cfg std(x_pos) / std(x_cfg) + (1 - phi) x_cfg "
                        "(the paper: 0.7; default 0: off)")
    a.add_argument("--guidance_interval", nargs=2, type=float, metavar=("LO", "HI"),
                   help="guidance only where the chain's time (0: data, 1: pure noise) lies in "
                        "[LO, HI], the conditional prediction alone elsewhere (Kynkaanniemi et "
                        "al. 2024); default 0 1: every step")
    a.add_argument("--guidance_interval_sigma", nargs=2, type=float, metavar=("LO", "HI"),
                   help="the same in the paper's terms: guidance where sigma = sqrt((1 - abar) / "
                        "abar) lies in (LO, HI] (the paper's SD-XL: 0.28 5.42)")
    a.add_argument("--apg", action="store_true",
                   help="adaptive projected guidance (Sadat et al. 2024, Alg. 1) on x0_hat in "
                        "place of CFG's rule: the update's part parallel to x0(y) weighted by "
                        "--apg_eta, clipped, with momentum")
    a.add_argument("--apg_eta", type=float, metavar="ETA",
                   help="with --apg: the parallel part's weight (default 0, the paper's; 1 with "
                        "no threshold and no momentum is CFG)")
    a.add_argument("--apg_norm_threshold", type=float, metavar="R",
                   help="with --apg: the update's norm clipped to R (default 0: no threshold)")
    a.add_argument("--apg_momentum", type=float, metavar="BETA",
                   help="with --apg: running = update + BETA running (default 0: none; the paper "
                        "uses negative BETA, e.g. -0.5)")
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
    d = p.add_argument_group("negative prompts, img2img and given noise (Stable Diffusion's; any "
                             "text model)")
    d.add_argument("--negative_prompt", action="append", metavar="TEXT",
                   help="read by guidance's unconditional branch in place of the empty prompt: "
                        "once (every prompt) or once per prompt, in order")
    d.add_argument("--init_image", metavar="IMAGE",
                   help="img2img (SDEdit): the image (the model's size), encoded and noised to "
                        "the chain's step S - int(S x strength); the rest of the chain runs")
    d.add_argument("--strength", type=float, metavar="S", help="with --init_image, in (0, 1]: "
                   "the part of the chain that runs (default 0.8, diffusers')")
    d.add_argument("--lora", metavar="FILE",
                   help="a LoRA file (diffusers/PEFT pytorch_lora_weights.safetensors, older "
                        "diffusers or kohya names) merged into a diffusers folder's UNet")
    d.add_argument("--lora_scale", type=float, metavar="S", help="with --lora: the factor on "
                   "its alpha / rank (default 1, diffusers' cross_attention_kwargs scale)")
    d.add_argument("--init_noise", metavar="FILE.npy",
                   help="x_T of every image in index order, [N, H, W, C] in the chain's space "
                        "(latents for a latent model), in place of the seeded noise")
    from t2i_jax import distributed  # imports no jax
    distributed.add_arguments(p)
    args = p.parse_args(glue_values(argv))
    try:
        args.group = distributed.from_args(args)
    except ValueError as e:
        p.error(str(e))
    fields = {f.name for f in dataclasses.fields(Request)}
    given = dict(vars(args), prompts=args.prompt, progress=not args.no_progress)
    stray = set(given) - fields - {"prompt", "no_progress", "group"} - set(distributed.FLAG_HELP)
    assert not stray, f"sample.py flags with no Request field: {sorted(stray)}"
    args.request = Request(**{k: v for k, v in given.items() if k in fields})
    try:
        args.request.check()
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None, boundary=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    request = args.request
    if boundary is not None:  # the outdir, as argparse understood it, for the log and Ctrl-C
        boundary.log_in(request.outdir)
        boundary.interrupted = (f"interrupted: the finished shards in "
                                f"{os.path.abspath(request.outdir)} are kept; rerun the same "
                                "command to finish the job.")
    prompts = request.all_prompts()
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from t2i_jax import distributed
    distributed.join(args.group)  # every process of a multi-host job, before any device is used
    distributed.check_same("command line", dict(dataclasses.asdict(request), prompts=prompts))

    from t2i_jax.diffusion import samplers
    from t2i_jax.sampling import job, planner
    from t2i_jax.sampling.outdir import GRID_FILE
    assert set(SAMPLER_NAMES) == set(samplers.SAMPLERS), "sample.py's sampler list is stale"
    plan = planner.build(request, prompts)
    spec, first, o = plan.spec, plan.first, plan.options
    lead = distributed.is_lead()  # the others compute their rows and write nothing
    if lead:
        print(f"[t2i_jax] checkpoint {first.step} ({first.kind} parameters) of {first.workdir}; "
              f"{spec.num_images} images: {len(spec.prompts)} prompt(s) x {spec.num_per_prompt} x "
              f"{len(spec.guidance)} guidance weight(s), {o.sampler} {o.num_steps} steps"
              + (f", {distributed.process_count()} processes"
                 if distributed.process_count() > 1 else "") + ".", file=sys.stderr)
        if spec.rule_record():  # stage 0's CFG rule (diffusion/cfg.py)
            print(f"[t2i_jax] guidance after CFG: {spec.rule_record()}.", file=sys.stderr)
        for k, st in enumerate(plan.stages, start=1):
            so, level = st.options, st.aug_level
            print(f"[t2i_jax] stage {k}: checkpoint {st.trained.step} of {st.trained.workdir}, "
                  f"{so.sampler} {so.num_steps} steps, guidance {st.guidance:g}, "
                  + (f"augmentation level {level:g}, " if level is not None else "")
                  + f"thresholding {so.thresholding or 'none'}.", file=sys.stderr)
    # The files read on each host (a prompts file, a guide image) must be the same everywhere.
    distributed.check_same("job", spec.to_json())
    result = job.run_job(plan, request.outdir, batch_size=request.batch_size,
                         progress=request.progress, npz=request.npz,
                         grid_columns=request.grid_columns)
    if lead:
        job.print_summary(result)
        print(os.path.join(os.path.abspath(request.outdir), GRID_FILE))
    return 0


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
