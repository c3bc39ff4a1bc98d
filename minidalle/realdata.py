"""Real captioned images: a folder of files or WebDataset-style tar shards, and the bad-input machinery.

DALL·E (Ramesh et al. 2021, section 2.3) trains on 250M scraped image-text pairs. Scraped data is
dirty, so this file is mostly about *bad input*: every loader here turns a file into the project's
sample -- `(image, caption)` with `image` a `torch.uint8` tensor of shape (H, W, 3), H = W =
image_size, and `caption` a `str` -- or skips it, counts it by reason and says so. Nothing bad kills
a run, and nothing is dropped silently:

  one image   bytes -> load_image -> center square crop -> LANCZOS resize -> uint8 (H, W, 3)
  captions    bytes -> read_captions (UTF-8 lines, stripped, empties dropped, cut to 1024 characters)
              -> pick one per epoch
  bookkeeping SkipStats counts skips per reason; past `data.max_skip_rate` it raises DataError

Two datasets here (the third, EmojiDataset, lives in emojiset.py and reuses SkipStats from here):
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

import bz2
import codecs
import contextlib
import glob
import gzip
import io
import logging
import lzma
import os
import random
import statistics
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError

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
    # raised by emojiset.py, which shares this bookkeeping
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
        # emojiset.render_emoji, whose black outlines need a white background.
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


def consumer_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker_id, num_workers) of the code calling it.

    Rank comes from torch.distributed when a process group is up, else from the RANK / WORLD_SIZE
    environment variables torchrun sets, else (0, 1). The worker comes from the DataLoader.
    Example: plain python, no DataLoader workers -> (0, 1, 0, 1)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        try:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise DataError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}"
                            " are not integers; unset them or launch with torchrun") from None
    info = get_worker_info()
    return (rank, world, info.id, info.num_workers) if info else (rank, world, 0, 1)


def split_for_consumer(items: Sequence, rank: int, world_size: int, worker_id: int, num_workers: int,
                       *, what: str = "shards", dataset: str = "dataset") -> list:
    """The share of `items` read by one (rank, worker): every item goes to exactly one of them.

    Items are dealt to ranks round-robin, then each rank's share to its workers. All consumers must
    pass the same `items` in the same order (same seed, same epoch) for this to be a partition.
    Fewer items than ranks is an error: an idle rank would wait forever at the next all-reduce.
    Fewer than a rank's workers is only a warning: idle workers cost nothing but are useless.
    Example: (range(5), rank=1, world_size=2, worker_id=0, num_workers=2) -> [1]  (rank 1 has [1, 3])
    """
    if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
        raise DataError(f"bad consumer rank={rank}/{world_size}, worker={worker_id}/{num_workers}")
    if len(items) < world_size:
        raise DataError(
            f"{dataset}: {len(items)} {what} cannot feed {world_size} ranks: each of the {what} is read by "
            f"exactly one rank, so some ranks would get no data and stall the others. Write at least "
            f"{world_size} {what} (ideally a multiple of ranks x DataLoader workers) or use fewer ranks.")
    mine = list(items[rank::world_size])
    if len(mine) < num_workers and worker_id == 0:  # warn once per rank, not once per worker
        warnings.warn(f"{dataset}: rank {rank} has {len(mine)} {what} for {num_workers} DataLoader workers, so "
                      f"{num_workers - len(mine)} workers stay idle; lower the DataLoader's num_workers or write more {what}.",
                      stacklevel=2)
    return mine[worker_id::num_workers]


class _ShuffledStream(IterableDataset):
    """What folder and tar datasets share: seed, epoch, the consumer split, the skip counter, and
    turning one sample's still-encoded image and caption bytes into `(image, caption)`."""

    name = "dataset"
    splits_by_rank = True  # each process reads its own files (split_for_consumer); the Trainer reads all it gets

    def __init__(self, image_size: int, seed: int, shuffle: bool, max_skip_rate: float, min_files: int,
                 max_pixels: int):
        if not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size, self.seed, self.shuffle = image_size, seed, shuffle
        self.max_skip_rate, self.min_files, self.max_pixels = max_skip_rate, min_files, max_pixels
        self.epoch = 0
        self.skip_stats = self._new_stats()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (and re-pick captions) for this epoch. Call it before each pass, as with a
        DistributedSampler; with persistent_workers=True the workers keep the epoch they started with."""
        self.epoch = int(epoch)

    def _new_stats(self) -> SkipStats:
        return SkipStats(self.name, self.max_skip_rate, self.min_files)

    def _epoch_share(self, items: Sequence, rank: int, world_size: int, worker_id: int, num_workers: int,
                     what: str) -> tuple[list, SkipStats]:
        """This consumer's share of `items` for this epoch, and a fresh skip counter for the pass.

        Example: 5 files, shuffle=False, rank 0 of 1, worker 0 of 2 -> ([f0, f2, f4], SkipStats(seen=0))
        """
        items = list(items)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(items)  # identical in every consumer
        stats = self.skip_stats = self._new_stats()
        return split_for_consumer(items, rank, world_size, worker_id, num_workers,
                                  what=what, dataset=self.name), stats

    def _sample(self, stats: SkipStats, image: bytes | Path, caption_bytes: bytes, key: str,
                image_at: object, caption_at: object) -> tuple[torch.Tensor, str] | None:
        """Decode one sample, or count why not and return None. `*_at` name the files in skip reports.

        Example: (stats, png bytes, b"a cat\\n", "k1", "a.tar:k1", "a.tar:k1") -> (uint8 (H, W, 3), "a cat")
        """
        lines, invalid, cut = read_captions(caption_bytes)
        if invalid:
            stats.note("invalid_utf8_line", caption_at, invalid)
        if cut:
            stats.note("long_caption_cut", caption_at, cut)
        if not lines:
            stats.skip("empty_caption", caption_at)
            return None
        try:
            pixels = load_image(image, self.image_size, max_pixels=self.max_pixels)
        except BadImageError as e:
            stats.skip(e.reason, image_at, e.problem)  # image_at already names the file
            return None
        stats.keep()
        return pixels, pick_caption(lines, self.seed, self.epoch, key)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        # Each subclass defines iter_for(rank, world_size, worker_id, num_workers): the samples of
        # one consumer. Taking the consumer as arguments lets tests simulate ranks and workers.
        rank, world, worker, n_workers = consumer_info()
        return self.iter_for(rank, world, worker, n_workers)


# --- a folder of image + caption files ------------------------------------------------------------


class FolderDataset(_ShuffledStream):
    """Every image under `root` (recursively) with a same-stem `.txt` caption file next to it.

    root/pets/cat.jpg + root/pets/cat.txt (one caption per line; one is picked per epoch). Hidden
    files and folders (".DS_Store", "._cat.jpg", ".ipynb_checkpoints") are ignored; an image without
    a caption file is counted as a `missing_caption` skip every pass.
    Example: FolderDataset("pets", 32) -> yields (uint8 tensor (32, 32, 3), "a black cat")
    """

    def __init__(self, root: str | os.PathLike, image_size: int, *, seed: int = 0, shuffle: bool = True,
                 max_skip_rate: float = 0.05, min_files: int = 100, max_pixels: int = MAX_PIXELS):
        self.root = Path(root)
        self.name = f"folder dataset {self.root}"
        if not self.root.is_dir():
            raise DataError(f"{self.name}: not a folder; set data.path to a folder of images with "
                            f"same-name .txt captions (cat.jpg + cat.txt)")
        super().__init__(image_size, seed, shuffle, max_skip_rate, min_files, max_pixels)
        self.files = scan_folder(self.root)  # [(image, caption file or None)], sorted
        if not self.files:
            raise DataError(f"{self.name}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under it")
        if all(caption is None for _, caption in self.files):
            raise DataError(f"{self.name}: {len(self.files)} images but no caption files; put the "
                            f"captions of cat.jpg in cat.txt next to it, one per line")

    def iter_for(self, rank: int, world_size: int, worker_id: int, num_workers: int):
        """Yield this consumer's share of one epoch; `iter(dataset)` calls it with its own ids."""
        mine, stats = self._epoch_share(self.files, rank, world_size, worker_id, num_workers, what="files")
        for image_path, caption_path in mine:
            if caption_path is None:
                stats.skip("missing_caption", image_path)
                continue
            try:
                caption_bytes = caption_path.read_bytes()
            except OSError as e:  # e.g. permission denied, or deleted since the scan
                stats.skip("unreadable_file", caption_path, e)
                continue
            key = image_path.relative_to(self.root).as_posix()
            sample = self._sample(stats, image_path, caption_bytes, key,
                                  image_at=image_path, caption_at=caption_path)
            if sample is not None:
                yield sample
        stats.finish()


