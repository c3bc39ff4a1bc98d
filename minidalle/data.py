"""ShapesWorld: the toy text-to-image dataset, with held-out combinations for zero-shot tests.

DALL·E's headline result is compositional generalisation ("an armchair in the shape of an
avocado"). ShapesWorld is that experiment in miniature: coloured shapes on a black background,
captioned in varied English, with a documented set of colour-shape pairs and two-object
arrangements that never occur in `train`, so a model can be asked for them zero-shot.

Everything is a pure function of (seed, split, index): sample i of a split is always the same
image and caption, so the stream is unbounded, random-access, and needs no files on disk.

    ShapesWorld("train", image_size=32, seed=0)[2] -> (uint8 tensor (32, 32, 3), "one big green block near the top")

Scenes are described by a `Scene` (the structured truth); `render()` draws one and `caption()`
describes one. `minidalle.judge` does the inverse of both. Layout and recipe: datasets/shapes/README.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import DATASETS
from .errors import DataError

# --- the world's vocabulary ---------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond")
# Fixed RGB values, chosen far apart in hue so they stay separable after blur and noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (240, 230, 40),
    "green": (30, 190, 50),
    "cyan": (0, 220, 230),
    "blue": (40, 70, 240),
    "purple": (160, 50, 220),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.25, "big": 0.40}  # side of the shape's bounding box, as a fraction of the image
POSITIONS = {  # where a lone object sits: centre of its box, as fractions of (x, y)
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# --- held-out combinations (never in train or val; they make up the `heldout` split) -------------
# Each colour and each shape still occurs in training with other partners, so a model that
# composes attributes can draw these; one that memorises pairs cannot.
HELDOUT_PAIRS = frozenset({
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "diamond"),
    ("yellow", "square"),
    ("purple", "circle"),
})
# Two-object arrangements, written canonically as (shape A, relation, shape B) with the relation
# "above" or "left of"; "B below A" is the same arrangement.
HELDOUT_ARRANGEMENTS = frozenset({
    ("triangle", "above", "circle"),
    ("square", "left of", "diamond"),
    ("circle", "above", "square"),
    ("diamond", "left of", "triangle"),
})
SPLITS = ("train", "val", "heldout")
_SPLIT_IDS = {"train": 0, "val": 1, "heldout": 2}

JITTER = 0.05  # random shift of a lone object's centre (fraction of the side): big shapes never leave the canvas
PAIR_AXIS = (0.25, 0.75)  # centres of two objects along the relation's axis
PAIR_JITTER = 0.02  # small, so two big objects keep a gap of >= 6% of the side (2 px at 32)
PAIR_CROSS_JITTER = 0.1  # free movement across the relation's axis


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # "small" | "big"
    x: float  # centre, fraction of width (0 = left edge)
    y: float  # centre, fraction of height (0 = top edge)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # 1 or 2 objects, in caption order
    position: str | None = None  # for one object: a key of POSITIONS
    relation: str | None = None  # for two objects: objects[0] <relation> objects[1]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(tuple(Obj(**o) for o in d["objects"]), d.get("position"), d.get("relation"))


def canonical_arrangement(a: str, relation: str, b: str) -> tuple[str, str, str]:
    """Write a two-object arrangement with relation "above" or "left of".

    Example: ("circle", "below", "triangle") -> ("triangle", "above", "circle")
    """
    if relation in ("below", "right of"):
        return (b, INVERSE[relation], a)
    return (a, relation, b)


def is_heldout(scene: Scene) -> bool:
    """True when the scene contains a held-out colour-shape pair or two-object arrangement."""
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects):
        return True
    if scene.relation is not None:
        a, b = scene.objects
        return canonical_arrangement(a.shape, scene.relation, b.shape) in HELDOUT_ARRANGEMENTS
    return False


# --- sampling scenes ----------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _one_object(rng, shape: str, color: str) -> Scene:
    position = _pick(rng, list(POSITIONS))
    cx, cy = POSITIONS[position]
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    return Scene((Obj(shape, color, _pick(rng, list(SIZES)), cx + dx, cy + dy),), position=position)


def _two_objects(rng, shape_a: str, color_a: str, shape_b: str, color_b: str, relation: str) -> Scene:
    # Object A sits at the low end of the axis for "left of"/"above", the high end otherwise.
    first, second = PAIR_AXIS if relation in ("left of", "above") else PAIR_AXIS[::-1]
    along = (first + rng.uniform(-PAIR_JITTER, PAIR_JITTER), second + rng.uniform(-PAIR_JITTER, PAIR_JITTER))
    across = 0.5 + rng.uniform(-PAIR_CROSS_JITTER, PAIR_CROSS_JITTER, size=2)
    horizontal = relation in ("left of", "right of")
    xy = [(along[i], across[i]) if horizontal else (across[i], along[i]) for i in range(2)]
    objs = (Obj(shape_a, color_a, _pick(rng, list(SIZES)), *xy[0]),
            Obj(shape_b, color_b, _pick(rng, list(SIZES)), *xy[1]))
    return Scene(objs, relation=relation)


def _free_pair(rng, shape: str | None = None) -> tuple[str, str]:
    """A (shape, colour) pair seen in training; keeps `shape` when one is given."""
    while True:
        s, color = shape or _pick(rng, SHAPES), _pick(rng, list(COLORS))
        if (color, s) not in HELDOUT_PAIRS:
            return s, color


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise DataError(f"unknown ShapesWorld split {split!r}; choose one of {', '.join(SPLITS)}")


TWO_OBJECTS = 0.5  # share of train and val scenes with two objects, unless a ShapesWorld is told otherwise


def sample_scene(rng: np.random.Generator, split: str = "train", p_two: float = TWO_OBJECTS) -> Scene:
    """Draw one scene of `split`: `train`/`val` avoid every held-out combination; `heldout` is
    half lone objects with a held-out colour-shape pair, half held-out two-object arrangements
    (whose objects use only training pairs, so the arrangement is the only new thing)."""
    _check_split(split)
    if split == "heldout":
        if rng.random() < 0.5:
            color, shape = _pick(rng, sorted(HELDOUT_PAIRS))
            return _one_object(rng, shape, color)
        a, rel, b = _pick(rng, sorted(HELDOUT_ARRANGEMENTS))
        if rng.random() < 0.5:  # say it either way round: "A above B" or "B below A"
            a, rel, b = b, INVERSE[rel], a
        (_, ca), (_, cb) = _free_pair(rng, a), _free_pair(rng, b)
        return _two_objects(rng, a, ca, b, cb, rel)
    while True:  # rejection sampling: cheap, since held-out combinations are a small minority
        if rng.random() < p_two:
            (sa, ca), (sb, cb) = _free_pair(rng), _free_pair(rng)
            scene = _two_objects(rng, sa, ca, sb, cb, _pick(rng, RELATIONS))
        else:
            shape, color = _free_pair(rng)
            scene = _one_object(rng, shape, color)
        if not is_heldout(scene):
            return scene


# --- rendering ----------------------------------------------------------------------------------
SUPERSAMPLE = 4  # render at 4x and average down: anti-aliased edges, like a real photo's


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage (0..1) of one shape on a `size`x`size` pixel grid; geometry in pixels.

    The shape fills a `side`x`side` box centred at (cx, cy): circle inscribed, square filling it,
    triangle pointing up with its base on the box's bottom edge, diamond touching the edge midpoints.
    Example: shape_mask("square", 8, 8, 4, 16).sum() -> 16.0
    """
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # sub-pixel centres, in pixel units
    h = side / 2
    # Every shape lies inside its box, so only the pixels the box touches are computed (the same
    # sub-pixel tests, so the same values as over the whole grid; the rest stay exactly 0).
    x0, x1 = max(0, math.floor(cx - h)), min(size, math.floor(cx + h) + 1)
    y0, y1 = max(0, math.floor(cy - h)), min(size, math.floor(cy + h) + 1)
    out = np.zeros((size, size), np.float32)
    if x0 >= x1 or y0 >= y1:
        return out
    x = coords[None, x0 * supersample:x1 * supersample] - cx  # (1, w): offsets from the centre
    y = coords[y0 * supersample:y1 * supersample, None] - cy  # (h, 1)
    if shape == "circle":
        inside = x**2 + y**2 <= h**2
    elif shape == "square":
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        # apex at (0, -h), base from (-h, h) to (h, h): |x| grows linearly from apex to base
        inside = (y <= h) & (np.abs(x) <= (y + h) / 2)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= h
    else:
        raise DataError(f"unknown shape {shape!r}; ShapesWorld draws {', '.join(SHAPES)}")
    rows, cols = y1 - y0, x1 - x0
    inside = np.broadcast_to(inside, (rows * supersample, cols * supersample)).astype(np.float32)
    out[y0:y1, x0:x1] = inside.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3))
    return out  # (size, size)


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
    """Draw a scene on black: uint8 array (image_size, image_size, 3)."""
    canvas = np.zeros((image_size, image_size, 3), dtype=np.float32)
    for obj in scene.objects:
        alpha = shape_mask(obj.shape, obj.x * image_size, obj.y * image_size,
                           SIZES[obj.size] * image_size, image_size)[..., None]  # (H, W, 1)
        canvas = canvas * (1 - alpha) + np.asarray(COLORS[obj.color], np.float32) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# --- captions -----------------------------------------------------------------------------------
