"""What the reranker trains on: ShapesWorld pairs, each with rivals one fact away, shapes between two shapes, augmentation.

    negs = one_fact_changed(scene, caption, rng, k=2, swap_first=True)   # [Negative(fact, scene, caption), ...]
    ps = morphs(scene, rng, past=True)                                # {object: exponent}, one past halfway to a neighbour
    pairs = ShapesPairs("train", n, image_size, seed, tok, layout, batch_size=64, negatives=2)   # batch_at(i)

Random captions differ from each other in many facts, but the reranker must separate samples that get
ONE fact wrong (a red circle *below* a blue square, or the colours swapped). So each ShapesWorld training
pair brings `clip.hard_negatives` scenes with one fact changed (colour, shape, size, position, relation,
the two objects' colours or shapes swapped, one object more or less), rendered and captioned like any
other pair (`one_fact_changed`; a two-object pair tries a swap first, since binding is what the
transformer gets wrong most often on two-object captions): the changed pair joins the batch, and the
caption now has its own image one fact away as a competitor, as does the image its caption. A changed
object count gives an image only: it is a competitor for the captions and has no caption of its own.
Sampled shapes are often between two shapes, so each pair also brings `clip.morph_negatives` images with
a circle, square or diamond drawn as a superellipse past halfway to a neighbouring shape (`morphs`), and training images draw theirs a little
off the exact shape (`clip.morph_jitter`); blur, noise and a colour cast (`augment`) stand in for the
decoder. Nothing of this needs the dVAE: the reranker reads pixels, and only the BPE is shared.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from .. import data
from ..bpe import Tokenizer
from ..captions import CaptionSpec, parse_caption
from ..config import Config
from ..errors import ConfigError, DataError
from ..model import Layout


# What one_fact_changed alters. "binding": the two objects trade colours; "shape_swap": they trade shapes (each
# place keeps its colour), the mistake the transformer makes most on two-object captions.
FACTS = ("color", "shape", "size", "position", "relation", "binding", "shape_swap", "count")


# --- hard negatives: one fact changed --------------------------------------------------------------------
def _object_holds(spec, obj: data.Obj) -> bool:
    return spec.shape == obj.shape and spec.color in (None, obj.color) and spec.size in (None, obj.size)


def spec_holds(spec: CaptionSpec, scene: data.Scene) -> bool:
    """Is every fact a caption states true of a scene? Read from the scene itself (no judge): a pair may be
    described in either order ("A above B" is "B below A").

    Example: spec_holds(parse_caption("a red circle"), scene of a big red circle on the left) -> True
    """
    objs = scene.objects
    if len(spec.objects) != len(objs):
        return False
    if len(objs) == 1:
        return _object_holds(spec.objects[0], objs[0]) and (spec.position is None or spec.position == scene.position)
    if scene.relation is None:  # two objects placed without a stated arrangement: no caption can hold
        return False
    (s, t), (a, b) = spec.objects, objs
    return ((_object_holds(s, a) and _object_holds(t, b) and spec.relation == scene.relation)
            or (_object_holds(s, b) and _object_holds(t, a) and spec.relation == data.INVERSE[scene.relation]))


@dataclass(frozen=True)
class Negative:
    fact: str  # which of FACTS was changed
    scene: data.Scene  # the changed scene (render it for the image)
    caption: str | None  # a caption of the changed scene, false of the original; None for "count" (image only)


def _other(rng, options, current):
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


def _changed_scene(fact: str, scene: data.Scene, spec: CaptionSpec, rng) -> data.Scene | None:
    """The scene with one fact changed, or None when that fact cannot change (unstated, or the same either way)."""
    objs = list(scene.objects)
    if fact in ("color", "shape", "size"):
        stated = [i for i, o in enumerate(spec.objects) if getattr(o, fact) is not None]
        if not stated:
            return None
        i = stated[int(rng.integers(len(stated)))]
        values = {"color": list(data.COLORS), "shape": list(data.SHAPES), "size": list(data.SIZES)}[fact]
        objs[i] = replace(objs[i], **{fact: _other(rng, values, getattr(objs[i], fact))})
        return replace(scene, objects=tuple(objs))
    if fact == "position":
        if len(objs) != 1:
            return None
        pos = _other(rng, list(data.POSITIONS), scene.position)
        (cx, cy), (dx, dy) = data.POSITIONS[pos], rng.uniform(-data.JITTER, data.JITTER, size=2)
        return data.Scene((replace(objs[0], x=cx + dx, y=cy + dy),), position=pos)
    if fact == "relation":  # the two objects trade places: "A above B" becomes "A below B"
        if len(objs) != 2:
            return None
        a, b = objs
        return data.Scene((replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)), relation=data.INVERSE[scene.relation])
    if fact == "binding":  # the two objects trade colours: "red circle above blue square" -> "blue circle ... red square"
        if len(objs) != 2 or objs[0].color == objs[1].color:
            return None
        a, b = objs
        return replace(scene, objects=(replace(a, color=b.color), replace(b, color=a.color)))
    if fact == "shape_swap":  # the two objects trade shapes: "red circle above blue square" -> "red square ... blue circle"
        if len(objs) != 2 or objs[0].shape == objs[1].shape:
            return None
        a, b = objs
        return replace(scene, objects=(replace(a, shape=b.shape), replace(b, shape=a.shape)))
    if fact == "count":  # one object more (small, in the corner farthest from it) or one less
        if len(objs) == 2:
            return data.Scene((objs[int(rng.integers(2))],))
        (o,) = objs
        x, y = (0.15 if o.x > 0.5 else 0.85), (0.15 if o.y > 0.5 else 0.85)
        shape, color = (o.shape, o.color) if rng.random() < 0.3 else data._free_pair(rng)
        dx, dy = rng.uniform(-0.03, 0.03, size=2)
        return data.Scene((o, data.Obj(shape, color, "small", x + dx, y + dy)))
    raise ConfigError(f"unknown fact {fact!r}; choose from {', '.join(FACTS)}")


def one_fact_changed(scene: data.Scene, caption: str, rng: np.random.Generator, k: int = 1,
                     facts: tuple[str, ...] = FACTS, avoid_heldout: bool = True, tries: int = 8,
                     swap_first: bool = False) -> list[Negative]:
    """Up to k scenes that differ from `scene` in one fact its caption states, each a different fact.

    Each changed scene is checked both ways: the original caption is false of it, and (but for "count")
    its own caption, drawn by `data.caption`, is false of the original. avoid_heldout keeps the changed
    scenes out of the held-out combinations (for training and val), so `heldout` stays zero-shot.
    swap_first: a two-object scene tries the two swaps (SWAPS) first, in random order, until one is made.
    Example: (scene of "a red circle above a blue square", ...) ->
             [Negative("relation", <scene>, "there is a red disc below a blue box"), ...]
    """
    spec = parse_caption(caption)
    order = [facts[j] for j in rng.permutation(len(facts))]
    out: list[Negative] = []
    if swap_first and len(scene.objects) == 2 and k > 0:  # the swaps first, until one is made
        for fact in [f for f in order if f in SWAPS]:
            neg = _negative(fact, scene, spec, rng, avoid_heldout, tries)
            if neg is not None:
                out.append(neg)
                break
    for fact in order:
        if len(out) == k:
            break
        if any(neg.fact == fact for neg in out):
            continue
        neg = _negative(fact, scene, spec, rng, avoid_heldout, tries)
        if neg is not None:
            out.append(neg)
    return out


SWAPS = ("binding", "shape_swap")  # the two facts that exchange something between a scene's two objects


def _negative(fact: str, scene: data.Scene, spec: CaptionSpec, rng, avoid_heldout: bool, tries: int):
    """One scene with `fact` changed that passes one_fact_changed's checks, or None after `tries`."""
    for _ in range(tries):
        new = _changed_scene(fact, scene, spec, rng)
        if new is None:
            return None
        if spec_holds(spec, new) or (avoid_heldout and data.is_heldout(new)):
            continue
        if fact == "count":
            return Negative(fact, new, None)
        text = data.caption(new, rng)
        if not spec_holds(parse_caption(text), scene):  # e.g. a changed size the caption left unsaid
            return Negative(fact, new, text)
    return None


