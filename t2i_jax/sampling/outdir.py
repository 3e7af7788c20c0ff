"""The output directory of a sampling job: what is written where, and when it counts as done.

  job.json            what the job is (sampling/spec.py's JobSpec); a rerun with a different
                      job in the same directory is refused.
  images/IIIIII.png   one PNG per image (written atomically).
  shards/SSSSS.jsonl  the records of shard S (images [S * shard_size, (S + 1) * shard_size)),
                      written atomically AFTER its PNGs: a shard file means the shard is done.
  samples.jsonl       every record, in index order, written when all shards are done: its
                      presence means the job is complete.
  grid.png            rows = (w, prompt) pairs in index order (at most 64), the first
                      grid_columns images each.
  stats.json          speed of the last run that generated images (images/s, compilations).
  samples.npz         (optional) arr_0 uint8 [N, H, W, 3] and arr_1 int64 prompt indices, the
                      layout of ADM's reference batches (grey images repeated to RGB).
  stages/K/           stage K's outputs before the last stage's, in the same layout (a stage
                      that writes CLIP embeddings has embeddings/IIIIII.npy instead of PNGs).
  .lock               held by the one process that writes the job.

A killed job leaves finished shards and at most one unfinished shard (some PNGs, no shard file);
the rerun redoes that shard (same pixels: the images are deterministic) and goes on. Temporary
files are named .tmp-* and are never read as results; the rerun removes them under the lock.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from t2i_jax import files, images

JOB_FILE, SAMPLES_FILE, GRID_FILE, NPZ_FILE = "job.json", "samples.jsonl", "grid.png", "samples.npz"
STATS_FILE = "stats.json"  # speed of the last run that generated images
MAX_GRID_ROWS = 64
EXTRA_KEYS = ("rerank_score", "rerank_candidate", "prior_candidate", "prior_score")  # computed


class JobMismatchError(ValueError):
    pass


def image_file(index: int) -> str:
    return f"images/{index:06d}.png"


def embedding_file(index: int) -> str:
    """A prior stage's output: the embedding [E] of image `index`, float32 .npy."""
    return f"embeddings/{index:06d}.npy"


def output_file(kind: str, index: int) -> str:
    """The file of image `index` of a stage that writes `kind` ("image" or "embedding")."""
    return image_file(index) if kind == "image" else embedding_file(index)


def shard_file(shard: int) -> str:
    return f"shards/{shard:05d}.jsonl"


def stage_dir(k: int, num_stages: int) -> str:
    """Stage k's directory relative to OUTDIR: "." for the last stage, stages/k before it."""
    return "." if k == num_stages - 1 else f"stages/{k}"


def check_job_file(want: dict, outdir: str) -> None:
    """Writes job.json (`want`: JobSpec.to_json()), or checks that the one there is the same job."""
    path = os.path.join(outdir, JOB_FILE)
    if os.path.exists(path):
        try:
            have = files.read_json(path)
        except (ValueError, OSError) as e:  # ValueError: files.read_json names the file
            reason = str(e).rstrip(".") if isinstance(e, ValueError) else f"{path} is unreadable ({e})"
            raise JobMismatchError(f"{reason}; delete {outdir} to start afresh, or use another "
                                   "--outdir.") from None
        diffs = [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(have) | set(want))
                 if have.get(k) != want.get(k)]
        if diffs:
            hint = (f"\nTo finish that job, rerun its command with --step {have['checkpoint_step']}."
                    if have.get("checkpoint_step") != want["checkpoint_step"] else "")
            raise JobMismatchError(
                f"{outdir} holds another sampling job; it differs in:\n  " + "\n  ".join(diffs)
                + hint + "\nUse another --outdir, or delete this one to start afresh.")
    else:
        files.write_json(path, want)


def intact(path: str, kind: str, shape: Sequence[int]) -> bool:
    """Whether output file `path` reads back whole as a `kind` output of `shape` (H, W, C) or
    (E,): a damaged, truncated or foreign file is not a finished output."""
    try:
        if kind == "image":
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                x = np.asarray(im)
            return tuple(x.shape if x.ndim == 3 else x.shape + (1,)) == tuple(shape) \
                and x.dtype == np.uint8
        x = np.load(path)
        return tuple(x.shape) == tuple(shape) and bool(np.isfinite(x).all())
    except Exception:  # noqa: BLE001  (any failure to read it back means: make it again)
        return False


def _shard_of(name: str) -> Optional[int]:
    """The shard number of a shard file's name (shard_file), or None for any other file."""
    stem, ext = os.path.splitext(name)
    if ext == ".jsonl" and stem.isdigit():
        s = int(stem)
        return s if name == os.path.basename(shard_file(s)) else None
    return None


