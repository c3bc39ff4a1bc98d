"""Real captioned images, one at a time: robust image loading, caption files, and counting what is skipped and why.

DALL·E (Ramesh et al. 2021, section 2.3) trains on 250M scraped image-text pairs. Scraped data is
dirty, so this file is mostly about *bad input*: every loader built on it turns a file into the project's
sample -- `(image, caption)` with `image` a `torch.uint8` tensor of shape (H, W, 3), H = W =
image_size, and `caption` a `str` -- or skips it, counts it by reason and says so. Nothing bad kills
a run, and nothing is dropped silently:

  one image   bytes -> load_image -> center square crop -> LANCZOS resize -> uint8 (H, W, 3)
  captions    bytes -> read_captions (UTF-8 lines, stripped, empties dropped, cut to 1024 characters)
              -> pick one per epoch
  bookkeeping SkipStats counts skips per reason; past `data.max_skip_rate` it raises DataError

The datasets built on this (folders.py, shards.py and emoji.py, which all reuse SkipStats):
  FolderDataset    root/**/cat.jpg + root/**/cat.txt                 (IterableDataset)
  TarShardDataset  shard-000.tar with members 0001.jpg, 0001.txt, ...  (IterableDataset, streamed)

Folder and tar are iterable rather than map-style because a bad file can then simply be left out
(a map-style `__getitem__` must return *something* for every index). Both split their files or
shards so that each one is read by exactly one (rank, DataLoader worker): see `split_for_consumer`.

Workers and skip counts: each DataLoader worker process keeps its own `SkipStats` for its share, checks
the threshold on it and logs its own report at the end of its pass; `dataset.skip_stats` in the main
process holds the whole count only when `num_workers=0`.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Pillow's own decompression-bomb threshold (about 9459 x 9459). A crafted PNG of 100 bytes can
# claim 100000 x 100000 pixels and ask for 30 GB of RAM; we refuse before decoding anything that big.
MAX_PIXELS = 89_478_485
# Longest caption line kept, in characters. The paper gives the text 256 BPE tokens, which at roughly
# 4 characters per token is about 1024 characters: far above any real caption, yet it stops one
# scraped 1,000,000-character line (a whole web page) from reaching the tokenizer in one piece.
MAX_CAPTION_CHARS = 1024
SKIP_REASONS = {
    "empty_file": "zero-byte file",
    "unreadable_file": "the file could not be read from disk",
    "unreadable_image": "not an image Pillow can decode (garbage, unsupported format)",
    "truncated_image": "the image data ends early",
    "too_many_pixels": "more pixels than max_pixels (decompression-bomb guard)",
    "missing_caption": "no caption file (cat.jpg needs cat.txt) or no .txt member in the tar",
    "empty_caption": "the caption file has no usable line (all empty or invalid UTF-8)",
    "missing_image": "a tar sample with a caption but no image member",
    "bad_shard": "a tar shard that is cut short or corrupt; counts the samples it lost, an estimate from the "
                 "sizes of the other shards (the rest of the shard is lost)",
    # raised by emoji.py, which shares this bookkeeping
    "not_in_font": "the OpenMoji font has no glyph for this emoji",
    "blank_render": "the glyph rendered as nothing",
}


# Reasons whose count is partly guessed: how many samples a cut-short shard held is unknown.
ESTIMATED = {"bad_shard": " samples lost (an estimate from the sizes of the other shards)"}


# --- one image: bytes -> uint8 (H, W, 3) ----------------------------------------------------------


class BadImageError(DataError):
    """An image that cannot be used; `.reason` is one of the keys of `SKIP_REASONS`."""

    def __init__(self, where: str, problem: str, reason: str = "unreadable_image"):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem, self.reason = where, problem, reason


def load_image(source: bytes | str | os.PathLike, image_size: int | None, *,
               max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode an image file (path or bytes) into a uint8 (image_size, image_size, 3) tensor.

    Any mode becomes RGB (transparent pixels are composited onto black, 16-bit is scaled, not clipped),
    EXIF rotation is applied, the centre square is cropped and resized with LANCZOS (the filter of
    OpenAI's DALL·E preprocessing). `image_size=None` keeps the image's own size and shape (used to
    judge generated images as they are). Raises BadImageError (a DataError) with a `.reason` otherwise.
    Example: a 40x20 PNG, image_size=16 -> tensor of shape (16, 16, 3), dtype torch.uint8
             a 40x20 PNG, image_size=None -> tensor of shape (20, 40, 3)
    """
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BadImageError(name, str(e), "unreadable_file") from None
    if not data:
        raise BadImageError(name, "zero-byte file", "empty_file")
    try:
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we want an error every time.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size  # read from the header: nothing is decoded yet
                if w * h > max_pixels:
                    raise BadImageError(name, f"{w}x{h} = {w * h:,} pixels is more than max_pixels="
                                        f"{max_pixels:,} (decompression-bomb guard)", "too_many_pixels")
                # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale straight from the DCT,
                # never smaller than image_size. A 4000x3000 photo -> 64 px: 32 ms instead of 77 ms.
                if image_size is not None:
                    im.draft("RGB", (image_size, image_size))
                im.load()
                out = _to_rgb(_upright(im))
                if image_size is not None:
                    out = _square_resize(out, image_size)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(name, str(e), "too_many_pixels") from None
    except UnidentifiedImageError:  # Pillow's own message only names an anonymous BytesIO
        raise BadImageError(name, f"not a known image format (starts {data[:8]!r})", "unreadable_image") from None
    except Exception as e:  # noqa: BLE001 -- corrupt files raise anything from OSError to IndexError
        text = str(e).lower()
        truncated = isinstance(e, EOFError) or "truncated" in text or "broken data stream" in text
        raise BadImageError(name, f"{type(e).__name__}: {e}",
                            "truncated_image" if truncated else "unreadable_image") from None
    return torch.from_numpy(np.array(out, dtype=np.uint8))  # (H, W, 3)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos are stored sideways plus a "rotate me" flag)."""
    try:
        if im.getexif().get(0x0112, 1) != 1:  # 0x0112 = Orientation; skip the copy when upright
            return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 -- broken EXIF is not worth losing the picture over
        pass
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB". Transparent pixels become black.

    Example: an "LA" pixel (200, alpha 0) -> (0, 0, 0); an "I;16" pixel 65535 -> (255, 255, 255)
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey. Pillow's convert("RGB") *clips* at 255, so everything above 1/256 of the range
        # would come out white; scale 0..65535 down to 0..255 instead.
        a = np.asarray(im).astype(np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("P", "PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")  # a palette may carry a transparent index; make alpha explicit
    if im.mode == "RGBA":
        # Black (documented in datasets/folder/README.md): a transparent pixel has no colour, so it
        # gets the zero value rather than an invented paper-white. Emoji differ on purpose: see
        # emoji.render_emoji, whose black outlines need a white background.
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F


def _square_resize(im: Image.Image, size: int) -> Image.Image:
    """Crop the centred square and resize it to (size, size).

    `box=` crops inside the resize (no intermediate image) and `reducing_gap=3.0` first shrinks by an
    integer factor with a box filter, then LANCZOS does the rest: much faster on big photos and, per
    Pillow's docs, indistinguishable from a full LANCZOS in most cases at a gap of 3.
    Example: 40x20 -> the middle 20x20 -> size x size
    """
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.resize((size, size), Image.Resampling.LANCZOS,
                     box=(left, top, left + side, top + side), reducing_gap=3.0)


# --- captions -------------------------------------------------------------------------------------


def read_captions(data: bytes) -> tuple[list[str], int, int]:
    """Split a caption file into usable lines; also return how many lines were not valid UTF-8 and
    how many were cut to MAX_CAPTION_CHARS.

    Lines are decoded one by one, so one bad byte costs one line, not the file. Whitespace is
    stripped and runs of it collapsed; empty lines are dropped; a line still longer than
    MAX_CAPTION_CHARS (1024) characters keeps its first 1024.
    Example: b"a cat\\r\\n\\n  a  dog \\n\\xff\\xfe\\n" -> (["a cat", "a dog"], 1, 0)
             b"x" * 5000 -> (["x" * 1024], 0, 1)
    """
    if data.startswith(codecs.BOM_UTF8):  # Windows Notepad writes one
        data = data[len(codecs.BOM_UTF8):]
    lines, invalid, cut = [], 0, 0
    for raw in data.splitlines():  # bytes.splitlines: \n, \r\n and \r only
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
            continue
        text = " ".join(text.split())
        if len(text) > MAX_CAPTION_CHARS:
            text, cut = text[:MAX_CAPTION_CHARS].rstrip(), cut + 1
        if text:
            lines.append(text)
    return lines, invalid, cut


def pick_caption(lines: Sequence[str], seed: int, epoch: int, key: str) -> str:
    """Pick one caption, the same for the same (seed, epoch, key) in every process and run.

    A string seed goes through SHA-512 inside `random.Random`, unlike `hash()`, which changes per
    process (PYTHONHASHSEED), so DataLoader workers and reruns agree.
    Example: (["a cat", "a kitten"], 0, 0, "pets/cat.jpg") -> one of them, always the same one
    """
    return random.Random(f"{seed}/{epoch}/{key}").choice(list(lines))


# --- bad-input bookkeeping ------------------------------------------------------------------------


class SkipWarning(UserWarning):
    """End-of-pass summary of the files a dataset skipped (or of caption lines it dropped)."""


@dataclass
class SkipStats:
    """Counts of kept and skipped items by reason, with the abort rule of `data.max_skip_rate`.

    The rate is only checked after `min_files` items, so one bad first file cannot abort a run, and
    once more when the pass ends (`finish`), where the rate is exact.
    Example: 3 kept + skip("truncated_image", "a.jpg") -> seen 4, rate 0.25, report() names a.jpg
    """

    dataset: str  # who is counting, e.g. "folder dataset /data/pets"; goes into every message
    max_skip_rate: float = 0.05  # abort when skipped / seen goes above this (1.0 never aborts)
    min_files: int = 100  # items to see before the rate may abort a pass midway
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> items skipped
    notes: Counter = field(default_factory=Counter)  # non-fatal: e.g. invalid_utf8_line -> lines dropped
    examples: dict = field(default_factory=dict)  # reason -> first few "path: error" strings

    def __post_init__(self):
        if not 0.0 <= self.max_skip_rate <= 1.0:  # also refuses NaN, which would never abort
            raise DataError(f"data.max_skip_rate={self.max_skip_rate!r} must be between 0 and 1 "
                            "(0 = abort on the first bad file, 1 = never abort)")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def kept(self) -> int:
        return self.seen - self.n_skipped

    @property
    def rate(self) -> float:
        return self.n_skipped / self.seen if self.seen else 0.0

    def keep(self) -> None:
        self.seen += 1

    def skip(self, reason: str, where: object, error: object = None, n: int = 1) -> None:
        """Count `n` skipped items (one file, or the n samples a bad shard lost); may raise DataError
        when the rate is over the threshold.

        Example: skip("bad_shard", "b.tar", "ReadError: ...", n=7) -> seen += 7, skipped["bad_shard"] += 7
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"SkipStats.skip({reason!r}, {where!r}): n={n!r} must be a positive int")
        # The first of each reason is a warning (the user sees it right away), the rest are debug.
        log = logger.debug if self.skipped[reason] else logger.warning
        self.seen += n
        self.skipped[reason] += n
        self._remember(reason, where, error)
        log("%s: skipped %s%s (%s)%s", self.dataset, where, f" ({n} items)" if n > 1 else "", reason,
            f": {error}" if error else "")
        self.check()

    def note(self, what: str, where: object, n: int = 1) -> None:
        """Count something dropped that did not cost a sample (e.g. one invalid caption line)."""
        self.notes[what] += n
        self._remember(what, where, None)

    def _remember(self, key: str, where: object, error: object) -> None:
        examples = self.examples.setdefault(key, [])
        if len(examples) < 3:
            examples.append(f"{where}: {error}" if error else str(where))

    def check(self, final: bool = False) -> None:
        """Raise DataError if the skip rate is over `max_skip_rate` (midway only after `min_files`)."""
        if self.seen and self.rate > self.max_skip_rate and (final or self.seen >= self.min_files):
            raise DataError(
                f"{self.dataset}: {self.n_skipped} of {self.seen} items skipped ({self.rate:.1%}), more "
                f"than data.max_skip_rate={self.max_skip_rate:g}. {self._details()}. Fix or remove the "
                f"bad files, or raise the limit (e.g. --data.max_skip_rate=0.2) if this is expected.")

    def report(self) -> str:
        """One readable paragraph: kept / seen, the count per reason and a few example files.

        Example: "folder dataset /d: kept 9 of 10 items, skipped 1 (10.0%): truncated_image 1 (e.g. /d/a.jpg: ...)"
        """
        text = f"{self.dataset}: kept {self.kept} of {self.seen} items, skipped {self.n_skipped} ({self.rate:.1%})"
        return text + (f": {self._details()}" if self.skipped or self.notes else "")

    def _details(self) -> str:
        parts = [f"{reason} {n}{ESTIMATED.get(reason, '')} (e.g. {'; '.join(self.examples.get(reason, []))})"
                 for reason, n in sorted(self.skipped.items())]
        parts += [f"dropped {what} {n} (e.g. {'; '.join(self.examples.get(what, []))})"
                  for what, n in sorted(self.notes.items())]
        return ", ".join(parts)

    def finish(self) -> None:
        """End of a pass: final rate check, then a SkipWarning if anything was skipped or dropped."""
        self.check(final=True)
        if self.skipped or self.notes:
            warnings.warn(self.report(), SkipWarning, stacklevel=2)
        else:
            logger.info("%s", self.report())


# --- who reads what: ranks x DataLoader workers ---------------------------------------------------


# --- a folder of image + caption files ------------------------------------------------------------


# --- WebDataset-style tar shards ------------------------------------------------------------------


