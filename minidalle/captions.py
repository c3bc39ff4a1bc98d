"""Caption parsing: read a ShapesWorld-style caption back into a structured spec.

This is the inverse of `data.caption`: data.py turns a Scene into words through its phrase tables
(SHAPE_WORDS, COLOR_WORDS, SIZE_WORDS, POSITION_WORDS, RELATION_WORDS) and templates; this module
turns those words back into the facts they state, so the judge (`minidalle.judge`) can check each
one against an image, as GenEval and T2I-CompBench do for DALL·E-style models (Ramesh et al. 2021).

    "a small red disc above a blue box"
        --words, longest phrase first--> [size small, color red, shape circle, relation above, ...]
        --adjectives wait for their noun--> CaptionSpec(objects=(ObjectSpec(...), ...), relation="above")

    parse_caption("a big red circle on the left").position -> "left"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import data
from .errors import MinidalleError


class CaptionError(MinidalleError, ValueError):
    """A caption the judge cannot read: unknown words, or not one/two objects."""


@dataclass(frozen=True)
class ObjectSpec:
    shape: str  # one of data.SHAPES
    color: str | None = None  # one of data.COLORS, None when the caption does not say
    size: str | None = None  # "small" | "big", None when the caption does not say


@dataclass(frozen=True)
class CaptionSpec:
    objects: tuple[ObjectSpec, ...]  # 1 or 2, in caption order
    position: str | None = None  # one object: a key of data.POSITIONS (None if unstated)
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]
    text: str = ""  # the caption it came from, for error messages

    @staticmethod
    def from_scene(scene: data.Scene) -> "CaptionSpec":
        """Every fact of a true scene, size included. Example: Scene(...) -> CaptionSpec(...)"""
        objs = tuple(ObjectSpec(o.shape, o.color, o.size) for o in scene.objects)
        return CaptionSpec(objs, scene.position, scene.relation, text="<scene>")


def _phrase_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """Every phrase data.py can write, as word tuples -> (kind, value).

    Example: ("on", "the", "left", "of") -> ("relation", "left of")
    """
    table = {}
    for kind, words in (("shape", data.SHAPE_WORDS), ("color", data.COLOR_WORDS),
                        ("size", data.SIZE_WORDS), ("position", data.POSITION_WORDS),
                        ("relation", data.RELATION_WORDS)):
        for value, phrases in words.items():
            for phrase in phrases:
                table[tuple(phrase.split())] = (kind, value)
    return table


# data.py's word tables are constants, so the phrase table is built once, at import.
_PHRASES = _phrase_table()
_LONGEST = max(len(k) for k in _PHRASES)  # words in the longest phrase ("at the top of the picture": 6)

# Words that carry no fact: articles and template glue ("there is a ...", "two shapes: ...").
_FILLER = frozenset("a an the one there is are picture image photo of placed two shapes and with".split())


def _words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped. Example: "Two shapes: a Red DISC!" -> ["two", "shapes", "a", "red", "disc"]"""
    return re.sub(r"[^a-z]+", " ", text.lower()).split()


SHOWN_CHARS = 80  # of a caption an error message quotes: a 10,000-character caption is not one line of output


def _error(text: str, problem: str) -> CaptionError:
    """Every caption error names the caption first (its first SHOWN_CHARS characters and its length when
    longer), then the problem. Example: ("", "x") -> CaptionError("caption '': x")"""
    shown = repr(text) if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]!r}... ({len(text):,} characters)"
    return CaptionError(f"caption {shown}: {problem}")


def parse_caption(text: str) -> CaptionSpec:
    """Structured facts of a caption; raises CaptionError when it cannot be read.

    Longest phrase first, so "on the left of" (a relation) beats "on the left" (a position).
    Example: "a small red disc above a blue box" ->
        CaptionSpec((ObjectSpec("circle", "red", "small"), ObjectSpec("square", "blue")), relation="above")
    """
    words, i, items, unknown = _words(text), 0, [], []
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            if (phrase := tuple(words[i:i + n])) in _PHRASES:
                items.append(_PHRASES[phrase])
                i += n
                break
        else:
            if words[i] not in _FILLER:
                unknown.append(words[i])
            i += 1
    if unknown:
        shown = sorted(set(unknown), key=unknown.index)
        shown = f"{shown[:8]}" + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
        raise _error(text, f"unknown words {shown}; the judge reads ShapesWorld captions "
                           f"(shapes {', '.join(data.SHAPES)}; colours {', '.join(data.COLORS)})")
    return _assemble(items, text)


def _assemble(items: list[tuple[str, str]], text: str) -> CaptionSpec:
    """Group parsed phrases into objects: adjectives wait for the shape noun that closes them.

    Example: [("color", "red"), ("shape", "circle"), ("position", "left")] ->
        CaptionSpec((ObjectSpec("circle", "red"),), position="left")
    """
    objects, pending, position, relation, relation_at = [], {}, None, None, None
    for kind, value in items:
        if kind in ("color", "size"):
            if kind in pending:
                raise _error(text, f"two {kind} words for one object")
            pending[kind] = value
        elif kind == "shape":
            objects.append(ObjectSpec(value, pending.get("color"), pending.get("size")))
            pending = {}
        elif kind == "position":
            position = value
        elif relation is None:
            relation, relation_at = value, len(objects)
        else:
            raise _error(text, "more than one relation")
    if pending:
        raise _error(text, f"{' '.join(pending.values())!r} describes no shape")
    if len(objects) == 1 and relation is None:
        return CaptionSpec(tuple(objects), position=position, text=text)
    if len(objects) == 2 and relation is not None and relation_at == 1 and position is None:
        return CaptionSpec(tuple(objects), relation=relation, text=text)
    raise _error(text, f"expected one shape (with an optional position) or two shapes joined by a "
                       f"relation such as 'left of'; found {len(objects)} shape(s), relation "
                       f"{relation!r}, position {position!r}")
