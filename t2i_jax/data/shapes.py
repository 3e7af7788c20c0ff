"""`shapes`: procedurally drawn images of one or two coloured shapes with compositional captions.

Every image is a pure function of (split, index): its attributes are drawn with
numpy's default_rng([SEED, split code, index]) and rendered in numpy (coverage of each pixel
estimated on a 4x4 sub-pixel grid, i.e. anti-aliased edges) on a black background, RGB, natively
at any image size S (default 32). The captions, the categorical attributes (colour, shape, size,
relation, num_shapes) and so the held-out pairs are the same at every size, and so is the scene:
positions are drawn on the 32x32 grid and scaled by S / 32 (a scene at 64 is the one at 32 drawn
twice as finely). The TFDS builder of size S is "t2i_shapes" for S = 32 (as always) and
"t2i_shapes_S" otherwise (`builder(data_dir, image_size=S)`, prepared on first use), so the
pipeline reads shapes at data.image_size without resizing.

Attributes (recorded with every image, so alignment can be scored exactly):
  colour   COLOURS: red, green, blue, yellow, purple (fixed RGB values, PALETTE)
  shape    SHAPES: circle, square, triangle (upward, isosceles)
  size     SIZES: small (half-extent 0.12 of the image size), large (0.2)
  centre   (x, y) in pixels; bbox (x0, y0, x1, y1) of the pixels the shape covers, inclusive
  relation for two shapes, RELATIONS[r] holds between shape 0 and shape 1 ("shape 0 is above
           shape 1"): the two boxes are disjoint, separated along the relation's axis, and offset
           by at most a quarter of the image along the other axis. -1 for a single shape.
Per-shape arrays have length 2; the second entry is -1 (or 0 for geometry) for single shapes.

Captions, in CAPTION_STYLES order:
  full      "a small red circle above a large blue square" / "a large green triangle"
  converse  "a large blue square below a small red circle" (the same scene, named from shape 1)
  short     "a red circle above a blue square" (sizes left out)

Compositional generalisation: the colour+shape pairs in HELD_OUT (red triangle, blue circle,
yellow square) never appear in `train` or `test` (each colour and each shape does, with other
partners); every image of the `heldout` split contains at least one of them.
"""

from __future__ import annotations

import functools

import numpy as np

NAME = "t2i_shapes"
IMAGE_SIZE = 32
SPLITS = ("train", "test", "heldout")
NUM_EXAMPLES = {"train": 3000, "test": 300, "heldout": 300}
SEED = 20240601
_SPLIT_CODE = {"train": 0, "test": 1, "heldout": 2}

COLOURS = ("red", "green", "blue", "yellow", "purple")
PALETTE = np.array([(230, 40, 40), (40, 190, 70), (50, 90, 235), (235, 215, 50), (160, 70, 210)],
                   np.uint8)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
HALF_EXTENT = (0.12, 0.2)  # fraction of the image size, by SIZES
RELATIONS = ("above", "below", "left of", "right of")
CONVERSE = (1, 0, 3, 2)
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
CAPTION_STYLES = ("full", "converse", "short")
SUPERSAMPLE = 4
_HELD = {(COLOURS.index(c), SHAPES.index(s)) for c, s in HELD_OUT}


def is_held_out(colour: int, shape: int) -> bool:
    return (int(colour), int(shape)) in _HELD


def _pick_pair(rng, held: bool):
    """(colour, shape) indices: a held-out pair if held, else any pair not held out."""
    if held:
        c, s = HELD_OUT[rng.integers(len(HELD_OUT))]
        return COLOURS.index(c), SHAPES.index(s)
    while True:
        c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
        if not is_held_out(c, s):
            return c, s