def scan_folder(root: Path) -> list[tuple[Path, Path | None]]:
    """All images under `root` (sorted, hidden entries skipped) with their caption file if any.

    os.walk rather than rglob: it does not follow symlinked folders, so a link loop cannot hang us.
    Example: root with a.png, a.txt, b.jpg -> [(root/a.png, root/a.txt), (root/b.jpg, None)]
    """
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                caption = path.with_suffix(".txt")
                found.append((path, caption if caption.is_file() else None))
    return sorted(found, key=lambda pair: pair[0].relative_to(root).as_posix())


# --- WebDataset-style tar shards ------------------------------------------------------------------


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder (its *.tar files), a glob, one file, or a list of paths.

    Example: "data/shards" -> ["data/shards/000.tar", "data/shards/001.tar"]; "data/*.tar" -> the same
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if os.path.isdir(text):
            found = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
        elif glob.has_magic(text):
            found = sorted(glob.glob(text))
        else:
            found = [text]
    else:
        found = [os.fspath(s) for s in spec]
    missing = [f for f in found if not os.path.isfile(f)]
    if not found or missing:
        raise DataError(f"tar shards {spec!r}: {'no .tar files matched' if not found else f'missing {missing[:3]}'};"
                        f" set data.path to a folder of .tar shards or a glob like 'shards/*.tar'")
    return found