# --- shapes between shapes: superellipses ----------------------------------------------------------------
# Circle, square and diamond are one family: the superellipse |x|^p + |y|^p <= h^p is the diamond at p = 1,
# the circle at p = 2 and the square as p -> inf. A sampled shape is often between two of them (a box with
# round corners, a disc with points), and the judge reads it as the nearest. Where is halfway? Along the
# diagonal a superellipse reaches e = 2^(-1/p) of h: 0.5 (diamond), 0.707 (circle), 1 (square); halfway
# between two shapes' e lies at p = 1.37 (diamond | circle) and p = 4.4 (circle | square). Training images
# can draw their shapes a little off the exact one but well short of halfway (MORPH_KEEP), and each sample
# can bring an image with one shape pushed past halfway toward a neighbour (MORPH_PAST): a rival for its
# caption that tells the reranker how far from a square a square may stray.
MORPH_P = {"diamond": 1.0, "circle": 2.0, "square": math.inf}  # the exact shapes in the family
MORPH_KEEP = {"diamond": [(0.5, 0.56)], "circle": [(0.65, 0.78)], "square": [(0.92, 1.0)]}  # diagonal extent e
MORPH_PAST = {"diamond": [(0.635, 0.75)], "circle": [(0.5, 0.575), (0.885, 0.97)], "square": [(0.70, 0.825)]}


