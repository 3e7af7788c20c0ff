"""A Request (sample.py's flags) -> a Plan: the models loaded and checked against each other.

    plan = planner.build(request)   # request: sampling/request.py, already checked

Stage 0 is --workdir's model, or --prior's with the decoder after it; --sr stages follow, each
checked against the one before it; --variations / --interpolate give a decoder stage 0 its CLIP
embeddings, --low_res an SR stage 0 its images, --inpaint the image to complete. Every refusal
is a ValueError naming the flag and the fix, raised before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from t2i_jax import images
from t2i_jax.diffusion import cfg
from t2i_jax.errors import UsageError
from t2i_jax.sampling import guides as guides_lib
from t2i_jax.sampling import stages as stages_lib
from t2i_jax.sampling import unclip
from t2i_jax.sampling.inpaint import load_inpaint
from t2i_jax.sampling.load import load_trained, require_generator
from t2i_jax.sampling.plan import Given, Inpaint, Plan
from t2i_jax.sampling.request import Request, log


def build(request: Request, prompts=None) -> Plan:
    """The plan of a checked request (prompts: request.all_prompts(), when already read). A
    refusal of the flags' combination is a UsageError (exit code 2); one of the inputs (a prompt
    the model cannot take, a guide for other data) a ValueError."""
    r = request
    prompts = list(r.all_prompts() if prompts is None else prompts)
    trained = load_trained(r.workdir, step=r.step, params=r.params, frozen_paths=r.frozen_paths,
                           lora=r.lora, lora_scale=r.lora_scale)
    family, flag = trained.family, r.unclip_flag
    with _usage():
        _check_workdir(r, trained)
        method = ("glide" if family.inpaint else "repaint") if r.inpaint else None
        if method == "glide" and (r.repaint_jumps or r.repaint_jump_length != 10):
            raise ValueError("--repaint_jumps / --repaint_jump_length are RePaint's, for a model "
                             f"that is not mask-conditioned; {trained.workdir} is GLIDE's "
                             "inpainting model, which overwrites x0_hat's known pixels instead: "
                             "leave them out.")
        options = stages_lib.stage_options(
            trained, sampler=r.sampler, steps=r.steps, eta=r.eta, thresholding=r.thresholding,
            ddpm_variance=r.ddpm_variance, inpaint=method,
            repaint_jumps=r.repaint_jumps if r.inpaint else 0,
            repaint_jump_length=r.repaint_jump_length,
            strength=r.strength if r.init_image else None, ode_variables=r.ode_variables)
        kw = dict(shard_size=r.shard_size)
        _given_sd_inputs(r, trained, prompts, kw)
        if r.inpaint:
            x, m, record = load_inpaint(r.inpaint, family.output_shape, mask=r.mask,
                                        box=r.mask_box, method=method, jumps=r.repaint_jumps,
                                        jump_length=r.repaint_jump_length)
    if flag in ("--variations", "--interpolate") and not prompts:
        prompts = [""]  # no caption: the embedding alone (the decoder's text is the null)
    if r.inpaint:
        kw["inpaint"] = Inpaint.create(x, m, record, family.output_shape, len(prompts))
    guidance = r.guidance if r.guidance is not None else [float(trained.config.sample.guidance_weight)]
    for i, prompt in enumerate(prompts):
        if not prompt and family.conditioning.guidable and not flag:
            log(f"prompt {i + 1} is empty: it means the null condition, so its images are "
                "unconditional samples (guidance does not change them).")
    family.conditioning.check_prompts(prompts)
    first, n = trained, r.num_per_prompt
    with _usage():
        if stages_lib.is_sr(trained):
            prompts = _given_low_res(r, trained, prompts, kw)
        stages = _sr_stages(r, trained)
        if flag == "--prior":
            first, options, guidance, stages = _prior_first(r, trained, options, guidance,
                                                            prompts, stages, kw)
        elif flag:
            prompts, options, n = _given_embeddings(r, trained, prompts, options, kw)
    guides, clip = _guides(r, trained)
    plan = Plan.create(first, prompts, num_per_prompt=n, guidance=guidance, seed=r.seed,
                       options=options, stages=tuple(stages), guides=tuple(guides),
                       rerank=r.rerank, reranker=clip if r.rerank > 1 else None,
                       guidance_rule=guidance_rule(r), **kw)
    _report_truncation(plan)
    return plan


def guidance_rule(r: Request) -> cfg.Rule:
    """Stage 0's CFG rule from the flags (Plan.create turns the no-op values off)."""
    apg = None if not r.apg else cfg.APG(
        cfg.DEFAULT_APG_ETA if r.apg_eta is None else r.apg_eta,
        r.apg_norm_threshold or 0.0, r.apg_momentum or 0.0)
    return cfg.Rule(r.guidance_rescale, r.guidance_interval and tuple(r.guidance_interval),
                    r.guidance_interval_sigma and tuple(r.guidance_interval_sigma), apg)