def _split_name(member: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name, the rest is the type.

    Example: "part1/0001.seg.png" -> ("part1/0001", "seg.png")
    """
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShardDataset(_ShuffledStream):
    """Image-caption pairs streamed from .tar shards in the WebDataset layout.

    Inside a shard, the members of one sample sit next to each other and share a key:
    0001.jpg, 0001.txt, 0002.png, 0002.txt, ... (`tar --sort=name` writes them like that). Shards are
    read front to back in tarfile's streaming mode, plain or gzip / bzip2 / xz compressed (told apart
    by their first bytes): nothing is extracted to disk and nothing is seeked, so shards can live on
    slow or network storage. A shard that is cut short or corrupt keeps the
    samples read before the damage and counts the ones it lost as `bad_shard` (see `_ShardLosses`).
    Shards are shuffled per epoch and dealt to (rank, worker) consumers; samples are shuffled within
    a consumer through a buffer of `shuffle_buffer` samples (still-encoded bytes, so it is cheap).
    Example: TarShardDataset("shards/*.tar", 64) -> yields (uint8 tensor (64, 64, 3), "a red bus")
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], image_size: int, *,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000, max_skip_rate: float = 0.05,
                 min_files: int = 100, max_pixels: int = MAX_PIXELS):
        self.shards = expand_shards(shards)
        self.name = f"tar dataset {shards if isinstance(shards, (str, os.PathLike)) else self.shards[0] + ', ...'}"
        super().__init__(image_size, seed, shuffle, max_skip_rate, min_files, max_pixels)
        self.shuffle_buffer = shuffle_buffer

    def iter_for(self, rank: int, world_size: int, worker_id: int, num_workers: int):
        """Yield this consumer's share of one epoch; `iter(dataset)` calls it with its own ids."""
        mine, stats = self._epoch_share(self.shards, rank, world_size, worker_id, num_workers, what="shards")
        losses = _ShardLosses(stats)
        samples = (s for shard in mine for s in self._read_shard(shard, stats, losses))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker_id}")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for where, image_bytes, caption_bytes in samples:
            sample = self._sample(stats, image_bytes, caption_bytes, where, image_at=where, caption_at=where)
            if sample is not None:
                yield sample
        losses.finish()  # bad shards still waiting for an estimate (no complete shard came after them)
        stats.finish()

    def _read_shard(self, shard: str, stats: SkipStats, losses: _ShardLosses) -> Iterator[tuple[str, bytes, bytes]]:
        """(where, image bytes, caption bytes) per complete sample; incomplete ones are counted.

        A shard that breaks (a cut, a corrupt header, bad compressed data) keeps what was read before
        the damage, its last sample too when that one's image and caption were read whole, and tells
        `losses` how many samples it gave so the lost ones can be estimated.
        Example: a 12-sample shard cut after sample 5 -> yields 5, then losses.bad(shard, 5, "...")
        """
        key, group, n_samples, damage = None, {}, 0, None
        try:
            with contextlib.ExitStack() as stack:
                tar, tail = _open_shard(shard, stack)
                for member in tar:
                    if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                        continue
                    member_key, ext = _split_name(member.name)
                    if member_key != key:
                        n_samples += key is not None
                        yield from self._complete(shard, key, group, stats)
                        key, group = member_key, {}
                    # Streaming mode: a member's bytes must be read before moving to the next one.
                    group[ext] = tar.extractfile(member).read()
                # The end-of-archive marker must follow the last member: tarfile stops quietly on a cut
                # or a garbage header too. A compressed shard that was itself cut raises EOFError from
                # its decompressor above; one whose tar was cut before compressing is caught here.
                damage = _end_marker_problem(tail, tar.offset)
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            damage = f"{type(e).__name__}: {e}"
        if damage is None or (_image_ext(group) and "txt" in group):  # a whole last sample is kept
            n_samples += key is not None
            yield from self._complete(shard, key, group, stats)
        if damage is None:
            losses.complete(n_samples)
        else:  # an incomplete last sample is not a missing_caption: it is part of the loss
            losses.bad(shard, n_samples, damage)

    @staticmethod
    def _complete(shard: str, key: str | None, group: dict, stats: SkipStats):
        if key is None:
            return
        where = f"{shard}:{key}"
        image_ext = _image_ext(group)
        if image_ext is None:
            stats.skip("missing_image", where)
        elif "txt" not in group:
            stats.skip("missing_caption", where)
        else:
            yield where, group[image_ext], group["txt"]