# Synonyms give the text tokenizer real work and test that the model learns meaning, not strings.
SHAPE_WORDS = {"circle": ["circle", "disc", "disk"], "square": ["square", "box", "block"],
               "triangle": ["triangle"], "diamond": ["diamond", "rhombus"]}
COLOR_WORDS = {"red": ["red"], "orange": ["orange"], "yellow": ["yellow"], "green": ["green"],
               "cyan": ["cyan", "turquoise"], "blue": ["blue"], "purple": ["purple", "violet"],
               "white": ["white"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "big": ["big", "large", "huge"]}
POSITION_WORDS = {
    "left": ["on the left", "at the left", "on the left side"],
    "right": ["on the right", "at the right", "on the right side"],
    "top": ["at the top", "near the top", "at the top of the picture"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the picture"],
    "centre": ["in the centre", "in the center", "in the middle"],
}
RELATION_WORDS = {
    "left of": ["to the left of", "left of", "on the left of"],
    "right of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath", "underneath"],
}
ONE_TEMPLATES = ["a {obj} {pos}", "there is a {obj} {pos}", "{pos}, a {obj}", "{obj} {pos}",
                 "a picture of a {obj} {pos}", "one {obj} {pos}"]
TWO_TEMPLATES = ["a {a} {rel} a {b}", "there is a {a} {rel} a {b}", "{a} {rel} {b}",
                 "a {a} placed {rel} a {b}", "two shapes: a {a} {rel} a {b}"]


def _noun_phrase(rng, obj: Obj, say_size: bool) -> str:
    words = [_pick(rng, SIZE_WORDS[obj.size])] if say_size else []
    words += [_pick(rng, COLOR_WORDS[obj.color]), _pick(rng, SHAPE_WORDS[obj.shape])]
    return " ".join(words)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Describe a scene in one of several templates; colour and shape are always named, size
    usually (70%). Example: -> "a small red circle above a blue square" """
    if scene.relation is None:
        (obj,) = scene.objects
        text = _pick(rng, ONE_TEMPLATES).format(obj=_noun_phrase(rng, obj, rng.random() < 0.7),
                                                pos=_pick(rng, POSITION_WORDS[scene.position]))
    else:
        a, b = scene.objects
        text = _pick(rng, TWO_TEMPLATES).format(a=_noun_phrase(rng, a, rng.random() < 0.7),
                                                b=_noun_phrase(rng, b, rng.random() < 0.7),
                                                rel=_pick(rng, RELATION_WORDS[scene.relation]))
    return _articles(text)


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange circle" -> "an orange circle"


def longest_caption(count=len, templates=None) -> str:
    """The caption, of all those `caption()` can write for any split, that `count` scores highest.

    Every slot of a template ({obj}, {pos}, {a}, {rel}, {b}) is filled independently from its
    choices (noun phrases with or without a size word, every synonym), so when `count` adds up over
    the words of a caption -- `len`, a word count, or a tokenizer that splits text into words before
    merging, like `bpe.RegexTokenizer` -- taking the best filler slot by slot gives the maximum over
    all captions without writing each of them out (there are millions). Each filler is scored inside
    its template with the other slots fixed, so a/an and the spaces around it are counted too.
    Example: longest_caption(len) -> "two shapes: a little turquoise triangle to the right of a little turquoise triangle"
    """
    def synonyms(table):  # every word or phrase a table offers, e.g. SIZE_WORDS -> ["small", "little", ...]
        return [w for words in table.values() for w in words]

    phrases = [" ".join(([size] if size else []) + [colour, shape]) for size in [None, *synonyms(SIZE_WORDS)]
               for colour in synonyms(COLOR_WORDS) for shape in synonyms(SHAPE_WORDS)]
    choices = {"obj": phrases, "a": phrases, "b": phrases,
               "pos": synonyms(POSITION_WORDS), "rel": synonyms(RELATION_WORDS)}
    candidates = []
    for template in templates or ONE_TEMPLATES + TWO_TEMPLATES:
        slots = re.findall(r"{(\w+)}", template)
        picks = {s: choices[s][0] for s in slots}
        for s in slots:  # the best filler for this slot, the other slots held fixed
            picks[s] = max(choices[s], key=lambda f: count(_articles(template.format(**{**picks, s: f}))))
        candidates.append(_articles(template.format(**picks)))
    return max(candidates, key=count)  # the first template's caption wins a tie, as before


# --- the dataset ----------------------------------------------------------------------------------
class ShapesWorld(torch.utils.data.Dataset):
    """Random-access ShapesWorld split: item i is a pure function of (seed, split, i).

    `len()` and indexing cover the finite view `0..n-1` (for epochs and DataLoaders); `item(i)`,
    `batch()` and `stream()` reach any index, so the world itself never runs out.
    Items are `(image uint8 (H, W, 3), caption str)`; `scene(i)` gives the structured truth.
    """

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0, n: int = 50_000,
                 two_objects: float = TWO_OBJECTS):
        _check_split(split)
        if image_size < 8:
            raise DataError(f"image_size={image_size} is too small to draw shapes; use 8 or more")
        if not 0 <= two_objects <= 1:
            raise DataError(f"two_objects={two_objects} is a share of scenes: choose it between 0 and 1")
        self.split, self.image_size, self.seed, self.n = split, image_size, seed, n
        self.two_objects = two_objects  # share of scenes with two objects (train and val; heldout is fixed)

    def _rng(self, i: int) -> np.random.Generator:
        # One generator per item, keyed by (seed, split, i): random access without replaying a stream.
        return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])

    def scene(self, i: int) -> Scene:
        return sample_scene(self._rng(i), self.split, self.two_objects)

    def example(self, i: int) -> tuple[Scene, str]:
        rng = self._rng(i)
        scene = sample_scene(rng, self.split, self.two_objects)
        return scene, caption(scene, rng)

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> tuple[torch.Tensor, str]:
        """Item i for any i >= 0, past `n` too. Example: item(10**9) -> (uint8 (H, W, 3), caption)"""
        if i < 0:
            raise IndexError(f"ShapesWorld index {i} is negative")
        scene, text = self.example(int(i))
        return torch.from_numpy(render(scene, self.image_size)), text

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if not -self.n <= i < self.n:  # the Dataset protocol: iteration stops at n
            raise IndexError(f"ShapesWorld index {i} out of range for n={self.n}; use .item(i) or .stream() beyond n")
        return self.item(i % self.n)

    def stream(self, start: int = 0):
        """Yield items start, start+1, ... forever."""
        i = start
        while True:
            yield self.item(i)
            i += 1

    def batch(self, start: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """Items start..start+batch_size-1 stacked: (uint8 (B, H, W, 3), captions)."""
        items = [self.item(i) for i in range(start, start + batch_size)]
        return torch.stack([im for im, _ in items]), [c for _, c in items]


def write_split(out_dir: str | Path, split: str = "train", n: int = 100, image_size: int = 32,
                seed: int = 0, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write n samples to `out_dir` for inspection: `00000.png` + `00000.txt` per sample (the
    folder-dataset layout, so the folder loader reads it back) and `captions.jsonl` with each
    file's caption and true scene (what the judge needs). Returns the folder.

    The folder must be new, empty, or one this function wrote before with nothing else in it and
    nothing changed since (files.OwnedFolder: its ledger names every file written). Then the earlier
    samples are replaced, which `log` says, so a smaller second run leaves no stale files for the
    folder loader. Anything else is refused before a file is touched, and a run that fails half-way
    leaves the earlier samples as they were.
    """
    from io import BytesIO

    from PIL import Image
    from tqdm.auto import tqdm

    from .infra.files import OwnedFolder

    if n < 1:
        raise DataError(f"n={n}: write at least one sample")
    ds = ShapesWorld(split, image_size, seed, n)
    out = OwnedFolder(out_dir, "data", "--out", index="captions.jsonl").check()
    try:
        width = max(5, len(str(n - 1)))  # names sort in sample order
        index = []
        for i in tqdm(range(n), desc=f"writing {split}", disable=not progress):
            scene, text = ds.example(i)
            stem, png = f"{i:0{width}d}", BytesIO()
            Image.fromarray(render(scene, image_size)).save(png, format="PNG")
            out.write(f"{stem}.png", png.getvalue())
            out.write(f"{stem}.txt", text + "\n")
            index.append(json.dumps({"file": f"{stem}.png", "caption": text, "scene": scene.to_dict()}) + "\n")
        out.write("captions.jsonl", "".join(index))
        replaced = out.commit()
    except OSError as e:
        raise DataError(f"cannot write ShapesWorld samples to {out_dir}: {e}") from None
    finally:
        out.abandon()  # after a failure (Ctrl-C too): the staged files go, the earlier samples stay
    if replaced:
        log(f"[data] replaced the {replaced} files an earlier `data` wrote in {out_dir}")
    return Path(out_dir)


def read_split(folder: str | Path, numbered: bool = False) -> list[dict]:
    """Read `captions.jsonl` written by `write_split` (or by hand: lines of {"file", "caption"}).

    Each "file" must name a file inside the folder (a relative path, no ".." part): the index says
    which images to read, never where outside the folder to go. numbered=True adds each row's line
    number as "line", for messages. Example: read_split("samples")[0] -> {"file": "00000.png", "caption": ...}
    """
    path = Path(folder) / "captions.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found; write a split with `python -m minidalle data --out {folder}`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("file"), str) and isinstance(row.get("caption"), str)
                and row["file"]):
            raise DataError(f"{path}, line {k}: expected a JSON object whose 'file' (an image name) and "
                            f"'caption' are strings, got {line[:80]!r}")
        name = row["file"]
        if name.startswith(("/", "\\")) or "\\" in name or ".." in Path(name).parts or Path(name).is_absolute():
            raise DataError(f"{path}, line {k}: 'file' is {name[:80]!r}, which is not inside {folder}; name the "
                            "image by its path inside the folder (e.g. 00000.png)")
        if numbered:
            row = {**row, "line": k}
        rows.append(row)
    return rows