def attributes(split: str, index: int, image_size: int = IMAGE_SIZE) -> dict:
    """The attributes of image `index` of `split` (deterministic)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"shapes has splits {SPLITS}, not {split!r}.")
    rng = np.random.default_rng([SEED, _SPLIT_CODE[split], int(index)])
    n = 1 if rng.random() < 0.4 else 2
    forced = int(rng.integers(n)) if split == "heldout" else -1
    colour, shape, size = [-1, -1], [-1, -1], [-1, -1]
    for k in range(n):
        colour[k], shape[k] = _pick_pair(rng, held=(k == forced))
        size[k] = int(rng.integers(len(SIZES)))
    # Positions are drawn on the IMAGE_SIZE (32) grid and scaled to image_size, so every size
    # shows the same scene (a 1-pixel margin at 32 is image_size / 32 pixels at image_size), and
    # a placement that works at 32 works at every size. At 32 the scale is exactly 1.
    ref = IMAGE_SIZE
    half = [HALF_EXTENT[s] * ref if s >= 0 else 0.0 for s in size]
    centre = np.zeros((2, 2), np.float32)
    relation = -1
    if n == 1:
        lo, hi = half[0] + 1, ref - 1 - half[0]
        centre[0] = rng.uniform(lo, hi, size=2)
    else:
        relation = int(rng.integers(len(RELATIONS)))
        axis = 1 if relation in (0, 1) else 0      # y for above/below, x for left/right
        first_lower = relation in (0, 2)           # shape 0 has the smaller coordinate
        gap = 0.05 * ref
        for _ in range(1000):
            c = np.array([rng.uniform(h + 1, ref - 1 - h, size=2) for h in half])
            a, b = (0, 1) if first_lower else (1, 0)
            separated = c[b, axis] - c[a, axis] >= half[a] + half[b] + gap
            aligned = abs(c[0, 1 - axis] - c[1, 1 - axis]) <= 0.25 * ref
            if separated and aligned:
                centre[:] = c
                break
        else:  # cannot happen for these sizes; kept as a guard
            raise RuntimeError("could not place two shapes")
    if image_size != ref:
        centre = (centre.astype(np.float64) * (image_size / ref)).astype(np.float32)
    return {"num_shapes": n, "colour": np.array(colour, np.int32), "shape": np.array(shape, np.int32),
            "size": np.array(size, np.int32), "centre": centre, "relation": relation,
            "image_size": image_size}


def _coverage(shape: int, cx: float, cy: float, h: float, image_size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 [S, S] (4x4 sub-pixel samples)."""
    ss = SUPERSAMPLE
    t = (np.arange(image_size * ss, dtype=np.float32) + 0.5) / ss  # sub-pixel centres
    # Only the pixels of a window around the shape (every shape lies within h of its centre)
    # are sampled; the others are 0. The same samples as over the whole image, so the same values.
    x0, x1 = max(0, int(np.floor(cx - h)) - 1), min(image_size, int(np.ceil(cx + h)) + 2)
    y0, y1 = max(0, int(np.floor(cy - h)) - 1), min(image_size, int(np.ceil(cy + h)) + 2)
    x, y = t[None, x0 * ss:x1 * ss], t[y0 * ss:y1 * ss, None]
    if shape == 0:    # circle of radius h
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == 1:  # square of side 2h
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    else:             # triangle: apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
        inside = (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
    out = np.zeros((image_size, image_size), np.float32)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)
    return out


