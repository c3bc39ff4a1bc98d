"""A folder of captioned images (root/**/cat.jpg beside root/**/cat.txt), and dealing files out to ranks and workers.

    ds = FolderDataset("photos/", image_size=64, seed=0)     # IterableDataset of (uint8 (64, 64, 3), caption)
    pairs = scan_folder("photos/")                           # [(image path, caption path), ...], sorted

Iterable rather than map-style so that a bad file can simply be left out (counted by SkipStats in
images.py). `split_for_consumer` gives each (rank, DataLoader worker) its own share of the files,
so every file is read exactly once per epoch; `_ShuffledStream` reshuffles by seed and epoch.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .images import BadImageError, IMAGE_EXTENSIONS, MAX_PIXELS, SkipStats, load_image, pick_caption, read_captions


# --- one image: bytes -> uint8 (H, W, 3) ----------------------------------------------------------


# --- captions -------------------------------------------------------------------------------------


# --- bad-input bookkeeping ------------------------------------------------------------------------


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


