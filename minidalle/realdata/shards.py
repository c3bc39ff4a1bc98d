"""WebDataset-style tar shards (shard-000.tar with 0001.jpg, 0001.txt, ...), streamed, with damage accounted for.

    ds = TarShardDataset("data/shards", image_size=256, seed=0)   # IterableDataset, streamed
    paths = expand_shards("data/*.tar")                            # a folder, a glob, a file or a list

Shards are split across (rank, worker) like folder files (folders.split_for_consumer). A shard that
is cut short, compressed, or damaged mid-way costs the samples it holds, counted as `bad_shard`
(estimated from the other shards' sizes), and the run goes on; past `data.max_skip_rate` it stops.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import lzma
import os
import random
import statistics
import tarfile
import zlib
from typing import Iterator, Sequence


from ..errors import DataError
from .folders import _ShuffledStream
from .images import IMAGE_EXTENSIONS, MAX_PIXELS, SkipStats


# --- one image: bytes -> uint8 (H, W, 3) ----------------------------------------------------------


# --- captions -------------------------------------------------------------------------------------


# --- bad-input bookkeeping ------------------------------------------------------------------------


# --- who reads what: ranks x DataLoader workers ---------------------------------------------------


# --- a folder of image + caption files ------------------------------------------------------------


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