# --- one entry point for every dataset ------------------------------------------------------------
# DATASETS (shapes, emoji, folder, tar) is imported from config.py, which checks data.dataset against it.


def eval_split(cfg) -> str | None:
    """The split a dataset's evaluations read: ShapesWorld's val, the held-out emoji, else None (no split).

    Example: eval_split(get_config("toy").data) -> "val"; eval_split(get_config("small").data) -> "heldout"
    """
    return {"shapes": "val", "emoji": "heldout"}.get(cfg.dataset)


def build_dataset(cfg, split: str = "train"):
    """The dataset a `DataConfig` names, yielding `(uint8 (H, W, 3), caption)`.

    ShapesWorld has `train`/`val`/`heldout`; the emoji have `train` and `heldout` (about 5% of them,
    chosen by a hash of the caption: `realdata.emoji.emoji_split`; there is no `val`, since each emoji is one
    image, so no new draws of a training caption exist). The folder and tar datasets are one pool of
    images (point `data.path` at a separate folder or shard set to evaluate on other images).
    Example: build_dataset(get_config("toy").data, "heldout") -> ShapesWorld("heldout", 32, ...)
             build_dataset(get_config("small").data, "heldout") -> EmojiDataset of 214 held-out emoji
    """
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r} (data.dataset); choose one of {', '.join(DATASETS)}")
    if cfg.dataset == "shapes":
        n = {"train": cfg.n_train, "val": cfg.n_val, "heldout": cfg.n_heldout}.get(split, 0)
        # data.two_objects shapes the training stream only: val and heldout, what every figure is measured
        # on, keep ShapesWorld's own mix, so runs with other shares are judged on the same prompts
        return ShapesWorld(split, cfg.image_size, cfg.seed, n, cfg.two_objects if split == "train" else TWO_OBJECTS)
    if cfg.dataset == "emoji":
        if split not in ("train", "heldout"):
            raise DataError(f"the emoji dataset has no {split!r} split; it has 'train' and 'heldout' (each emoji "
                            "is one image, so there is no val of new images for the training captions)")
        from .realdata.emoji import EmojiDataset  # optional extra: imported only when asked for
        return EmojiDataset(cfg.image_size, split=split, max_skip_rate=cfg.max_skip_rate)
    if split != "train":
        raise DataError(f"the {cfg.dataset} dataset has no {split!r} split; only ShapesWorld has "
                        f"val/heldout (and emoji heldout). Evaluate on other images by pointing data.path elsewhere.")
    if not cfg.path:
        raise DataError(f"the {cfg.dataset} dataset needs data.path (e.g. --data.path=/data/my_images)")
    from .realdata.folders import FolderDataset
    from .realdata.shards import TarShardDataset
    cls = FolderDataset if cfg.dataset == "folder" else TarShardDataset
    return cls(cfg.path, cfg.image_size, seed=cfg.seed, max_skip_rate=cfg.max_skip_rate)
