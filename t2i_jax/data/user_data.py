"""Your own images (data.name "imagefolder" or "webdataset", read from data.path: see
user_sources.py), prepared once into TFDS array_record files that the grain pipeline reads like
every other data set (no TensorFlow).

    python -m t2i_jax.data.prepare --config configs/X.py --config.data.path=DIR --workers 8
    p = prepare(config.data)            # what training does on first use (once, then reused)
    open_split(config.data, "train")    # len, [i] -> {"image" uint8 [S, S, C], "caption", "key"}

The prepared set. A TFDS builder `t2i_<kind>_<hash16>` in data.data_dir (builders.default_data_dir)
with features image (PNG, S x S x C), caption (text), key (text), splits "train" and "test" (a split
with no record is left out: reading it gives an empty source). hash16 starts the sha256 of the
source's listing (each file's name relative to the source's folder, size and mtime) and of every
preprocessing option (kind, image_size, channels, caption_key, min_image_size, test_fraction,
user_staging.RESIZE, FORMAT_VERSION): a changed, added or removed file, or another option, is
prepared anew under a new name; an unchanged source is reused without reading it. (Copies of a
source on several hosts must keep their mtimes, rsync -a or cp -p, to share a name.) Record order
is the units' order (imagefolder: by key; webdataset: shard by shard, as in the tar), a
deterministic function of the source. A record is held out ("test") when sha256(key), read as a
fraction in [0, 1), is below data.test_fraction: stable under any change to the other records.
The first record of a key is kept; a later one is a `duplicate_key`.

Bad records (user_sources.BAD_KINDS: undecodable_image, missing_caption, too_small (shorter side
< data.min_image_size, default data.image_size: nothing is upscaled), image_without_caption,
caption_without_image, duplicate_key) are skipped and counted; the summary (counts and the first
keys of each kind, records/s, bytes read and written) is printed and stored as
`t2i_prepare_summary.json` beside the TFDS files. More than data.max_bad_fraction of the records
bad: refused with one line (UsageError, exit 2) and nothing is left in data_dir (the fraction gates
a preparation; it is not part of the hash, so a prepared set is reused whatever it is later).

Work. The source is cut into units (user_sources: a shard, or IMAGEFOLDER_CHUNK images). A unit is
decoded, resized and PNG-encoded (user_staging) into `DATA_DIR/<name>.staging/part-UUUUU.{bin,json}`
(the JSON, renamed into place last, says the part is complete, so a preparation killed half-way
resumes from the parts it finished). Then one process (the lead) checks the summary, lists the source again (a
source that changed meanwhile is refused), and writes the TFDS files
from the parts, in unit order, through the builder (builders.prepared_builder: an fcntl lock
`DATA_DIR/<name>.lock`, leftovers of an interrupted write removed). `workers` > 1 decodes units in
a local pool of spawned processes. The command's --process_index p --process_count P splits the
units between P processes (unit u is process u % P's): each stages its parts, process 0 waits
until every part exists, then writes.

Multi-host. The result is a deterministic function of the source, so: on a file system every host
shares (data_dir on NFS, GCS FUSE, Lustre), the first process to take the lock prepares and the
others wait on the lock and reuse its files (training does this on first use; for a large source,
run the command once beforehand, with --process_index/--process_count to spread it over hosts);
with host-local disks, every host prepares its own identical copy (run the command on each host,
or let training prepare on first use), and --process_count > 1 is not possible (the lead could not
see the others' parts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
from typing import Optional

import numpy as np

from t2i_jax.data.user_sources import IMAGEFOLDER_CHUNK, Listing, Options, list_source
from t2i_jax.data.user_staging import (RESIZE, SPLITS, Plan, check, progress_bar, split_of,
                                       stage, staged_units, summarize)
from t2i_jax.errors import UsageError

__all__ = ["prepare", "open_split", "sample_prompts", "fingerprint", "builder_name", "split_of",
           "describe", "Prepared", "UserSource", "SPLITS", "SUMMARY_FILE"]

FORMAT_VERSION = 1
SUMMARY_FILE = "t2i_prepare_summary.json"
NUM_PROMPTS = 8           # sample_prompts: held-out captions for progress grids
WAIT_S = 1800             # the lead's patience for other processes' parts (without progress)


def fingerprint(listing: Listing, opts: Options) -> str:
    """sha256 (hex) of the source listing and every option that changes the prepared records."""
    h = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION, "kind": opts.kind, "image_size": opts.image_size,
        "channels": opts.channels, "caption_key": opts.caption_key,
        "min_image_size": opts.min_image_size, "test_fraction": opts.test_fraction,
        "resize": RESIZE}, sort_keys=True).encode())
    for name, size, mtime_ns in listing.files:
        h.update(f"{name}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def builder_name(kind: str, digest: str) -> str:
    return f"t2i_{kind}_{digest[:16]}"


@dataclasses.dataclass(frozen=True)
class Prepared:
    name: str             # the TFDS name, t2i_<kind>_<hash16>
    fingerprint: str      # the full sha256
    data_dir: str
    builder: object       # the prepared tfds builder
    summary: Optional[dict]


def builder_class(name: str, opts: Options, plan: Optional[Plan] = None):
    """The TFDS builder class of the prepared set `name` (writing needs `plan`)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered

    tfds_name, s, c = name, opts.image_size, opts.channels
    with registered.skip_registration():  # one class per source and options, made on demand
        class T2iUserImages(tfds.core.GeneratorBasedBuilder):
            """Captioned images from an imagefolder or webdataset, prepared by t2i_jax."""
            name = tfds_name
            VERSION = tfds.core.Version("1.0.0")
            RELEASE_NOTES = {"1.0.0": f"format {FORMAT_VERSION}: {RESIZE}"}
            code_path = None  # see prepare.py

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    description=f"{opts.kind} {opts.path} at {s}x{s}x{c} (t2i_jax.data.user_data)",
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(s, s, c), encoding_format="png"),
                        "caption": tfds.features.Text(),
                        "key": tfds.features.Text(),
                    }),
                    disable_shuffling=True,  # record order: the parts' (see module doc)
                )

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in plan.splits}

            def _generate_examples(self, split):
                yield from plan.examples(split)

    return T2iUserImages


