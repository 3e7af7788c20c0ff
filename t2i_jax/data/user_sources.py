"""Your own images, listed and read: a Hugging Face imagefolder, or webdataset tar shards.

    opts = Options.of(data_config)          # UsageError (one line) for a config that cannot work
    listing = list_source(opts)             # every file read, in units; UsageError before any write
    for raw in read_unit(listing, unit, opts): ...      # Raw(key, image bytes, caption)

imagefolder (data.name="imagefolder", data.path=DIR): images (.jpg .jpeg .png .webp) at any depth
  under DIR and one or more `metadata.jsonl` / `metadata.csv` files (Hugging Face's layout): each
  row's `file_name` is relative to its metadata file's folder, its caption is the column
  data.caption_key ("text"). A record's key is the image's path under DIR without its extension.
webdataset (data.name="webdataset", data.path = a folder of .tar files (any depth), one .tar, a
  brace pattern DIR/part-{00000..00099}.tar, or a glob DIR/*.tar): read with the stdlib tarfile,
  streaming. Members are grouped by key as webdataset does (the member path up to the first dot of
  its basename; consecutive members of one key form a record): KEY.jpg|jpeg|png|webp is the image,
  the caption is field data.caption_key ("caption") of KEY.json where it has one, else KEY.txt.

A record that cannot be used is skipped and counted by its kind (BAD_KINDS; user_staging.py),
never fatal by itself; a source that cannot be read at all is refused before anything is written.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import json
import os
import re
import tarfile
from typing import Iterator, Optional

from t2i_jax.errors import UsageError

KINDS = ("imagefolder", "webdataset")
DEFAULT_CAPTION_KEY = {"imagefolder": "text", "webdataset": "caption"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BAD_KINDS = ("undecodable_image", "missing_caption", "too_small", "image_without_caption",
             "caption_without_image", "duplicate_key")
IMAGEFOLDER_CHUNK = 256   # images per unit of work (a webdataset's unit is one shard)
_WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclasses.dataclass(frozen=True)
class Options:
    """What a user source is and how its records are prepared (data config fields, resolved)."""
    kind: str                  # data.name: "imagefolder" | "webdataset"
    path: str                  # data.path
    image_size: int            # S: records are stored S x S
    channels: int              # 1 (grey) or 3 (RGB)
    caption_key: str           # data.caption_key, or DEFAULT_CAPTION_KEY[kind]
    min_image_size: int        # data.min_image_size, or S (no upscaling)
    test_fraction: float       # held out by the key's hash
    max_bad_fraction: float    # more bad records than this: refused
    data_dir: Optional[str]    # where the TFDS files go (None: builders.default_data_dir)

    @classmethod
    def of(cls, cfg) -> "Options":
        """From a data config (ConfigDict) or pipeline.DataSettings; UsageError naming the field."""
        get = (lambda k: cfg.get(k, None)) if hasattr(cfg, "get") else \
            (lambda k: getattr(cfg, k, None))
        kind = get("name")
        if kind not in KINDS:
            raise UsageError(f"data.name={kind!r} is not a user source ({', '.join(KINDS)}).")
        path = get("path")
        if not path:
            raise UsageError(f"data.path is not set: data.name={kind!r} reads your images from it; "
                             f"pass --config.data.path=DIR ({_WHAT[kind]}).")
        size = int(get("image_size") or 32)
        channels = int(get("channels") or 3)
        min_size = get("min_image_size")
        min_size = size if min_size is None else int(min_size)
        test = 0.05 if get("test_fraction") is None else float(get("test_fraction"))
        bad = 0.05 if get("max_bad_fraction") is None else float(get("max_bad_fraction"))
        if size < 1 or channels not in (1, 3):
            raise UsageError(f"data.image_size must be positive and data.channels 1 or 3, got "
                             f"{size} and {channels}.")
        if min_size < 1:
            raise UsageError(f"data.min_image_size must be positive (or None: data.image_size), "
                             f"got {min_size}.")
        if not 0.0 <= test < 1.0:
            raise UsageError(f"data.test_fraction must be in [0, 1), got {test}.")
        if not 0.0 <= bad <= 1.0:
            raise UsageError(f"data.max_bad_fraction must be in [0, 1], got {bad}.")
        return cls(kind, os.path.expanduser(str(path)), size, channels,
                   str(get("caption_key") or DEFAULT_CAPTION_KEY[kind]), min_size, test, bad,
                   get("data_dir"))


_WHAT = {"imagefolder": "a folder of images with a metadata.jsonl or metadata.csv naming each "
                        "file_name and its caption",
         "webdataset": "a folder of .tar shards, or DIR/part-{00000..00099}.tar"}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work: a webdataset shard, or a chunk of an imagefolder's records."""
    index: int
    shard: Optional[str] = None   # webdataset: the .tar file
    items: tuple = ()             # imagefolder: (key, image path | None, caption | None), by key
    nbytes: int = 0               # the bytes it reads


