"""`reproduce classifier`: Dhariwal & Nichol (2021), fig. 4 / table 4: an unconditional model
guided by a noisy classifier, eps~ = eps - sqrt(1 - abar_t) s grad log p(y | x_t), over the scale
s -> FD, alignment, precision, recall, and the trade-off plot. ADM's trade-off: alignment and
precision rise with s, recall (diversity) falls.

    python -m t2i_jax.evaluation.reproduce classifier --workdir runs/digits_uncond \
        --classifier runs/digits_classifier

Each scale is its own sampling job under OUT/samples/ (resumable); the jobs differ only in their
scale, an argument of the one compiled sampling program (results.json records how many programs
the sweep compiled).
"""

from __future__ import annotations

import os

from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

CLASSIFIER_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)

# its line in reproduce --help
SUMMARY = "Dhariwal & Nichol (2021): classifier guidance of an unconditional model over s"


def add_arguments(p) -> None:
    common.add_arguments(p, steps="sampling steps (config's sampler)")
    p.add_argument("--classifier", help="the noisy_classifier workdir that guides")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    common.require(p, a, "classifier", "classifier", "guide")


def reproduce_classifier(trained, classifier_dir: str, out: str, *, num_per_prompt: int,
                         seed: int, batch_size: int, steps: int, scales=CLASSIFIER_SCALES,
                         progress=True, scorer=None, cache_dir=None) -> dict:
    from t2i_jax.sampling import guides as guides_lib
    cfg = trained.config
    classifier = guides_lib.load_guide_model(classifier_dir, "--classifier", trained)
    prompts = list(classifier.family.conditioning.class_names)
    options = common.config_options(cfg, steps)
    scorer = scorer or Scorer(cfg, cache_dir or evaluator_cache(trained.workdir, out, cfg.data))
    table, programs = [], 0
    for s in scales:
        guides = [guides_lib.Guide("classifier", classifier, float(s))]
        x, rows, compiled = common.unguided_job(trained, out, f"scale_{s:g}", prompts,
                                                num_per_prompt=num_per_prompt, seed=seed,
                                                options=options, batch_size=batch_size,
                                                progress=progress, guides=guides)
        programs += compiled
        table.append(dict(scale=float(s), **scorer.score(x, [r["prompt"] for r in rows])))
    floor = scorer.real_floor(len(prompts) * num_per_prompt)
    default = guides_lib.default_scale(classifier, "classifier")
    results = dict(experiment="classifier", checkpoint_step=trained.step,
                   classifier=dict(workdir=classifier.workdir, step=classifier.step),
                   default_scale=default, sampler=options.sampler, steps=steps, seed=seed,
                   prompts=prompts, num_per_prompt=num_per_prompt,
                   evaluator_accuracy=scorer.ev.accuracy, compilations=programs, rows=table,
                   real_floor=floor)
    keys = ["fd", "alignment", "precision", "recall"]
    md = common.markdown_table(
        ["classifier scale"] + keys,
        [[f"{r['scale']:g}" + (" (default)" if r["scale"] == default else "")]
         + [r[k] for k in keys] for r in table]
        + [["real (train)"] + [floor.get(k) for k in keys]])
    md += (f"\nunconditional model {trained.workdir} step {trained.step}, classifier "
           f"{classifier.workdir} step {classifier.step}; {options.sampler} {steps} steps, "
           f"{num_per_prompt} images per class; the sweep compiled {programs} sampling program(s) "
           "(0: every job was already done).\n"
           f"real (train): {floor['repeats']} random subsets of n = {floor['n']} training images; "
           f"FD sd {common.fmt(floor['fd_sd'])}\n")
    common.write_results(out, results, md)
    common.plot_tradeoff(table, "scale", "classifier scale s", floor,
                         "ADM classifier guidance as s grows", os.path.join(out, "plot.png"))
    return results


def run(a) -> int:
    def reproduce(a):
        from t2i_jax.sampling.load import load_trained, require_generator
        reproduce_classifier(require_generator(load_trained(a.workdir)), a.classifier, a.out,
                             num_per_prompt=a.num_per_prompt, seed=a.seed,
                             batch_size=a.batch_size, steps=a.steps, progress=not a.no_progress)
    return common.run_locked(a, reproduce)