def _write(name: str, data_dir: str, plan: Plan) -> None:
    import contextlib
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils
    builder = builder_class(name, plan.opts, plan)(data_dir=data_dir, file_format="array_record")
    shown = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS's "Downloading and preparing"
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        tfds.display_progress_bar(shown)


# ---------------------------------------------------------------------------------------------
# Preparing and reading


def prepare(data_config, *, workers: int = 1, process_index: int = 0, process_count: int = 1,
            progress: Optional[bool] = None, chunk: int = IMAGEFOLDER_CHUNK) -> Optional[Prepared]:
    """The prepared set of data_config's user source, prepared first if it is not (see the module
    doc for workers and processes). Returns None in a process other than 0 of several (it staged
    its parts; process 0 writes). progress None: a bar where stderr is a terminal."""
    from t2i_jax.data import builders as prepare_lib
    opts = Options.of(data_config)
    prepare_lib.quiet_tfds_logs()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UsageError(f"--process_index {process_index} is not in [0, --process_count "
                         f"{process_count}).")
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    t_start = time.time()
    listing = list_source(opts, chunk)
    digest = fingerprint(listing, opts)
    name = builder_name(opts.kind, digest)
    data_dir = prepare_lib.default_data_dir(opts.data_dir)
    read_cls = builder_class(name, opts)
    if read_cls(data_dir=data_dir, file_format="array_record").is_prepared():
        return _prepared(name, digest, data_dir, read_cls)
    staging = os.path.join(data_dir, f"{name}.staging")
    existed = os.path.isdir(data_dir)
    what = (f"{len(listing.units)} shard(s)" if opts.kind == "webdataset" else
            f"{listing.num_records} records") + f", {listing.nbytes / 1e6:.1f} MB"
    if process_count > 1:
        mine = listing.units[process_index::process_count]
        print(f"[t2i_jax] process {process_index}/{process_count}: staging {len(mine)} of "
              f"{len(listing.units)} units of {opts.path} for {name}", flush=True)
        done = stage(listing, opts, staging, mine, workers=workers, progress=progress)
        if process_index != 0:
            print(f"[t2i_jax] process {process_index}: {_speed(done)}; process 0 writes {name} "
                  "once every part is staged", flush=True)
            return None
        _wait_for_parts(staging, len(listing.units), process_count, name)

    def make(_builder):  # under the lock; the set is not prepared
        print(f"[t2i_jax] preparing {name} from {opts.kind} {opts.path} ({what}) in {data_dir} "
              f"(once; {max(1, workers)} worker(s))", flush=True)
        done = stage(listing, opts, staging, listing.units, workers=workers, progress=progress)
        summary, drop = summarize(staging, len(listing.units), opts)
        try:
            if fingerprint(list_source(opts, chunk), opts) != digest:
                raise UsageError(f"data.path={opts.path} changed while it was being prepared; "
                                 "rerun once it is complete.")
            check(summary, opts)
        except UsageError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        splits = [s for s in SPLITS if summary["splits"][s]]
        t0 = time.time()
        bar = progress_bar(progress, summary["kept"], "writing")
        _write(name, data_dir, Plan(staging, len(listing.units), drop, opts, splits, bar))
        if bar is not None:
            bar.close()
        version_dir = os.path.join(data_dir, name, str(read_cls.VERSION))
        written = sum(os.path.getsize(os.path.join(version_dir, f))
                      for f in os.listdir(version_dir))
        summary.update(name=name, fingerprint=digest, staged=done, bytes_read=listing.nbytes,
                       seconds=time.time() - t_start, write_seconds=time.time() - t0,
                       bytes_written=written)
        _write_json(os.path.join(version_dir, SUMMARY_FILE), summary)
        shutil.rmtree(staging, ignore_errors=True)
        print(describe(summary), flush=True)

    try:
        prepare_lib.prepared_builder(read_cls, data_dir, make=make)
    except UsageError:  # refused: leave nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        _remove(os.path.join(data_dir, f"{name}.lock"))
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        raise
    return _prepared(name, digest, data_dir, read_cls)


