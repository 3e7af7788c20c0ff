"""Bit-identity and compatibility check for changes to sampling (sample.py, t2i_jax/sampling/).

Not a pytest test: a standalone script in two steps, each run with one checkout's code (REPO; its
train.py / sample.py run as subprocesses with cwd=REPO and PYTHONPATH=REPO).

    python tests/compat_check.py make  --repo /path/to/old/checkout --out DIR
    python tests/compat_check.py check --repo /path/to/new/checkout --out DIR

make: prepares the digits data in DIR/data, trains the tiny families of REPO/tests/tiny_families.py
(40 steps each, as tests/conftest.py's fixtures: diffusion, base8 + super_resolution, contrastive
+ prior + decoder, noisy_classifier) into DIR/work, runs a fixed set of sample.py jobs (a guidance
sweep, a cascade, unCLIP prior -> decoder and variations, classifier and CLIP guides with a guide
image and reranking, RePaint inpainting) into DIR/old/JOB, and writes DIR/manifest.json: each job's
arguments and the sha256 of every PNG, .npy, samples.jsonl and job.json under its outdir.

check, with REPO's (new) code on make's (old) workdirs:
  (a) resume: a copy of each old outdir loses the last shard file of every stage, samples.jsonl,
      grid.png and stats.json; the same command must accept the old job.json, finish, and give
      the same files (the row shows how many images the resume regenerated);
  (b) fresh: each job rerun into DIR/new/JOB; every hashed file must match the manifest;
  (c) train: a copy of each old workdir trains 2 more steps with REPO/train.py (old checkpoints
      must restore: exit 0 and a "resumed from .../40" line).
It prints a table job / files / identical / differing and exits 1 on any failure or difference.
Both steps use XLA_FLAGS="--xla_force_host_platform_device_count=8
--xla_backend_optimization_level=0" as the test suite does, and a compilation cache in DIR.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

STEPS = 40
# (name, family): trained in this order (prior and decoder read the CLIP via $T2I_TEST_CLIP).
FAMILIES = [("diffusion", "diffusion"), ("base8", "base8"), ("sr", "super_resolution"),
            ("clip", "contrastive"), ("prior", "prior"), ("decoder", "decoder"),
            ("classifier", "noisy_classifier")]
HASHED = re.compile(r"(\.png|\.npy|/samples\.jsonl|/job\.json)$")


def jobs(d):
    """{job: sample.py arguments without --outdir}; d: the DIR layout (work, inputs)."""
    w, digit = (lambda n: os.path.join(d, "work", n)), os.path.join(d, "inputs", "digit.png")
    common = ["--seed", "0", "--shard_size", "2", "--no_progress"]
    return {
        "guidance_sweep": ["--workdir", w("diffusion"), "--prompt", "seven", "--prompt", "3",
                           "--guidance", "0", "2", "--sampler", "ddim", "--steps", "10",
                           "--num_per_prompt", "2"] + common,
        "cascade": ["--workdir", w("base8"), "--sr", w("sr"), "--prompt", "seven",
                    "--prompt", "2", "--steps", "4", "--sr_steps", "4",
                    "--num_per_prompt", "2"] + common,
        "unclip_prior": ["--workdir", w("decoder"), "--prior", w("prior"), "--prompt", "seven",
                         "--prompt", "1", "--steps", "4", "--prior_steps", "4",
                         "--num_per_prompt", "2"] + common,
        "unclip_variations": ["--workdir", w("decoder"), "--variations", digit, "--steps", "4",
                              "--num_per_prompt", "3"] + common,
        "classifier_guide": ["--workdir", w("diffusion"), "--classifier", w("classifier"),
                             "--prompt", "3", "--prompt", "7", "--steps", "4",
                             "--num_per_prompt", "2"] + common,
        "clip_guide_rerank": ["--workdir", w("diffusion"), "--clip", w("clip"), "--prompt", "seven",
                              "--guide_image", digit, "--rerank", "2", "--steps", "4",
                              "--num_per_prompt", "3"] + common,
        "inpaint_repaint": ["--workdir", w("diffusion"), "--inpaint", digit,
                            "--mask_box", "8,0,16,16", "--prompt", "seven", "--sampler", "ddpm",
                            "--steps", "4", "--repaint_jumps", "1", "--repaint_jump_length", "2",
                            "--num_per_prompt", "3"] + common,
    }


def env_for(repo, d):
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    return dict(os.environ, PYTHONPATH=repo, XLA_FLAGS=flags,
                JAX_COMPILATION_CACHE_DIR=os.path.join(d, "xla_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                T2I_JAX_CACHE=os.path.join(d, "cache"), TFDS_DATA_DIR=os.path.join(d, "data"),
                T2I_TEST_CLIP=os.path.join(d, "work", "clip"))


def call(repo, d, script, args, what):
    """Runs REPO/script with args (cwd=REPO); prints its stderr and raises if it fails."""
    t = time.time()
    done = subprocess.run([sys.executable, os.path.join(repo, script)] + args, cwd=repo,
                          env=env_for(repo, d), capture_output=True, text=True)
    print(f"  {what}: exit {done.returncode} ({time.time() - t:.0f} s)", flush=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise subprocess.CalledProcessError(done.returncode, done.args)
    return done


def train_args(repo, d, family, workdir, steps):
    cfg = os.path.join(d, "configs", f"{family}.py")
    os.makedirs(os.path.dirname(cfg), exist_ok=True)
    with open(cfg, "w") as f:  # the family of REPO/tests/tiny_families.py as a config file
        f.write(f"import sys\nsys.path.insert(0, {os.path.join(repo, 'tests')!r})\n"
                f"import tiny_families\n\n\ndef get_config():\n"
                f"    return tiny_families.get_config({family!r})\n")
    return [f"--config={cfg}", f"--workdir={workdir}", f"--config.data.data_dir={d}/data",
            f"--config.train.num_steps={steps}", f"--config.train.checkpoint_every={STEPS}",
            "--progress=false"]


def write_inputs(d):
    """inputs/digit.png: a fixed 16x16 grey '7' (no project code involved)."""
    import numpy as np
    from PIL import Image
    x = np.zeros((16, 16), np.uint8)
    x[3:5, 3:13] = 255
    for r in range(5, 14):
        x[r, 12 - (r - 5) // 2 - 1:12 - (r - 5) // 2 + 1] = 255
    os.makedirs(os.path.join(d, "inputs"), exist_ok=True)
    Image.fromarray(x, "L").save(os.path.join(d, "inputs", "digit.png"))


def hashes(outdir):
    out = {}
    for root, _, names in os.walk(outdir):
        for n in names:
            p = os.path.join(root, n)
            if HASHED.search("/" + os.path.relpath(p, outdir)):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, outdir)] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(out.items()))


def make(repo, d):
    if os.path.exists(os.path.join(d, "manifest.json")):
        sys.exit(f"{d}/manifest.json exists: use another --out, or delete it")
    write_inputs(d)
    print(f"training {len(FAMILIES)} tiny workdirs ({STEPS} steps) with {repo}", flush=True)
    for name, family in FAMILIES:
        wd = os.path.join(d, "work", name)
        call(repo, d, "train.py", train_args(repo, d, family, wd, STEPS), f"train {name}")
    manifest = {"repo": repo, "commit": subprocess.run(
        ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "jobs": {}}
    print("sampling", flush=True)
    for job, args in jobs(d).items():
        outdir = os.path.join(d, "old", job)
        call(repo, d, "sample.py", args + ["--outdir", outdir], job)
        manifest["jobs"][job] = {"args": args, "files": hashes(outdir)}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {d}/manifest.json ({sum(len(j['files']) for j in manifest['jobs'].values())} "
          "hashed files)")


def compare(want, have):
    """(identical count, names differing or missing on either side)."""
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    return sum(1 for k in want if have.get(k) == want[k]), diff


def check(repo, d):
    with open(os.path.join(d, "manifest.json")) as f:
        manifest = json.load(f)
    print(f"checking {repo} against {d}/manifest.json (made with {manifest['repo']} "
          f"@ {manifest['commit'][:10]})", flush=True)
    for sub in ("resumed", "new", "train"):
        shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
    rows, failed = [], False
    for job, entry in manifest["jobs"].items():
        want = entry["files"]
        # (a) resume a copy of the old outdir missing its last shards, samples.jsonl, grid.png
        res = os.path.join(d, "resumed", job)
        shutil.copytree(os.path.join(d, "old", job), res)
        for root, dirs, names in os.walk(res):
            if os.path.basename(root) == "shards" and names:
                os.remove(os.path.join(root, max(names)))
        for n in ("samples.jsonl", "grid.png", "stats.json"):
            if os.path.exists(os.path.join(res, n)):
                os.remove(os.path.join(res, n))
        for kind, outdir in (("resume", res), ("fresh", os.path.join(d, "new", job))):
            try:
                call(repo, d, "sample.py", entry["args"] + ["--outdir", outdir], f"{kind} {job}")
                same, diff = compare(want, hashes(outdir))
            except subprocess.CalledProcessError as e:
                same, diff = 0, [f"FAILED (exit {e.returncode})"]
            failed |= bool(diff)
            label = f"{job} ({kind}"
            if kind == "resume" and os.path.exists(os.path.join(res, "stats.json")):
                with open(os.path.join(res, "stats.json")) as f:  # shows the resume was partial
                    label += f": regenerated {json.load(f).get('generated', '?')} images"
            rows.append((label + ")", len(want), same, diff))
    # (c) old checkpoints restore: 2 more training steps on a copy of each workdir
    train_rows = []
    for name, family in FAMILIES:
        wd = os.path.join(d, "train", name)
        shutil.copytree(os.path.join(d, "work", name), wd)
        try:
            done = call(repo, d, "train.py", train_args(repo, d, family, wd, STEPS + 2),
                        f"train {name} +2")
            line = next((l for l in done.stderr.splitlines() if "resumed from" in l), None)
            ok = line is not None and line.rstrip().endswith(f"/{STEPS}")
            train_rows.append((name, "ok: " + line.strip() if ok else
                               f"NO 'resumed from .../{STEPS}' line"))
        except subprocess.CalledProcessError as e:
            ok = False
            train_rows.append((name, f"FAILED (exit {e.returncode})"))
        failed |= not ok
    width = max(len(r[0]) for r in rows)
    print(f"\n{'job':<{width}}  files  identical  differing")
    for job, n, same, diff in rows:
        print(f"{job:<{width}}  {n:>5}  {same:>9}  {', '.join(diff) if diff else '-'}")
    print("\ntraining resumed from the old checkpoints:")
    for name, msg in train_rows:
        print(f"  {name:<11} {msg}")
    print("\nFAIL: differences or failures above" if failed else
          "\nOK: all jobs resumed and reran bit-identical; every old workdir resumed training")
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["make", "check"])
    p.add_argument("--repo", required=True, help="the checkout whose code runs")
    p.add_argument("--out", required=True, help="the directory of workdirs, outputs, manifest")
    a = p.parse_args()
    repo, d = os.path.abspath(a.repo), os.path.abspath(a.out)
    os.makedirs(d, exist_ok=True)
    t = time.time()
    code = make(repo, d) if a.mode == "make" else check(repo, d)
    print(f"{a.mode}: {time.time() - t:.0f} s")
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