def finished_shards(spec, outdir: str, record_fn=None, verify=None, damaged=None) -> set:
    """Shards whose record file holds exactly this job's records (record_fn(i): a stage's, the
    final records by default) and whose files all exist (and pass verify(path), when given:
    the paths that do not are added to the list `damaged`, and their shards are not done)."""
    record_fn = record_fn or spec.record
    done = set()
    try:  # the shard files there are (not every shard's name: a job of any size is cheap)
        names = os.listdir(os.path.join(outdir, os.path.dirname(shard_file(0))))
    except OSError:
        names = []
    present = sorted(s for s in (_shard_of(n) for n in names) if s is not None
                     and s < spec.num_shards)
    for s in present:
        path = os.path.join(outdir, shard_file(s))
        try:
            rows = files.read_jsonl(path)
        except (ValueError, OSError):
            continue  # unreadable: redo it
        want = [record_fn(i) for i in range(*spec.shard_bounds(s))]
        stripped = [{k: v for k, v in r.items() if k not in EXTRA_KEYS} for r in rows]
        paths = [os.path.join(outdir, r["file"]) for r in rows]
        if stripped != want or not all(os.path.exists(p) for p in paths):
            continue
        bad = [p for p in paths if verify is not None and not verify(p)]
        if bad:
            if damaged is not None:
                damaged.extend(bad)
            continue
        done.add(s)
    return done


def prepare_stage_dir(directory: str, kind: str) -> None:
    """The stage's subdirectories, and no leftover temporaries (only under the lock)."""
    for sub in ("images" if kind == "image" else "embeddings", "shards"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    remove_temporaries(directory)


def save_output(directory: str, kind: str, index: int, x: np.ndarray) -> None:
    """Writes image `index` (uint8 [H, W, C]) or embedding (float32 [E]) atomically."""
    path = os.path.join(directory, output_file(kind, index))
    if kind == "image":
        images.save_png(path, x)
    else:
        with files.atomic_open(path, "wb") as f:
            np.save(f, np.asarray(x, np.float32))


def read_outputs(directory: str, kind: str, index: np.ndarray) -> np.ndarray:
    """A stage's outputs of images `index`: uint8 [N, h, w, C] PNGs or float32 [N, E] .npy."""
    paths = [os.path.join(directory, output_file(kind, int(i))) for i in index]
    if kind == "image":
        return np.stack([images.load_png(p) for p in paths])
    return np.stack([np.load(p) for p in paths])


class OutdirLock(files.ExclusiveLock):
    """An exclusive lock on OUTDIR/.lock for the job's lifetime: two processes never write (or
    clean up after) the same job at once."""

    def __init__(self, outdir: str, enabled: bool = True):
        super().__init__(outdir, "writing a sampling job", "wait for it, or use another --outdir",
                         enabled=enabled)

    def __enter__(self):
        if self.enabled:
            files.check_output_dir(self.directory, "--outdir")
            for sub in ("images", "shards"):
                os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        return super().__enter__()


def remove_temporaries(outdir: str) -> None:
    """Deletes the .tmp-* files that writes interrupted by a kill left (only under the lock)."""
    for sub in ("images", "embeddings", "shards", "."):
        d = os.path.join(outdir, sub)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if name.startswith(".tmp-") and os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)


def is_complete(outdir: str) -> bool:
    return os.path.exists(os.path.join(outdir, SAMPLES_FILE))


def row_label(spec, record: dict) -> str:
    """A grid row's label: its prompt (the null condition shown as such), and its guidance
    weight where the job sweeps several."""
    prompt = record.get("prompt", "")
    text = f'"{prompt}"' if prompt else "(no prompt)"
    if len(spec.guidance) > 1:
        text = f"w={record.get('guidance')} {text}"
    return text


def assemble(spec, outdir: str, *, npz: bool = False, grid_columns: int = 16,
             scale: int = 1) -> None:
    """samples.jsonl, grid.png and (optionally) samples.npz from the finished shards."""
    rows = []
    for s in range(spec.num_shards):
        rows.extend(files.read_jsonl(os.path.join(outdir, shard_file(s))))
    assert [r["index"] for r in rows] == list(range(spec.num_images)), "shards out of order"
    cols = min(spec.num_per_prompt, grid_columns)
    picked = [r for r in rows if r["sample"] < cols][:MAX_GRID_ROWS * cols]
    grid = images.make_grid(np.stack([images.load_png(os.path.join(outdir, r["file"]))
                                      for r in picked]), rows=len(picked) // cols, scale=scale,
                            labels=[row_label(spec, r) for r in picked[::cols]])
    images.save_png(os.path.join(outdir, GRID_FILE), grid)
    if npz:
        x = np.stack([images.load_png(os.path.join(outdir, r["file"])) for r in rows])
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        labels = np.asarray([r["prompt_index"] for r in rows], np.int64)
        with files.atomic_open(os.path.join(outdir, NPZ_FILE), "wb") as f:
            np.savez(f, arr_0=x, arr_1=labels)
    files.write_jsonl(os.path.join(outdir, SAMPLES_FILE), rows)  # last: the job is complete


def load_images(outdir: str, rows: Optional[list] = None) -> tuple[np.ndarray, list]:
    """(uint8 [N, H, W, C], records) of a complete job, in index order."""
    if not is_complete(outdir):
        raise FileNotFoundError(f"{outdir} holds no complete sampling job ({SAMPLES_FILE} is "
                                "missing); rerun the sampling command to finish it.")
    rows = rows if rows is not None else files.read_jsonl(os.path.join(outdir, SAMPLES_FILE))
    return np.stack([images.load_png(os.path.join(outdir, r["file"])) for r in rows]), rows