def _prepared(name, digest, data_dir, cls) -> Prepared:
    builder = cls(data_dir=data_dir, file_format="array_record")
    path = os.path.join(data_dir, name, str(cls.VERSION), SUMMARY_FILE)
    summary = None
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    return Prepared(name, digest, data_dir, builder, summary)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=list)
    os.replace(path + ".tmp", path)


def _speed(done: dict) -> str:
    sec = max(done["seconds"], 1e-9)
    return (f"{done['records']} records in {done['seconds']:.1f} s ({done['records'] / sec:.0f} "
            f"records/s, {done['bytes_read'] / 1e6 / sec:.1f} MB/s read)")


def describe(summary: dict) -> str:
    """The summary as printed: what was kept, what was skipped (kind, count, first keys), speed."""
    s = summary["splits"]
    skipped = "; ".join(f"{v['count']} {k} (e.g. {', '.join(map(str, v['keys'][:3]))})"
                        for k, v in summary["skipped"].items()) or "none"
    speed = _speed({k: summary[k] for k in ("records", "seconds", "bytes_read")})
    return (f"[t2i_jax] prepared {summary['name']}: {s['train']} train + {s['test']} test records "
            f"of {summary['records']}; skipped {summary['bad']}: {skipped}; {speed}; "
            f"{summary['bytes_written'] / 1e6:.2f} MB written")


def _wait_for_parts(staging: str, num_units: int, process_count: int, name: str) -> None:
    last, since = -1, time.time()
    while True:
        have = staged_units(staging, num_units)
        if have == num_units:
            return
        if have != last:
            print(f"[t2i_jax] process 0: {have} of {num_units} parts of {name} staged; waiting "
                  "for the other processes", flush=True)
            last, since = have, time.time()
        if time.time() - since > WAIT_S:
            raise UsageError(
                f"process 0 waited {WAIT_S // 60} min for the parts of {name} that the other "
                f"processes stage ({have} of {num_units} exist in {staging}): run every process "
                f"(--process_index 0..{process_count - 1} --process_count {process_count}) on one "
                "shared file system, or run one with --process_count 1.")
        time.sleep(1.0)


class UserSource:
    """A prepared split: len, [i] -> {"image" uint8 [S, S, C], "caption" bytes, "key" bytes}.
    `state_meta` names the prepared set, so a data iterator's state is tied to it."""

    def __init__(self, records, prepared: Prepared):
        self._records, self.prepared = records, prepared

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]

    @property
    def state_meta(self) -> dict:
        return {"data_hash": self.prepared.fingerprint[:16]}


def open_split(data_config, split: str) -> UserSource:
    """A random-access source of `split` ("train" or "test") of the prepared set (prepared on
    first use)."""
    if split not in SPLITS:
        raise ValueError(f"{Options.of(data_config).kind!r} has splits {SPLITS}, not {split!r}.")
    p = prepare(data_config)
    splits = p.builder.info.splits
    return UserSource(p.builder.as_data_source(split=split) if split in splits else [], p)


def sample_prompts(data_config) -> list:
    """Up to NUM_PROMPTS distinct held-out captions, the first of each in a fixed stride through
    the test split's record order (the training split's where nothing is held out): fixed
    prompts for progress grids, each a row once."""
    src = open_split(data_config, "test")
    if len(src) == 0:
        src = open_split(data_config, "train")
    n = len(src)
    stride = max(1, n // NUM_PROMPTS)
    seen: dict = {}
    for start in range(stride):  # every stride-th record, then the ones between, until enough
        for i in range(start, n, stride):
            seen.setdefault(_text(src[i]["caption"]), None)
            if len(seen) == NUM_PROMPTS:
                return list(seen)
    return list(seen)


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
