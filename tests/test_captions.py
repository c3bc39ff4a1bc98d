"""Tests for minidalle.captions: ShapesWorld captions read back into CaptionSpecs.

The parser is the inverse of data.caption, so the tests run it over everything data.py can write
(every split, template, synonym, position and relation phrase) and pin its error messages.
"""

import re

import pytest

from minidalle import data
from minidalle.captions import CaptionError, CaptionSpec, ObjectSpec, parse_caption
from minidalle.errors import MinidalleError


# --- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", data.SPLITS)
def test_parse_round_trip_over_generated_captions(split):
    ds = data.ShapesWorld(split, 32, seed=7)
    texts = []
    for i in range(1500):
        scene, text = ds.example(i)
        texts.append(text)
        spec = parse_caption(text)
        assert len(spec.objects) == len(scene.objects), text
        for o, s in zip(scene.objects, spec.objects):
            assert (s.shape, s.color) == (o.shape, o.color), text
            assert s.size in (None, o.size), text
        assert (spec.position, spec.relation) == (scene.position, scene.relation), text
    if split == "train":  # the sample is large enough to use every synonym and phrase at least once
        corpus = " | ".join(texts)
        tables = (data.SHAPE_WORDS, data.COLOR_WORDS, data.SIZE_WORDS, data.POSITION_WORDS, data.RELATION_WORDS)
        for table in tables:
            for phrase in (p for phrases in table.values() for p in phrases):
                assert re.search(rf"\b{phrase}\b", corpus), phrase


def test_parse_every_template_with_every_position_and_relation_phrase():
    for template in data.ONE_TEMPLATES:
        for position, phrases in data.POSITION_WORDS.items():
            for phrase in phrases:
                spec = parse_caption(template.format(obj="little violet rhombus", pos=phrase))
                assert spec == CaptionSpec((ObjectSpec("diamond", "purple", "small"),), position, text=spec.text)
    for template in data.TWO_TEMPLATES:
        for relation, phrases in data.RELATION_WORDS.items():
            for phrase in phrases:
                spec = parse_caption(template.format(a="huge turquoise disk", rel=phrase, b="block"))
                assert spec.objects == (ObjectSpec("circle", "cyan", "big"), ObjectSpec("square"))
                assert spec.relation == relation


def test_parse_hand_worked_and_tolerant_of_case_and_punctuation():
    spec = parse_caption("  Two shapes: a Small RED disc, ON TOP OF a blue Box!! ")
    assert spec.objects == (ObjectSpec("circle", "red", "small"), ObjectSpec("square", "blue", None))
    assert spec.relation == "above" and spec.position is None
    # longest phrase wins: "on the left of" is a relation, "on the left" a position
    assert parse_caption("a red circle on the left").position == "left"
    assert parse_caption("a red circle on the left of a green box").relation == "left of"
    assert parse_caption("an orange triangle").position is None  # position may be unstated


@pytest.mark.parametrize("text, fragment", [
    ("a red hexagon on the left", "hexagon"),
    ("a gigantic red circle", "gigantic"),
    ("a red circle and a blue square", "relation"),  # two shapes, no relation
    ("a red circle above", "relation"),  # a relation with one shape
    ("red on the left", "describes no shape"),
    ("a red blue circle", "two color words"),
    ("a red circle above a blue square below a green disc", "more than one relation"),
    ("", "found 0 shape"),
])
def test_parse_errors_name_the_caption_and_the_problem(text, fragment):
    with pytest.raises(CaptionError) as err:
        parse_caption(text)
    assert fragment in str(err.value) and repr(text) in str(err.value)
    assert isinstance(err.value, MinidalleError)
