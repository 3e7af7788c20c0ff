"""Reproductions of the papers' tables on a trained embedded-data model, one command each.

    python -m t2i_jax.evaluation.reproduce cfg --workdir runs/digits
    python -m t2i_jax.evaluation.reproduce ddim --workdir runs/digits
    python -m t2i_jax.evaluation.reproduce checkpoints --workdir runs/digits
    python -m t2i_jax.evaluation.reproduce classifier --workdir runs/digits_uncond \
        --classifier runs/digits_classifier
    python -m t2i_jax.evaluation.reproduce sdg --workdir runs/digits_uncond --clip runs/digits_clip
    python -m t2i_jax.evaluation.reproduce cascade --workdir runs/shapes16 --sr runs/shapes_sr64 \
        --sr_noaug runs/shapes_sr64_noaug
    python -m t2i_jax.evaluation.reproduce iddpm --workdir runs/digits_learned_sigma \
        --fixed runs/digits
    python -m t2i_jax.evaluation.reproduce inpaint --workdir runs/shapes_learned_sigma \
        --glide runs/shapes_inpaint
    python -m t2i_jax.evaluation.reproduce latent --workdir runs/shapes64_ldm \
        --f4_short runs/shapes64_ldm_f4_800 --f2 runs/shapes64_ldm_f2_800 \
        --noscale runs/shapes64_ldm_noscale_800 --base runs/shapes16 --sr runs/shapes_sr64
    python -m t2i_jax.evaluation.reproduce unclip --workdir runs/digits_decoder \
        --prior runs/digits_prior

One module per experiment (cfg.py, ddim.py, checkpoints.py, classifier.py, sdg.py, cascade.py,
latent.py, iddpm.py, inpaint.py, unclip.py): its flags (`add_arguments(p)`, checked by
`check_arguments(p, a)`), its computation and its `run(a)`; registry.EXPERIMENTS names them,
cli.main parses `EXPERIMENT --flag ...` with one subcommand each (a flag of another experiment is
refused) and runs it behind the error boundary. common.py holds what they share; the evaluator
and its Scorer are t2i_jax/evaluation/scorer.py. This file imports nothing, so importing any of
them never imports the others.

FD is the Fréchet distance of the evaluator classifier's 128-d penultimate features
(t2i_jax/evaluation/evaluator.py) between the generated images and the data set's held-out
real images; precision/recall (k = 3) use the same features. The row "real (train)" scores as
many real training digits (5 random subsets): a reference for what real data scores at this n,
not a bound (the evaluator was trained on those images, which shifts their features).

Everything goes to WORKDIR/reproduce/<name>/ (or --out): results.json (raw numbers), table.md,
plot.png, and the sampling jobs under samples/ (resumable: rerun the command after an
interruption). The evaluator is cached in WORKDIR/reproduce/, shared by the reproductions of a
workdir; where the workdir is read-only, in --out (decided before any sampling).
"""