def _given_sd_inputs(r: Request, trained, prompts: list, kw: dict) -> None:
    """--negative_prompt (once, or one per prompt), --init_noise and --init_image into kw."""
    from t2i_jax import user_images
    from t2i_jax.sampling.plan import InitImage, InitNoise
    if r.negative_prompt:
        neg = list(r.negative_prompt)
        if len(neg) == 1:
            neg = neg * len(prompts)
        if len(neg) != len(prompts):
            raise ValueError(f"--negative_prompt was given {len(r.negative_prompt)} times for "
                             f"{len(prompts)} prompts: give it once, or once per prompt.")
        if trained.family.conditioning.kind != "text":
            raise ValueError(f"--negative_prompt needs a text-conditioned model; {trained.workdir} "
                             f"is conditioned on {trained.family.conditioning.kind}.")
        trained.family.conditioning.check_prompts(neg)
        kw["negative"] = tuple(neg)
    if r.init_noise:
        kw["init_noise"] = InitNoise.read(r.init_noise)
    if r.init_image:
        c = int(trained.family.output_shape[-1])
        img = user_images.read(r.init_image, c, "--init_image")
        kw["init_image"] = InitImage(img.pixels[None], dict(img.record))


@contextlib.contextmanager
def _usage():
    """A ValueError inside is a refusal of the command line: a UsageError (exit code 2)."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_workdir(r: Request, trained) -> None:
    """Refuses a --workdir model that cannot be stage 0 of the job the flags ask for."""
    family, flag = trained.family, r.unclip_flag
    if family.output_kind == "embedding":
        raise ValueError(f"--workdir {trained.workdir} holds an unCLIP prior, which writes CLIP "
                         "image embeddings, not images: pass the decoder as --workdir and this "
                         "one as --prior DIR.")
    require_generator(trained)
    if family.stage_input == "embedding" and flag is None:
        raise ValueError(f"--workdir {trained.workdir} is an unCLIP decoder: each image needs a "
                         "CLIP image embedding. Pass --prior PRIOR (text -> prior -> decoder), "
                         "--variations IMAGE ... or --interpolate A B.")
    if flag and family.stage_input != "embedding":
        raise ValueError(f"{flag} needs an unCLIP decoder in --workdir; {trained.workdir} holds a "
                         f"{family.name} model (train one with configs/digits_decoder.py).")
    if flag and (r.low_res or (flag == "--prior" and (r.classifier or r.clip))):
        raise ValueError(f"{flag} does not combine with "
                         + ("--low_res" if r.low_res else "--classifier/--clip guides (stage 0 "
                            "is the prior, which draws embeddings)") + ".")
    if r.low_res and not stages_lib.is_sr(trained):
        raise ValueError(f"--low_res needs a super-resolution model in --workdir; "
                         f"{trained.workdir} holds a {family.name} model.")


def _given_low_res(r: Request, trained, prompts: list, kw: dict) -> list:
    """--low_res images for an SR stage 0 (one per prompt, or one prompt for all) and their level."""
    if not r.low_res:
        raise ValueError(
            f"--workdir {trained.workdir} is a super-resolution model: it needs inputs. Pass a "
            "base model as --workdir and this one as --sr DIR, or give it --low_res "
            "FILE_OR_DIR (the images to super-resolve).")
    low_res, record = stages_lib.load_low_res(r.low_res, trained.family.low_res_shape)
    if len(prompts) == 1 and len(low_res) > 1:
        prompts = prompts * len(low_res)  # one prompt for every image
    if len(prompts) != len(low_res):
        raise ValueError(f"{len(low_res)} --low_res images for {len(prompts)} prompts: give "
                         "one prompt (for every image) or one per image, in order.")
    kw["given"] = Given(low_res, record)
    kw["aug_level"] = r.aug_level if r.aug_level is not None else trained.family.default_aug_level()
    return prompts


def _sr_stages(r: Request, trained) -> list:
    """The --sr stages, each checked against the one before it, with its own options."""
    stages, prev = [], trained
    for k, workdir in enumerate(r.sr):
        st = load_trained(workdir, params=r.params, frozen_paths=r.frozen_paths)
        stages_lib.check_follows(prev, st)
        options = stages_lib.stage_options(st, sampler=r.sr_sampler[k], steps=r.sr_steps[k],
                                           thresholding=r.sr_thresholding[k], flag="--sr_steps")
        w = r.sr_guidance[k] if r.sr_guidance[k] is not None else \
            float(st.config.sample.guidance_weight)
        if not st.family.conditioning.guidable:
            w = 0.0
        level = r.sr_aug_level[k] if r.sr_aug_level[k] is not None else \
            st.family.default_aug_level()
        stages.append(stages_lib.Stage(st, options, float(w), float(level),
                                       flags=("--sr_guidance", "--sr_thresholding")))
        prev = st
    return stages


def _prior_first(r: Request, decoder, options, guidance, prompts, stages, kw) -> tuple:
    """--prior: the prior is stage 0 and the decoder stage 1 (with --guidance, one value, as its
    weight): (first, its options, its weights, the stages after it)."""
    prior = load_trained(r.prior, params=r.params, frozen_paths=r.frozen_paths)
    stages_lib.check_prior_decoder(prior, decoder)
    if len(guidance) != 1:
        raise ValueError(f"with --prior, --guidance is the decoder's weight: one value (got "
                         f"{guidance}); sweep it with one job per value.")
    p_options = stages_lib.stage_options(prior, steps=r.prior_steps, flag="--prior_steps")
    w_prior = (r.prior_guidance if r.prior_guidance is not None
               else float(prior.config.sample.guidance_weight))
    k = r.prior_candidates if r.prior_candidates is not None else prior.family.default_candidates()
    prior.family.conditioning.check_prompts(prompts)
    log(f"prior: checkpoint {prior.step} of {prior.workdir}, {p_options.sampler} "
        f"{p_options.num_steps} steps, guidance {w_prior:g}, {k} candidate(s) per image.")
    kw["candidates"] = int(k)
    kw["flags"] = ("--prior_guidance", None)  # a prior's chain draws embeddings: no thresholding
    decoder_stage = stages_lib.Stage(decoder, options, float(guidance[0]), None)
    return prior, p_options, [w_prior], [decoder_stage] + list(stages)


def _given_embeddings(r: Request, decoder, prompts, options, kw) -> tuple:
    """--variations (each image's CLIP embedding) or --interpolate (slerps between two images'):
    the decoder's given embeddings; (prompts, options, images per prompt)."""
    fam = decoder.family
    shape = tuple(fam.output_shape)
    if r.variations:
        x, rows = unclip.load_images(r.variations, shape, "--variations")
        if len(prompts) == 1:
            prompts = prompts * len(x)
        if len(prompts) != len(x):
            raise ValueError(f"{len(x)} --variations images for {len(prompts)} prompts: give no "
                             "prompt (the embedding alone), one for every image, or one per image.")
        z = fam.embed_images(images.to_float(x))
        if r.sampler is None and r.eta is None:
            options = dataclasses.replace(options, eta=1.0)  # stochastic: variations
        kw["given"] = Given(z, {"source": "image", "rows": rows})
        return prompts, options, r.num_per_prompt
    pairs = r.interpolate
    flat, rows = unclip.load_images([p for pair in pairs for p in pair], shape, "--interpolate")
    z = fam.embed_images(images.to_float(flat)).reshape(len(pairs), 2, -1)
    t = np.linspace(0.0, 1.0, r.frames)
    frames = np.stack([unclip.slerp(a, b, t) for a, b in z])                 # [P, K, E]
    if len(prompts) == 1:
        prompts = prompts * len(pairs)
    if len(prompts) != len(pairs):
        raise ValueError(f"{len(pairs)} --interpolate rows for {len(prompts)} prompts: give no "
                         "prompt, one for every row, or one per row.")
    rec_rows = [{"a": rows[2 * i]["path"], "a_sha256": rows[2 * i]["sha256"],
                 "b": rows[2 * i + 1]["path"], "b_sha256": rows[2 * i + 1]["sha256"]}
                for i in range(len(pairs))]
    kw["given"] = Given(frames, {"source": "slerp", "rows": rec_rows}, per_image=True)
    kw["shared_noise"] = True
    return prompts, dataclasses.replace(options, sampler="ddim", eta=0.0), r.frames