def _image_ext(group: dict) -> str | None:
    """The first member type of a sample that is an image, or None.

    Example: {"txt": b"..", "png": b".."} -> "png"; {"txt": b".."} -> None
    """
    return next((ext for ext in group if f".{ext}" in IMAGE_EXTENSIONS), None)


# Magic bytes of the compressed tars we stream, and the decompressor for each. The decompressor
# modules check that the stream ends properly (EOFError on a cut file); tarfile's own "r|gz" / "r|xz"
# streaming does not, and stops early without a word when a cut lands between members.
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _open_shard(shard: str, stack: contextlib.ExitStack) -> tuple[tarfile.TarFile, "_TailReader"]:
    """A streaming TarFile over the shard (plain, or decompressed on the way), and the reader under it.

    Compression is told by the first bytes, not by the name. Everything opened is closed by `stack`.
    Example: "a.tar" -> (TarFile, _TailReader(file)); "a.tar.gz" -> (TarFile, _TailReader(gzip.open(file)))
    """
    raw = stack.enter_context(open(shard, "rb"))
    head = raw.read(tarfile.BLOCKSIZE)
    raw.seek(0)
    source = raw
    # A plain tar starts with its first member's name, which may well begin "BZh": the "ustar" mark
    # every POSIX tar header carries at byte 257 settles it first.
    if head[257:262] != b"ustar":
        for prefix, decompress in _COMPRESSED:
            if head.startswith(prefix):
                source = stack.enter_context(decompress(raw, "rb"))
                break
    tail = _TailReader(source)
    return stack.enter_context(tarfile.open(fileobj=tail, mode="r|")), tail