@dataclasses.dataclass(frozen=True)
class Listing:
    kind: str
    root: str                     # the folder every name in `files` is relative to
    files: tuple                  # (relative name, size, mtime_ns) of every file read, sorted
    units: tuple                  # Unit, in the prepared set's record order

    @property
    def nbytes(self) -> int:
        return sum(size for _, size, _ in self.files)

    @property
    def num_records(self) -> Optional[int]:
        """How many records the units hold (None for webdataset: known once read)."""
        return None if self.kind == "webdataset" else sum(len(u.items) for u in self.units)


@dataclasses.dataclass(frozen=True)
class Raw:
    key: str
    image: Optional[bytes]        # None: no image file for this key
    caption: Optional[str]        # None: no caption file (row); "": one without a caption
    nbytes: int = 0
    caption_fields: tuple = ()    # a webdataset .json's fields (for the refusal's hint)


def list_source(opts: Options, chunk: int = IMAGEFOLDER_CHUNK) -> Listing:
    """Every file the source reads, split into units; UsageError (one line) for a source that
    cannot be read, before anything is written."""
    if opts.kind == "imagefolder":
        return _list_imagefolder(opts, chunk)
    return _list_webdataset(opts)


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _walk(root: str) -> Iterator[str]:
    """Relative posix names of the files under root, any depth, hidden ones left out, sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in os.path.basename(name) else ""


def _list_imagefolder(opts: Options, chunk: int) -> Listing:
    root = os.path.abspath(opts.path)
    if not os.path.exists(root):
        raise UsageError(f"data.path={opts.path} does not exist; pass --config.data.path=DIR "
                         f"({_WHAT['imagefolder']}).")
    if not os.path.isdir(root):
        raise UsageError(f"data.path={opts.path} is a file; data.name='imagefolder' reads a folder "
                         f"({_WHAT['imagefolder']}); for .tar shards set data.name=webdataset.")
    images, metas, tars = {}, [], 0
    for rel in _walk(root):
        base = os.path.basename(rel).lower()
        if base in METADATA_FILES:
            metas.append(rel)
        elif _suffix(rel) in IMAGE_EXTS:
            images[rel] = _stat(os.path.join(root, rel))
        elif rel.lower().endswith(TAR_SUFFIXES):
            tars += 1
    if not images:
        what = f"but {tars} .tar file(s): set data.name=webdataset" if tars else \
            "pass the folder of your images"
        raise UsageError(f"data.path={opts.path} holds no images (.jpg, .jpeg, .png or .webp, at "
                         f"any depth) {what}.")
    if not metas:
        raise UsageError(f"data.path={opts.path} has no metadata.jsonl or metadata.csv: "
                         f"data.name='imagefolder' needs one with a file_name column and a "
                         f"{opts.caption_key!r} column (the caption), one row per image.")
    dirs = [os.path.dirname(m) for m in metas]
    both = sorted({d for d in dirs if dirs.count(d) > 1})
    if both:
        raise UsageError(f"{os.path.join(root, both[0])} has both metadata.jsonl and metadata.csv; "
                         "keep one.")
    items, rows = [], set()
    for meta in metas:
        for name, caption in _read_metadata(root, meta, opts.caption_key):
            full = os.path.normpath(os.path.join(root, os.path.dirname(meta), name))
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel not in images and not rel.startswith("../") and os.path.isfile(full):
                images[rel] = _stat(full)  # named by the metadata, though not a usual suffix
            items.append((_strip_ext(rel), rel if rel in images else None, caption))
            rows.add(rel)
    items += [(_strip_ext(rel), rel, None) for rel in images if rel not in rows]
    items.sort(key=lambda it: (it[0], it[1] or "", it[2] is None))
    files = sorted([(rel, *images[rel]) for rel in images]
                   + [(m, *_stat(os.path.join(root, m))) for m in metas])
    units = []
    for u, start in enumerate(range(0, len(items), chunk)):
        part = tuple(items[start:start + chunk])
        units.append(Unit(u, items=part, nbytes=sum(images[p][0] for _, p, _ in part if p)))
    return Listing("imagefolder", root, tuple(files), tuple(units))


def _strip_ext(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if "." in os.path.basename(rel) else rel


def _read_metadata(root: str, meta: str, caption_key: str) -> list:
    """[(file_name, caption or "")] of one metadata file; UsageError if its columns are wrong."""
    path = os.path.join(root, meta)
    rows, columns = [], {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        if meta.lower().endswith(".csv"):
            reader = csv.DictReader(f)
            columns = dict.fromkeys(reader.fieldnames or [])
            rows = list(reader)
        else:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path} line {n} is not JSON ({e.msg}); fix that "
                                     "line.") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{path} line {n} is not a JSON object; write one "
                                     '{"file_name": ..., "' + caption_key + '": ...} per line.')
                columns.update(dict.fromkeys(row))
                rows.append(row)
    has = ", ".join(str(c) for c in columns) or "no columns"
    if "file_name" not in columns:
        raise UsageError(f"{path} has no file_name column (it has: {has}); name each image's path, "
                         "relative to the metadata file, in a file_name column.")
    if caption_key not in columns:
        raise UsageError(f"{path} has no {caption_key!r} column for the captions (it has: {has}); "
                         f"set data.caption_key to the caption column (e.g. "
                         f"--config.data.caption_key=...).")
    return [(str(r.get("file_name") or ""), _caption_text(r.get(caption_key))) for r in rows]


def _caption_text(value) -> str:
    """A caption field as text ("" where it is missing or empty); a list: its first caption."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if value is None:
        return ""
    return str(value).replace("\ufeff", "").strip()


