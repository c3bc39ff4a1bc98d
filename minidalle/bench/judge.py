"""How well the judge reads images: renders clean, degraded and heavily degraded, and captions made wrong.

    result = benchmark(n=1000, seed=0)        # `python -m minidalle bench judge`: accuracy and rejection per split
    print(format_benchmark(result))

For each split it renders n scenes, degrades them under each of CONDITIONS (blur, noise, a colour
cast, chroma bleed: what a dVAE decoder does to an image), and checks that `judge` accepts the true
caption (accuracy per attribute) and refuses `wrong_specs` (the same caption with one fact changed:
rejection). The figures are in judge.py's docstring; the judge itself is judge.py.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .. import data
from ..captions import CaptionSpec
from ..errors import DataError
from ..judge import CHECKS, _accuracy, _verdict, degrade, detect, to_spec


# to build, 256 px ~19 s and ~680 MB; ShapesWorld images and this project's generations are <= 64 px


# --- wrong captions: a judge that always says yes must fail ----------------------------------------
WRONG = ("color", "shape", "size", "position", "relation")  # the facts wrong_specs() falsifies


def _describe(spec: CaptionSpec) -> str:
    """A plain caption for a fully stated spec, which parse_caption reads back to the same facts.
    Example: CaptionSpec((ObjectSpec("circle", "red", "big"),), position="left") -> "a big red circle on the left"
    """
    nouns = [f"a {o.size} {o.color} {o.shape}" for o in spec.objects]  # "a small", "a big": no "an"
    if spec.relation is None:
        return f"{nouns[0]} {data.POSITION_WORDS[spec.position][0]}"
    return f"{nouns[0]} {spec.relation} {nouns[1]}"


def wrong_specs(scene: data.Scene, rng: np.random.Generator) -> dict[str, CaptionSpec]:
    """Specs that contradict a true scene in exactly one fact: {fact: CaptionSpec}.

    Starting from every fact of the scene (CaptionSpec.from_scene), each entry changes one:
    "color", "shape", "size" of one object picked at random (another palette colour, another
    shape, the other size); "position" of a lone object (another anchor); "relation" of a pair
    (its inverse, "A left of B" -> "A right of B"), left out for two identical objects, where
    the swapped caption is true as well. Each one is false of the scene (the objects it names,
    or where it puts them, differ from those drawn), so a judge should reject every one; one
    that accepts everything scores 0.
    Example: (scene of a big red circle on the left, rng) ->
        {"color": spec of "a big blue circle on the left", "shape": "... red diamond ...",
         "size": "a small red circle on the left", "position": "a big red circle at the top"}
    """
    truth = CaptionSpec.from_scene(scene)

    def other(options, current):  # a random option that is not the current one
        rest = [o for o in options if o != current]
        return rest[int(rng.integers(len(rest)))]

    def one_object_changed(attr: str, values) -> CaptionSpec:
        objs = list(truth.objects)
        i = int(rng.integers(len(objs)))
        objs[i] = replace(objs[i], **{attr: other(values, getattr(objs[i], attr))})
        return replace(truth, objects=tuple(objs))

    wrong = {"color": one_object_changed("color", list(data.COLORS)),
             "shape": one_object_changed("shape", data.SHAPES),
             "size": one_object_changed("size", list(data.SIZES))}
    if truth.position is not None:
        wrong["position"] = replace(truth, position=other(list(data.POSITIONS), truth.position))
    if truth.relation is not None and truth.objects[0] != truth.objects[1]:
        wrong["relation"] = replace(truth, relation=data.INVERSE[truth.relation])
    return {attr: replace(spec, text=_describe(spec)) for attr, spec in wrong.items()}


def _rejections(verdicts: list[dict]) -> dict:
    """How often wrong captions are turned down, from one {fact: Verdict} per image (the
    verdicts on its `wrong_specs`). "overall" and each fact: the fraction judged not ok;
    "on_check": the fraction where the changed fact's own check said False, i.e. rejected for
    the right reason; "tried": wrong captions per fact (position: lone objects, relation: pairs).
    Example: [{"color": Verdict(ok=False, checks={"color": False, ...})}] ->
        {"overall": 1.0, "color": 1.0, "shape": None, ..., "n": 1, "tried": {"color": 1, ...},
         "on_check": {"overall": 1.0, "color": 1.0, "shape": None, ...}}
    """
    out, on_check, tried = {}, {}, {}
    for attr in WRONG:
        vs = [v[attr] for v in verdicts if attr in v]
        tried[attr] = len(vs)
        out[attr] = float(np.mean([not v.ok for v in vs])) if vs else None
        on_check[attr] = float(np.mean([v.checks[attr] is False for v in vs])) if vs else None
    every = [(attr, v) for vd in verdicts for attr, v in vd.items()]
    if not every:
        raise DataError("no wrong captions to judge: a rejection rate needs at least one")
    out["overall"] = float(np.mean([not v.ok for _, v in every]))
    on_check["overall"] = float(np.mean([v.checks[a] is False for a, v in every]))
    return {"overall": out.pop("overall"), **out, "n": len(every), "tried": tried, "on_check": on_check}


# Degradation strengths the benchmark reports: the default stand-in for a small decoder's faults,
# and a heavier one that shows where the judge starts to fail (mostly a small circle read as a
# diamond: at 32x32 it is 8 px across, and blur rounds a diamond's corners off).
CONDITIONS = {
    "clean": None,
    "degraded": {},
    "heavy": {"blur": 1.2, "noise": 20.0, "jitter": 0.10, "bleed": 1.0},
}


def benchmark(n: int = 1000, image_size: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """The judge on n renders of each of `val` and `heldout`, clean and under each of the
    `CONDITIONS` degradations, both ways round:

    - accuracy: each image against its own caption, which is true, so every one should pass;
    - rejection: each image against its `wrong_specs` (one fact changed), which should all fail.

    A judge that always says yes scores 1.0 on the first and 0.0 on the second; one that always
    says no, the reverse. Each image is detected once and checked against all its captions, so
    the negatives add little time; `ms_per_image` is detection plus all checks. The result is
    plain JSON (the CLI dumps it).
    Example: benchmark(200) -> {"clean": {"val": {"overall": 1.0, ...}, "heldout": {...}},
                                "degraded": {...}, "heavy": {...},
                                "rejects": {"clean": {"val": {"overall": 1.0, "color": 1.0, ...}, ...}, ...},
                                "n": 200, "ms_per_image": 1.9, ...}
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise DataError(f"benchmark needs n >= 1 images per split; got n={n}")
    splits = ("val", "heldout")
    result, rejects, seconds = {kind: {} for kind in CONDITIONS}, {kind: {} for kind in CONDITIONS}, 0.0
    rng = np.random.default_rng(seed)  # degradations: the same images as before negatives existed
    wrong_rng = np.random.default_rng([seed, 1])  # which fact values the wrong captions use
    for split in splits:
        ds = data.ShapesWorld(split, image_size, seed, n)
        examples = [ds.example(i) for i in range(n)]
        clean = [data.render(scene, image_size) for scene, _ in examples]
        specs = [to_spec(text) for _, text in examples]
        wrong = [wrong_specs(scene, wrong_rng) for scene, _ in examples]
        for kind, strength in CONDITIONS.items():
            images = clean if strength is None else [degrade(im, rng, **strength) for im in clean]
            t0 = time.perf_counter()
            dets = [detect(im) for im in tqdm(images, desc=f"{kind} {split}", disable=not progress)]
            result[kind][split] = _accuracy([_verdict(s, d) for s, d in zip(specs, dets)])
            rejects[kind][split] = _rejections([{attr: _verdict(w, d) for attr, w in ws.items()}
                                                for ws, d in zip(wrong, dets)])
            seconds += time.perf_counter() - t0
    judged = n * len(splits) * len(CONDITIONS)
    return {**result, "rejects": rejects, "n": n, "image_size": image_size, "seed": seed,
            "seconds": seconds, "ms_per_image": 1000 * seconds / max(judged, 1)}