class _TailReader(io.RawIOBase):
    """A read-only stream over the tar bytes (decompressed ones for a compressed shard) that keeps the
    last KEEP bytes it handed out, so the end-of-archive check can look at the block tarfile stopped
    on without seeking, in plain and compressed shards alike.

    Example: t = _TailReader(io.BytesIO(b"abcdef")); t.read(4); t.block_at(2, 2) -> b"cd"
    """

    KEEP = 64 * 1024  # tarfile's stream reads ahead one 10 KiB record at most

    def __init__(self, source):
        self.source, self.pos, self.tail = source, 0, bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.pos += n
        self.tail += data
        if len(self.tail) > self.KEEP:
            del self.tail[:-self.KEEP]
        return n

    def block_at(self, offset: int, size: int = tarfile.BLOCKSIZE) -> bytes:
        """The bytes at [offset, offset + size) of the stream, as far as they exist."""
        need_end = offset + size
        while self.pos < need_end and self.read(need_end - self.pos):  # the block may not be read yet
            pass
        start = self.pos - len(self.tail)
        if offset < start:
            raise ValueError(f"byte {offset} is no longer kept (kept from {start})")
        return bytes(self.tail[offset - start:need_end - start])


def _end_marker_problem(tail: _TailReader, offset: int) -> str | None:
    """None when the tar under `tail` has its end-of-archive marker at `offset`, else what is wrong.

    tarfile's streaming mode ends the member loop quietly not only on the end-of-archive marker (a
    block of zeros; writers put two, then pad) but also when the file ends, when it ends inside a
    header, and on a garbage header; it raises for those only at the very start of the archive. After
    the loop, `tar.offset` is where the block that stopped it starts: right after the last member's
    data. So a complete shard has a full 512-byte block of zeros there.
    Example: a shard cut after 5 of its 12 samples -> "the file ends at byte 10,240, where the ..."
    """
    block = tail.block_at(offset)
    if block == bytes(tarfile.BLOCKSIZE):
        return None
    if not block:
        return (f"the file ends at byte {offset:,}, where the end-of-archive marker or a member header "
                "should be (cut short?)")
    if len(block) < tarfile.BLOCKSIZE:
        return f"the file ends {len(block)} bytes into the member header at byte {offset:,} (cut short?)"
    return f"a corrupt member header at byte {offset:,}: not a tar header, nor the end-of-archive marker"


class _ShardLosses:
    """How many samples the bad shards of one pass lost, estimated from the complete ones.

    A shard that is cut short does not say how many samples it held. Its loss is estimated as the
    median number of samples in the shards this consumer has read to the end in this pass, minus the
    samples the bad shard gave, and at least 1 (the sample it broke in). A bad shard met before any
    complete one waits for the first complete one, or for the end of the pass (`finish`); when the
    pass has no complete shard at all it counts 1 and the report says the loss is unknown.
    Example: complete shards of 12, 12, 12 and a bad one that gave 5 -> stats.skip("bad_shard", .., n=7)
    """

    def __init__(self, stats: SkipStats):
        self.stats = stats
        self.sizes: list[int] = []  # samples in each complete shard
        self.waiting: list[tuple[str, int, str]] = []  # (shard, samples it gave, what went wrong)

    def complete(self, n_samples: int) -> None:
        self.sizes.append(n_samples)
        self._settle()

    def bad(self, shard: str, n_given: int, problem: str) -> None:
        self.waiting.append((shard, n_given, problem))
        self._settle()

    def finish(self) -> None:
        waiting, self.waiting = self.waiting, []
        for shard, n_given, problem in waiting:
            self.stats.skip("bad_shard", shard, f"{problem}; it gave {n_given} samples, and how many it lost "
                            "could not be estimated (no shard of this pass was read to the end): counted as 1")

    def _settle(self) -> None:
        if not (self.sizes and self.waiting):
            return
        typical = statistics.median_low(self.sizes)
        waiting, self.waiting = self.waiting, []
        for shard, n_given, problem in waiting:
            lost = max(1, typical - n_given)
            self.stats.skip("bad_shard", shard, f"{problem}; lost about {lost} samples (estimate: a complete "
                            f"shard of this pass holds {typical}, the median of {len(self.sizes)}; this one "
                            f"gave {n_given})", n=lost)


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream with `size` items of memory: emit a random buffered one per arrival.

    Example: range(10) with size 4 -> the same 10 numbers, locally shuffled
    """
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