def superellipse_mask(p: float, cx: float, cy: float, side: float, size: int,
                      supersample: int = data.SUPERSAMPLE) -> np.ndarray:
    """Coverage (0..1) of |x|^p + |y|^p <= (side/2)^p on a size x size grid, sampled as data.shape_mask
    samples its shapes. Example: superellipse_mask(1.0, 8, 8, 8, 16) ~ data.shape_mask("diamond", 8, 8, 8, 16)
    """
    coords = (np.arange(size * supersample) + 0.5) / supersample  # sub-pixel centres, in pixel units
    h = side / 2
    x = np.minimum(np.abs(coords[None, :] - cx) / h, 2.0)  # (1, n); past 1 is outside anyway
    y = np.minimum(np.abs(coords[:, None] - cy) / h, 2.0)  # (n, 1)
    # past p = 64 the superellipse is the square to well under a sub-pixel (and x ** p would overflow)
    inside = np.maximum(x, y) <= 1 if p > 64 else x ** p + y ** p <= 1
    inside = np.broadcast_to(inside, (size * supersample,) * 2).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render_morphed(scene: data.Scene, image_size: int, ps: dict[int, float]) -> np.ndarray:
    """data.render, but object k (a key of ps) is drawn as the superellipse of exponent ps[k].
    Example: render_morphed(scene, 32, {0: 3.0}) -> uint8 (32, 32, 3), the first object a rounded square"""
    canvas = np.zeros((image_size, image_size, 3), dtype=np.float32)
    for k, obj in enumerate(scene.objects):
        args = (obj.x * image_size, obj.y * image_size, data.SIZES[obj.size] * image_size, image_size)
        alpha = (superellipse_mask(ps[k], *args) if k in ps else data.shape_mask(obj.shape, *args))[..., None]
        canvas = canvas * (1 - alpha) + np.asarray(data.COLORS[obj.color], np.float32) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _exponent(rng, ranges) -> float:
    """A superellipse exponent whose diagonal extent e = 2^(-1/p) is drawn uniformly from one of the ranges."""
    lo, hi = ranges[int(rng.integers(len(ranges)))]
    e = rng.uniform(lo, hi)
    return math.inf if e >= 1 else -1 / math.log2(e)


def morphs(scene: data.Scene, rng, past: bool) -> dict[int, float] | None:
    """Exponents for render_morphed: every circle, square and diamond a little off (past=False), or one of
    them pushed past halfway toward a neighbouring shape (past=True); None when the scene has none."""
    family = [k for k, o in enumerate(scene.objects) if o.shape in MORPH_P]
    if not family:
        return None
    if past:
        k = family[int(rng.integers(len(family)))]
        return {k: _exponent(rng, MORPH_PAST[scene.objects[k].shape])}
    return {k: _exponent(rng, MORPH_KEEP[scene.objects[k].shape]) for k in family}