def expand_braces(pattern: str) -> list:
    """The names a brace pattern stands for: {00000..00099} (zero-padded ranges), {a,b} (lists),
    several braces as their product, in order."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [n for o in options for n in expand_braces(head + o + tail)]


def _list_webdataset(opts: Options) -> Listing:
    path = opts.path
    if "{" in path:
        names = expand_braces(path)
        found = [n for n in names if os.path.isfile(n)]
        if not found:
            raise UsageError(f"data.path={path} matches no file (it stands for {len(names)} names, "
                             f"e.g. {names[0]}); check the folder and the range.")
        if len(found) < len(names):
            missing = [n for n in names if n not in set(found)]
            raise UsageError(f"data.path={path}: {len(missing)} of its {len(names)} shards do not "
                             f"exist (e.g. {missing[0]}); finish copying them or narrow the range.")
        shards = found
    elif any(c in path for c in "*?["):
        shards = sorted(n for n in glob.glob(path) if os.path.isfile(n))
        if not shards:
            raise UsageError(f"data.path={path} matches no file; check the folder and the pattern.")
    elif os.path.isdir(path):
        shards = [os.path.join(path, r) for r in _walk(path) if r.lower().endswith(TAR_SUFFIXES)]
        if not shards:
            has_images = any(_suffix(r) in IMAGE_EXTS for r in itertools.islice(_walk(path), 10000))
            hint = " (it holds images: set data.name=imagefolder)" if has_images else ""
            raise UsageError(f"data.path={path} holds no .tar files{hint}; pass a folder of "
                             "webdataset shards, one .tar, or DIR/part-{00000..00099}.tar.")
    elif os.path.isfile(path):
        shards = [path]
    else:
        raise UsageError(f"data.path={path} does not exist; pass --config.data.path=DIR "
                         f"({_WHAT['webdataset']}).")
    shards = [os.path.abspath(s) for s in shards]
    for s in shards:
        if not tarfile.is_tarfile(s):
            raise UsageError(f"{s} is not a tar archive (tarfile cannot read it); remove it from "
                             "data.path or replace it with the shard it should be.")
    root = os.path.commonpath([os.path.dirname(s) for s in shards])
    files, units = [], []
    for u, s in enumerate(shards):
        size, mtime = _stat(s)
        files.append((os.path.relpath(s, root).replace(os.sep, "/"), size, mtime))
        units.append(Unit(u, shard=s, nbytes=size))
    return Listing("webdataset", root, tuple(sorted(files)), tuple(units))


# ---------------------------------------------------------------------------------------------
# Reading


def read_unit(listing: Listing, unit: Unit, opts: Options) -> Iterator[Raw]:
    """The unit's records, in order (image bytes not yet decoded)."""
    if listing.kind == "imagefolder":
        for key, rel, caption in unit.items:
            data = None
            if rel is not None:
                try:
                    with open(os.path.join(listing.root, rel), "rb") as f:
                        data = f.read()
                except OSError:  # gone since it was listed
                    data = None
            yield Raw(key, data, caption, len(data or b""))
    else:
        yield from _read_shard(unit.shard, opts.caption_key)


def _read_shard(path: str, caption_key: str) -> Iterator[Raw]:
    wanted = set(IMAGE_EXTS) | {"txt", "json"}
    key, group, nbytes, count = None, {}, 0, 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                m = _WDS_NAME.match(name)
                if m is None or os.path.basename(name).startswith("."):
                    continue
                k, ext = m.group(1), m.group(2).lower()
                if ext not in wanted:
                    continue
                data = tar.extractfile(member).read()
                count += 1
                if k != key:
                    if key is not None:
                        yield _group(key, group, nbytes, caption_key)
                    key, group, nbytes = k, {}, 0
                group.setdefault(ext, data)
                nbytes += len(data)
            if key is not None:
                yield _group(key, group, nbytes, caption_key)
    except (tarfile.TarError, EOFError, OSError) as e:
        cause = str(e).strip() or type(e).__name__
        raise UsageError(f"{path} is truncated or damaged after {count} members ({cause}); copy "
                         "that shard again.") from None


def _group(key: str, group: dict, nbytes: int, caption_key: str) -> Raw:
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    caption, fields = None, ()
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8", "replace"))
        except json.JSONDecodeError:
            meta = None
        if isinstance(meta, dict):
            fields = tuple(str(f) for f in meta)[:20]
            caption = _caption_text(meta.get(caption_key))
        else:
            caption = ""
    if not caption and "txt" in group:
        caption = _caption_text(group["txt"].decode("utf-8", "replace"))
    return Raw(key, image, caption, nbytes, fields)
