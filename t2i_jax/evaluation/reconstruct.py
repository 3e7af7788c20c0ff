"""How well an autoencoder reconstructs held-out images, and what its latents look like.

    python -m t2i_jax.evaluation.reconstruct --workdir runs/shapes64_ae

On the test split (every image, or the first --limit): each image x is encoded, and the mean of
q(z | x) decoded (the deterministic reconstruction; --sample decodes a posterior sample, as LDM's
reconstruction previews do). Reports
  psnr, ssim      per image on [0, 1] (evaluation/image_metrics.py: Wang et al.'s SSIM, 11x11
                  Gaussian window), averaged; both images quantised to 8 bits first, as saved
  rfd             the Fréchet distance between the evaluator classifier's features of the
                  reconstructions and of the originals (rFID's idea with this project's
                  evaluator, t2i_jax/evaluation/evaluator.py); and at half the n, the FD of
                  one half of the originals to the other half (the floor two real sets score)
                  beside that of one half to the other half's reconstructions
  latents         the checkpoint's scale factor and statistics (families/autoencoder.py), and
                  the test latents' std before and after scaling (after: ~1)
into OUT/reconstruct.json (default WORKDIR/reconstruct/), with OUT/grid.png: originals (odd
rows) above their reconstructions (even rows).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from t2i_jax import files
from t2i_jax.errors import ArgumentParser
from t2i_jax.evaluation.scorer import evaluator_cache

GRID_IMAGES = 32


def reconstruct(frozen, images: np.ndarray, *, sample: bool = False, seed: int = 0,
                batch: int = 256) -> np.ndarray:
    """uint8 reconstructions of float images [N, H, W, C] in [-1, 1]."""
    import jax
    import jax.numpy as jnp

    from t2i_jax.families.autoencoder import posterior_latents
    from t2i_jax.images import to_uint8
    fam, params = frozen.family, frozen.params
    key = jax.random.key(seed)

    @jax.jit
    def fn(p, x, ids):
        z, mean = posterior_latents(fam, p, x, key, ids)
        return jnp.clip(fam.decode(p, z if sample else mean), -1.0, 1.0)

    out = []
    for s in range(0, len(images), batch):
        x = jnp.asarray(images[s:s + batch])
        out.append(to_uint8(np.asarray(fn(params, x, jnp.arange(s, s + len(x))))))
    return np.concatenate(out)


def evaluate(frozen, out: str, *, limit=None, sample: bool = False, seed: int = 0,
             evaluator_dir=None) -> dict:
    import jax

    from t2i_jax import data as data_lib, images
    from t2i_jax.evaluation import evaluator as ev_lib, image_metrics
    from t2i_jax.evaluation.frechet import frechet_distance_of
    from t2i_jax.families import autoencoder as ae_lib
    fam = frozen.family
    cfg = fam.config
    splits = data_lib.get_spec(cfg.data.name).splits
    test = data_lib.load_split(cfg.data, splits[1], limit=limit)["image"]
    originals = images.to_uint8(test)
    # the 8-bit originals (what a PNG of the data holds) in, 8-bit reconstructions out
    recon = reconstruct(frozen, originals.astype(np.float32) / 127.5 - 1.0, sample=sample,
                        seed=seed)
    a, b = originals.astype(np.float64) / 255.0, recon.astype(np.float64) / 255.0
    psnr, ssim = image_metrics.psnr(a, b), image_metrics.ssim(a, b)
    ev = ev_lib.load_or_train(cfg.data, evaluator_dir or evaluator_cache(frozen.workdir, out,
                                                                         cfg.data))
    f_orig, f_rec = ev.features(originals), ev.features(recon)
    h = len(originals) // 2
    z, means = ae_lib.sample_latents(fam, frozen.params, test, jax.random.key(seed + 1))
    stats = frozen.statistics or {}
    scale = stats.get("scale_factor")
    res = dict(
        workdir=frozen.workdir, checkpoint_step=frozen.step, split=splits[1], n=int(len(test)),
        decoded="posterior sample" if sample else "posterior mean",
        factor=fam.ae_config.factor, latent_shape=list(fam.latent_shape),
        uint8_conversion=images.UINT8_CONVERSION,  # of the reconstructions scored below
        psnr=float(np.mean(psnr)), psnr_sd=float(np.std(psnr)), ssim=float(np.mean(ssim)),
        rfd=frechet_distance_of(f_orig, f_rec),
        # the floor at this n: two disjoint halves of the originals, and the same halves with
        # the second one reconstructed
        fd_halves=frechet_distance_of(f_orig[:h], f_orig[h:2 * h]),
        rfd_halves=frechet_distance_of(f_orig[:h], f_rec[h:2 * h]),
        l1=float(np.mean(np.abs(a - b))),
        latents=dict(stored=stats, test_std=float(z.std(ddof=1)),
                     test_mean=float(z.mean()), test_posterior_mean_std=float(means.std(ddof=1)),
                     test_scaled_std=None if scale is None else float((z * scale).std(ddof=1)),
                     test_channel_std=[float(v) for v in z.std(axis=(0, 1, 2), ddof=1)]),
        evaluator_accuracy=ev.accuracy)
    n = min(GRID_IMAGES, len(test))
    per_row = 8
    rows, labels = [], []
    for s in range(0, n, per_row):
        rows += [originals[s:s + per_row], recon[s:s + per_row]]
        labels += [f"test images {s}-{s + len(rows[-1]) - 1}", "their reconstructions"]
    grid = images.make_grid(np.concatenate(rows), rows=len(rows),
                            scale=max(1, 64 // originals.shape[1]), labels=labels)
    images.save_png(os.path.join(out, "grid.png"), grid)
    files.write_json(os.path.join(out, "reconstruct.json"), res)
    return res


def summary(res: dict) -> str:
    lat = res["latents"]
    stored = lat["stored"]
    scale = stored.get("scale_factor")
    return (f"{res['workdir']} (checkpoint {res['checkpoint_step']}, f={res['factor']}, latents "
            f"{res['latent_shape']}), {res['n']} {res['split']} images, {res['decoded']} decoded:\n"
            f"  PSNR {res['psnr']:.2f} dB (sd {res['psnr_sd']:.2f})  SSIM {res['ssim']:.4f}  "
            f"L1 {res['l1']:.4f}\n"
            f"  rFD {res['rfd']:.3f}; between halves: originals vs originals {res['fd_halves']:.3f}, "
            f"originals vs reconstructions {res['rfd_halves']:.3f}\n"
            + (f"  scale factor {scale:.5g} (1 / std of {stored.get('num_images')} sampled training "
               f"latents {stored.get('latent_std'):.4g}); test latents std {lat['test_std']:.4g}, "
               f"scaled {lat['test_scaled_std']:.4g}; posterior means std "
               f"{lat['test_posterior_mean_std']:.4g}"
               if scale is not None else "  no scale factor stored (training did not finish)"))


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m t2i_jax.evaluation.reconstruct",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="an autoencoder's training workdir")
    p.add_argument("--out", help="default: WORKDIR/reconstruct")
    p.add_argument("--limit", type=int, help="the first N test images (default: all)")
    p.add_argument("--sample", action="store_true",
                   help="decode a posterior sample instead of the posterior mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluator_dir", help="where the evaluator classifier is cached (default: "
                                           "WORKDIR/reproduce)")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}.")
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from t2i_jax.families.frozen import load_frozen
    try:
        frozen = load_frozen(a.workdir, "autoencoder", flag="--workdir")
    except ValueError as e:
        p.error(str(e))
    out = a.out or os.path.join(frozen.workdir, "reconstruct")
    try:
        out = files.check_writable_dir(out, "--out")
    except ValueError as e:
        p.error(str(e))
    res = evaluate(frozen, out, limit=a.limit, sample=a.sample, seed=a.seed,
                   evaluator_dir=a.evaluator_dir)
    print(summary(res))
    print(f"[t2i_jax] wrote {out}/reconstruct.json and {out}/grid.png (originals above their "
          "reconstructions)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