BLUR_LEVELS = (0.0, 0.35, 0.7, 1.0)  # augmentation blur sigmas, times strength (px at 32x32)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n, c, H, W) square images, edges replicated: two matrix products
    with the (H, H) blur matrix (on a CPU far faster than a convolution with a one-channel kernel)."""
    size = x.shape[-1]
    r = max(1, math.ceil(2.5 * sigma))
    taps = torch.arange(-r, r + 1)
    k = torch.exp(-0.5 * (taps / sigma) ** 2)
    cols = (torch.arange(size)[:, None] + taps[None]).clamp(0, size - 1)  # (H, 2r + 1): replicated edges
    m = torch.zeros(size, size).index_put_((torch.arange(size)[:, None].expand_as(cols), cols),
                                           (k / k.sum()).expand_as(cols).clone(), accumulate=True)  # (H, H)
    m = m.to(x.dtype)
    return m @ x @ m.T  # rows, then columns


def augment(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A stand-in for a decoder's faults, drawn per image: a Gaussian blur (sigma one of BLUR_LEVELS), a
    per-channel gain of up to +-8% and pixel noise of std up to 0.05, each scaled by `strength`.

    Example: augment(images (8, 3, 32, 32), 1.0, torch.Generator().manual_seed(0)) -> (8, 3, 32, 32) in [0, 1]
    """
    if strength <= 0:
        return images
    n, c, H, W = images.shape
    level = torch.randint(len(BLUR_LEVELS), (n,), generator=generator)  # (n,)
    x = images.clone()
    for k, sigma in enumerate(BLUR_LEVELS):
        chosen = level == k
        if sigma > 0 and chosen.any():
            x[chosen] = _blur(images[chosen], sigma * strength * H / 32)
    gain = 1 + (torch.rand(n, c, 1, 1, generator=generator) * 2 - 1) * 0.08 * strength
    noise = torch.randn(n, c, H, W, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 0.05 * strength)
    return (x * gain + noise).clamp(0, 1)