def format_benchmark(result: dict) -> str:
    """A benchmark() result as two small text tables, one row per condition and split: accuracy
    on true captions, then the rejection rate of wrong ones ("on check": rejected by the changed
    fact's own check, not only by some other failing check)."""
    def table(rows: dict, columns, extra=None) -> list[str]:
        lines = [f"{'condition':<18}" + "".join(f"{c:>10}" for c in columns + ((extra[0],) if extra else ()))]
        for kind in CONDITIONS:
            for split, r in rows[kind].items():
                vals = [r[c] for c in columns] + ([extra[1](r)] if extra else [])
                cells = "".join(f"{'-':>10}" if v is None else f"{v:>10.3f}" for v in vals)
                lines.append(f"{kind + ' ' + split:<18}" + cells)
        return lines

    lines = ["accuracy on true captions"] + table(result, ("overall",) + CHECKS)
    lines += ["", "wrong captions rejected (one fact changed)"]
    lines += table(result["rejects"], ("overall",) + WRONG, ("on check", lambda r: r["on_check"]["overall"]))
    lines.append(f"{result['image_size']}x{result['image_size']}, n={result['n']} images per row "
                 f"(wrong captions: up to {len(WRONG) - 1} per image), {result['ms_per_image']:.2f} ms per image")
    return "\n".join(lines)