def render(attrs: dict) -> np.ndarray:
    """The image of `attrs`: uint8 [S, S, 3], black background, shape 1 drawn over shape 0."""
    s = attrs["image_size"]
    img = np.zeros((s, s, 3), np.float32)
    for k in range(attrs["num_shapes"]):
        h = HALF_EXTENT[attrs["size"][k]] * s
        cov = _coverage(int(attrs["shape"][k]), *attrs["centre"][k], h, s)[..., None]
        img = img * (1 - cov) + PALETTE[attrs["colour"][k]].astype(np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def bboxes(attrs: dict) -> np.ndarray:
    """int32 [2, 4]: (x0, y0, x1, y1) of the pixels each shape covers (inclusive); -1 if none."""
    out = np.full((2, 4), -1, np.int32)
    s = attrs["image_size"]
    for k in range(attrs["num_shapes"]):
        h = HALF_EXTENT[attrs["size"][k]] * s
        cov = _coverage(int(attrs["shape"][k]), *attrs["centre"][k], h, s)
        ys, xs = np.nonzero(cov > 0)
        out[k] = (xs.min(), ys.min(), xs.max(), ys.max())
    return out


def _phrase(attrs, k, with_size=True):
    words = [SIZES[attrs["size"][k]]] if with_size else []
    return "a " + " ".join(words + [COLOURS[attrs["colour"][k]], SHAPES[attrs["shape"][k]]])


def captions(attrs: dict) -> list:
    """All phrasings of the scene, in CAPTION_STYLES order."""
    if attrs["num_shapes"] == 1:
        return [_phrase(attrs, 0), _phrase(attrs, 0), _phrase(attrs, 0, False)]
    r = attrs["relation"]
    return [f"{_phrase(attrs, 0)} {RELATIONS[r]} {_phrase(attrs, 1)}",
            f"{_phrase(attrs, 1)} {RELATIONS[CONVERSE[r]]} {_phrase(attrs, 0)}",
            f"{_phrase(attrs, 0, False)} {RELATIONS[r]} {_phrase(attrs, 1, False)}"]


def example(split: str, index: int, image_size: int = IMAGE_SIZE) -> dict:
    """Image, captions and attributes of `index` in `split`, as the TFDS records store them."""
    a = attributes(split, index, image_size)
    return {"image": render(a), "captions": captions(a), "num_shapes": a["num_shapes"],
            "colour": a["colour"], "shape": a["shape"], "size": a["size"], "centre": a["centre"],
            "bbox": bboxes(a), "relation": a["relation"], "id": int(index)}


ATTRIBUTE_KEYS = ("num_shapes", "colour", "shape", "size", "centre", "bbox", "relation")


def sample_prompts(style=None) -> list:
    """Fixed prompts for progress grids; the last two use held-out colour+shape pairs."""
    return ["a large red circle", "a small blue square", "a large green triangle",
            "a yellow circle above a purple square", "a small green square left of a large red circle",
            "a large purple triangle right of a small blue square",
            "a large red triangle", "a blue circle below a green square"]


def builder_name(image_size: int = IMAGE_SIZE) -> str:
    """The TFDS name of the builder of size image_size: NAME at 32 (as it always was), else NAME_S."""
    return NAME if image_size == IMAGE_SIZE else f"{NAME}_{image_size}"


def _make_builder(image_size: int):
    import tensorflow_datasets as tfds
    from PIL import Image

    size = int(image_size)
    tfds_name = builder_name(size)

    class T2iShapes(tfds.core.GeneratorBasedBuilder):
        """One or two coloured shapes with compositional captions and exact attributes."""
        # Set explicitly (TFDS would derive it from the class name): TFDS's registry refuses a
        # second class of the same name, and each size is its own data set.
        name = tfds_name
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": f"3000 train / 300 test / 300 heldout, {size}x{size}."}
        code_path = None  # see prepare.py: TFDS's lookup needs importlib_resources on Python >= 3.9

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(size, size, 3)),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "num_shapes": np.int32,
                    "colour": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "shape": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "centre": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
                    "bbox": tfds.features.Tensor(shape=(2, 4), dtype=np.int32),
                    "relation": np.int32,
                    "id": np.int32,
                }),
                disable_shuffling=True,  # record i of a split is `example(split, i)`
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in SPLITS}

        def _generate_examples(self, split):
            for i in range(NUM_EXAMPLES[split]):
                ex = example(split, i, size)
                ex["image"] = Image.fromarray(ex["image"])
                yield i, ex

    if size != IMAGE_SIZE:  # distinct class names too (T2iShapes64), for reprs and pickling
        T2iShapes.__name__ = T2iShapes.__qualname__ = f"T2iShapes{size}"
    return T2iShapes


def builder_class(image_size: int = IMAGE_SIZE):
    """The TFDS builder class of images rendered at image_size (defined on first use, once per
    size, so importing t2i_jax.data stays light)."""
    if int(image_size) < 1:
        raise ValueError(f"shapes image_size must be positive, got {image_size}.")
    return _builder_class(int(image_size))


@functools.cache  # keyed by the int size: builder_class(), (32) and (image_size=32) are one class
def _builder_class(image_size: int):
    return _make_builder(image_size)


def builder(data_dir=None, image_size: int = IMAGE_SIZE):
    """The prepared TFDS builder of size image_size (prepared into data_dir on first use)."""
    from t2i_jax.data.builders import prepared_builder
    return prepared_builder(builder_class(int(image_size)), data_dir)


def convert(example: dict):
    """A stored record -> (image uint8 [S, S, 3], captions, label -1)."""
    return example["image"], [c.decode() if isinstance(c, bytes) else c for c in example["captions"]], -1