def _guides(r: Request, trained) -> tuple:
    """The guides the flags ask for, each checked against the model: (guides, the CLIP or None)."""
    out, clip = [], None
    if r.classifier:
        c = guides_lib.load_guide_model(r.classifier, "--classifier", trained)
        scale = r.classifier_scale if r.classifier_scale is not None else \
            guides_lib.default_scale(c, "classifier")
        out.append(guides_lib.Guide("classifier", c, scale))
    if r.clip:
        clip = guides_lib.load_guide_model(r.clip, "--clip", trained,
                                           frozen_paths=r.frozen_paths)
        scale = r.clip_scale if r.clip_scale is not None else \
            guides_lib.default_scale(clip, "clip_text")
        out.append(guides_lib.Guide("clip_text", clip, scale))
        if r.guide_image:
            ref = guides_lib.load_reference(r.guide_image, trained)
            scale = r.image_scale if r.image_scale is not None else \
                guides_lib.default_scale(clip, "clip_image")
            out.append(guides_lib.Guide("clip_image", clip, scale, r.guide_image, ref))
    for g in out:
        log(f"guide {g.kind}: {g.trained.workdir} step {g.trained.step}, scale {g.scale:g}.")
    return out, clip


def _report_truncation(plan: Plan) -> None:
    """One line per prompt that stage 0's tokenizer cut (from the plan's one tokenization)."""
    toks, tokenizer = plan.prompt_tokens, plan.first.family.tokenizer
    if toks is None:
        return
    max_length = tokenizer.max_length
    unit = ("" if tokenizer.name != "byte" else f" ({max_length - 2} UTF-8 bytes)")
    for i in map(int, toks.truncated.nonzero()[0]):
        kept = tokenizer.decode(toks.ids[i:i + 1])[0]
        log(f"warning: prompt {i + 1} is longer than the model's {max_length} "
            f"{tokenizer.name if tokenizer.name != 'byte' else ''} tokens{unit}: it was "
            f"truncated to {kept!r}.".replace("  ", " "))