class ShapesPairs:
    """Reranker batches from ShapesWorld, read by index: `pairs(i)` is batch i (exact resume).

    The first n samples of a split are rendered once, each with `negatives` one-fact-changed scenes
    (`one_fact_changed`) and `morph_negatives` images with a shape morphed past halfway (`morphs`; its
    own image, with chance `morph_jitter`, a little off the exact shapes), and held as uint8. Batch i takes
    batch_size samples from a fresh permutation per epoch (seeded by seed + epoch), their rivals with them,
    and (training) an augmentation seeded by i: (images float (P + E, 3, H, W), ids long (P, T)), the E
    image-only rivals (a changed count, a morphed shape) last.
    """

    def __init__(self, split: str, n: int, image_size: int, data_seed: int, tok: Tokenizer, layout: Layout,
                 batch_size: int, negatives: int = 0, strength: float = 0.0, seed: int = 0, shuffle: bool = True,
                 progress: bool = False, morph_negatives: int = 0, morph_jitter: float = 0.0):
        from tqdm.auto import tqdm

        from ..model import caption_ids

        if n < 1:
            raise DataError(f"reranker pairs need at least one sample of {split}; got n={n}")
        ds = data.ShapesWorld(split, image_size, data_seed, n)
        self.n, self.batch_size, self.strength, self.seed, self.shuffle = n, batch_size, strength, seed, shuffle
        slots, T = 1 + negatives + morph_negatives, layout.text_len
        blank_image, blank_ids = np.zeros((image_size, image_size, 3), np.uint8), [0] * T
        images, ids, kind = [], [], []  # slot by slot: (n * slots) of each
        self.facts: list[list[str]] = []  # the facts changed for each sample, in slot order
        for j in tqdm(range(n), desc=f"rendering {split} pairs", disable=not progress):
            scene, text = ds.example(j)
            rng = np.random.default_rng([data_seed, 7, data._SPLIT_IDS[split], j])
            found = (one_fact_changed(scene, text, rng, negatives, avoid_heldout=split != "heldout", swap_first=True)
                     if negatives else [])
            self.facts.append([neg.fact for neg in found])
            entries = [(scene, text, morphs(scene, rng, past=False) if rng.random() < morph_jitter else None)]
            entries += [(neg.scene, neg.caption, None) for neg in found]
            for _ in range(morph_negatives):
                ps = morphs(scene, rng, past=True)
                if ps is not None:
                    entries.append((scene, None, ps))
                    self.facts[-1].append("morph")
            for sc, cap, ps in entries:
                images.append(render_morphed(sc, image_size, ps) if ps else data.render(sc, image_size))
                ids.append(caption_ids(tok, cap, layout)[0] if cap is not None else blank_ids)
                kind.append(0 if cap is not None else 1)
            for _ in range(slots - len(entries)):  # fewer rivals could be made: the slot stays empty
                images.append(blank_image), ids.append(blank_ids), kind.append(-1)
        self.images = torch.from_numpy(np.stack(images)).view(n, slots, image_size, image_size, 3)  # uint8
        self.ids = torch.tensor(ids, dtype=torch.long).view(n, slots, T)
        self.kind = torch.tensor(kind, dtype=torch.int8).view(n, slots)  # 0: a pair, 1: an image only, -1: empty
        self._perm: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def _index(self, samples: range) -> torch.Tensor:
        out = []
        for s in samples:
            epoch, j = divmod(s, self.n)
            if not self.shuffle:
                out.append(j)
                continue
            if epoch not in self._perm:
                self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            out.append(int(self._perm[epoch][j]))
        return torch.tensor(out)

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._index(range(i * self.batch_size, (i + 1) * self.batch_size))
        kind, images, ids = self.kind[idx].flatten(), self.images[idx].flatten(0, 1), self.ids[idx].flatten(0, 1)
        pair, extra = kind == 0, kind == 1
        x = torch.cat([images[pair], images[extra]]).permute(0, 3, 1, 2).float() / 255  # (P + E, 3, H, W)
        if self.strength > 0:
            x = augment(x, self.strength, torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        return x, ids[pair]  # (P + E, 3, H, W), (P, T)


class _Collate:
    """DataLoader items (uint8 (H, W, 3), caption) -> a reranker batch (images float (B, 3, H, W), ids (B, T))."""

    def __init__(self, tok: Tokenizer, layout: Layout):
        self.tok, self.layout = tok, layout

    def __call__(self, items):
        from ..model import caption_ids

        images = torch.stack([im for im, _ in items]).permute(0, 3, 1, 2).float() / 255
        ids = torch.tensor([caption_ids(self.tok, str(c), self.layout, truncate=True)[0] for _, c in items])
        return images, ids


def build_clip_pairs(cfg: Config, tok: Tokenizer, progress: bool = True, log: Callable[[str], None] = print):
    """(training batches, validation batches or None): ShapesPairs for ShapesWorld (with hard negatives),
    else a DataLoader over the dataset's pairs (in-batch negatives only); its validation batches are the
    held-out emoji (the first data.n_heldout), and None for folders and shards (no evaluation split)."""
    from ..data import build_dataset
    from .image_tokenizer import needs_shuffle

    c, tc, layout = cfg.clip, cfg.clip_train, Layout(cfg.text.text_len, cfg.text.vocab_size, 1, 1)
    if cfg.data.dataset != "shapes":
        collate = _Collate(tok, layout)
        ds = build_dataset(cfg.data, "train")
        # The folder and tar datasets shuffle themselves by seed and epoch (train.set_epoch); the emoji,
        # sorted by caption, are shuffled here, else every epoch would hold the same batches.
        train = torch.utils.data.DataLoader(ds, batch_size=tc.batch_size, drop_last=True, collate_fn=collate,
                                            shuffle=needs_shuffle(ds))
        if cfg.data.dataset != "emoji":
            return train, None
        held = _first(build_dataset(cfg.data, "heldout"), cfg.data.n_heldout)
        val = torch.utils.data.DataLoader(held, batch_size=min(tc.batch_size, len(held)), collate_fn=collate)
        return train, val
    n = min(c.train_pairs, cfg.data.n_train)
    t0 = time.perf_counter()
    train = ShapesPairs("train", n, cfg.data.image_size, cfg.data.seed, tok, layout, tc.batch_size,
                        c.hard_negatives, c.augment, tc.seed, shuffle=True, progress=progress,
                        morph_negatives=c.morph_negatives, morph_jitter=c.morph_jitter)
    val = ShapesPairs("val", min(cfg.data.n_val, tc.batch_size * tc.eval_batches), cfg.data.image_size,
                      cfg.data.seed, tok, layout, tc.batch_size, c.hard_negatives, 0.0, tc.seed, shuffle=False,
                      morph_negatives=c.morph_negatives)
    log(f"[train clip] rendered {n} training pairs with {int((train.kind >= 0).sum()) - n} rivals (one fact changed, "
        f"or a shape morphed) and {len(val)} val pairs in {time.perf_counter() - t0:.1f} s")
    return train, val




def _first(dataset, n: int):
    """The first n items of a map-style dataset (all of them when it has fewer)."""
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
