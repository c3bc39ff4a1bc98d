"""Tests for minidalle/realdata/: images, captions, skip accounting, folder, tar shards.

Every file a test reads is written here into tmp_path, bad ones included (zero-byte, truncated,
garbage, decompression bombs, broken caption files). Expected values come from how the fixture was
made (a red square, three bad files), never from running the code under test.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from minidalle.errors import DataError
from minidalle.realdata.images import MAX_CAPTION_CHARS, SKIP_REASONS, BadImageError, SkipStats, SkipWarning, load_image, pick_caption, read_captions
from minidalle.realdata.folders import FolderDataset, split_for_consumer
from minidalle.realdata.shards import TarShardDataset, expand_shards

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --- helpers that write files -------------------------------------------------------------------


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color, size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def halves(left, right, size=(40, 20)) -> Image.Image:
    """Left half `left`, right half `right`."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = left
    a[:, size[0] // 2:] = right
    return Image.fromarray(a)


def noise_jpeg(size=64) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG")


def raw_png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand, so we can make what Pillow will not: 16-bit RGB, lying headers."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def close(pixel, color, tol=40) -> bool:
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel.tolist(), color))


# --- load_image ---------------------------------------------------------------------------------


def test_load_image_center_crops_wide_and_tall_images():
    wide = load_image(encode(halves(RED, BLUE, (40, 20))), 16)
    assert wide.dtype == torch.uint8 and wide.shape == (16, 16, 3)
    # the centre 20x20 of a red|blue 40x20 image is still half red, half blue
    assert all(close(p, RED) for p in wide[:, :5].reshape(-1, 3))
    assert all(close(p, BLUE) for p in wide[:, -5:].reshape(-1, 3))
    tall = load_image(encode(halves(RED, BLUE, (20, 40)).rotate(90, expand=True)), 16)
    assert tall.shape == (16, 16, 3)
    # rotate(90) turns left->bottom: top is blue, bottom red; the centre crop keeps both
    assert close(tall[1, 8], BLUE) and close(tall[-2, 8], RED)


def test_load_image_downscale_is_antialiased_and_upscale_works():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    small = load_image(encode(Image.fromarray(checker)), 8)
    # a good filter averages the checkerboard to grey; nearest-neighbour would keep 0s and 255s
    assert small.shape == (8, 8, 3) and small.min() >= 100 and small.max() <= 155
    big = load_image(encode(solid(GREEN, (4, 4))), 32)
    assert big.shape == (32, 32, 3) and all(close(p, GREEN, 2) for p in big.reshape(-1, 3))


def test_load_image_accepts_a_path(tmp_path):
    path = write(tmp_path / "x.png", encode(solid(BLUE)))
    assert close(load_image(path, 8)[4, 4], BLUE, 0)
    assert close(load_image(str(path), 8)[4, 4], BLUE, 0)


def _rgba_halves() -> bytes:
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (255, 0, 0, 0)  # red, but fully transparent
    a[:, 8:] = (255, 255, 255, 255)
    return encode(Image.fromarray(a, "RGBA"))


def _gif_with_transparency() -> bytes:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([255, 0, 255, 10, 200, 30] + [0] * 762)  # index 0 magenta (transparent), 1 green
    im.paste(1, (8, 0, 16, 16))
    return encode(im, "GIF", transparency=0)


def _palette_png() -> bytes:
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return encode(im)


def _gray16_png() -> bytes:
    a = np.zeros((12, 12), np.uint16)
    a[4:8], a[8:] = 32896, 65535  # 32896 = 128 * 257
    return encode(Image.fromarray(a))


def _rgb16_png() -> bytes:
    row = b"\x00" + b"\xff\xff\x80\x80\x00\x00" * 4  # filter byte + 4 pixels of (65535, 32896, 0)
    return raw_png(4, 4, 16, 2, row * 4)


MODE_CASES = [  # (name, make the file's bytes, [((y, x), expected RGB, tolerance)])
    ("grayscale L", lambda: encode(solid(100, mode="L")), [((8, 8), (100, 100, 100), 0)]),
    ("1-bit", lambda: encode(solid(1, mode="1")), [((8, 8), (255, 255, 255), 0)]),
    ("grayscale jpeg", lambda: encode(solid(100, mode="L"), "JPEG"), [((8, 8), (100, 100, 100), 3)]),
    ("RGBA transparent left -> black", _rgba_halves, [((8, 2), (0, 0, 0), 0), ((8, 13), (255, 255, 255), 0)]),
    ("RGBA half alpha", lambda: encode(solid((0, 0, 255, 128), mode="RGBA")), [((8, 8), (0, 0, 128), 1)]),
    ("LA transparent", lambda: encode(solid((200, 0), mode="LA")), [((8, 8), (0, 0, 0), 0)]),
    ("palette", _palette_png, [((8, 8), (10, 200, 30), 0)]),
    ("gif with transparent index", _gif_with_transparency, [((8, 2), (0, 0, 0), 0), ((8, 13), (10, 200, 30), 0)]),
    ("16-bit gray scaled, not clipped", _gray16_png,
     [((1, 6), (0, 0, 0), 0), ((5, 6), (128, 128, 128), 1), ((10, 6), (255, 255, 255), 0)]),
    ("16-bit RGB", _rgb16_png, [((2, 2), (255, 128, 0), 1)]),
    ("CMYK jpeg", lambda: encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG"), [((8, 8), RED, 40)]),
    ("webp", lambda: encode(solid(GREEN), "WEBP", lossless=True), [((8, 8), GREEN, 0)]),
    ("bmp", lambda: encode(solid(BLUE), "BMP"), [((8, 8), BLUE, 0)]),
]


@pytest.mark.parametrize("name, data, checks", MODE_CASES, ids=[case[0] for case in MODE_CASES])
def test_load_image_converts_every_mode_to_rgb(name, data, checks):
    raw = data()
    size = Image.open(io.BytesIO(raw)).size[0]  # no resize: pixels land where the fixture put them
    out = load_image(raw, size)
    assert out.shape == (size, size, 3) and out.dtype == torch.uint8, name
    for (y, x), color, tol in checks:
        assert close(out[y, x], color, tol), f"{name}: pixel ({y}, {x}) = {out[y, x].tolist()}, want {color}"


def test_load_image_applies_exif_rotation():
    im = halves(RED, BLUE, (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(encode(im, "JPEG", exif=exif, quality=95), 10)
    # displayed upright the image is 10 wide, 20 tall, red on top; without rotation red would be left
    assert close(out[1, 8], RED, 60) and close(out[8, 1], BLUE, 60), out[[1, 8], [8, 1]].tolist()


def _bomb_header_png() -> bytes:
    return raw_png(100_000, 100_000, 8, 0, b"\x00" * 10)  # claims 10^10 pixels, carries 10 bytes


BAD_CASES = [  # (name, make the file's bytes, expected reason, load_image keywords)
    ("zero-byte", lambda: b"", "empty_file", {}),
    ("garbage", lambda: b"this is not an image at all" * 20, "unreadable_image", {}),
    ("jpeg cut in half", lambda: noise_jpeg()[: len(noise_jpeg()) // 2], "truncated_image", {}),
    ("jpeg cut after 300 bytes", lambda: noise_jpeg()[:300], "truncated_image", {}),
    ("png cut in half", lambda: (lambda b: b[: len(b) // 2])(encode(Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))), "truncated_image", {}),
    ("header claims 10^10 pixels", _bomb_header_png, "too_many_pixels", {}),
    ("3000x3000 solid png over max_pixels", lambda: encode(solid(7, (3000, 3000), "L")), "too_many_pixels",
     {"max_pixels": 1_000_000}),
]


@pytest.mark.parametrize("name, data, reason, kw", BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_load_image_rejects_bad_input_with_a_reason(name, data, reason, kw):
    with pytest.raises(BadImageError) as info:
        load_image(data(), 16, **kw)
    assert info.value.reason == reason, f"{name}: {info.value}"
    assert isinstance(info.value, DataError)


def test_load_image_catches_pillows_own_bomb_warning_and_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for side in (12, 20):  # 144 pixels: Pillow only warns; 400 > 2 x 100: Pillow raises
        with pytest.raises(BadImageError) as info:
            load_image(encode(solid(RED, (side, side))), 8)
        assert info.value.reason == "too_many_pixels", side


def test_load_image_missing_path(tmp_path):
    with pytest.raises(BadImageError) as info:
        load_image(tmp_path / "nope.png", 8)
    assert info.value.reason == "unreadable_file" and "nope.png" in str(info.value)


# --- captions and SkipStats ---------------------------------------------------------------------


def test_read_captions():
    data = b"\xef\xbb\xbfa cat\r\n\n  a \t dog  \n\xff\xfe bad\n   \nlast\rone"
    assert read_captions(data) == (["a cat", "a dog", "last", "one"], 1, 0)
    assert read_captions(b"") == ([], 0, 0)
    assert read_captions("caf\u00e9 \u2615\n".encode()) == (["caf\u00e9 \u2615"], 0, 0)


def test_read_captions_cuts_very_long_lines():
    assert MAX_CAPTION_CHARS == 1024
    huge = b"x" * 1_000_000
    lines, invalid, cut = read_captions(huge + b"\nshort\n" + b"ab " * 400 + b"\n" + b"y" * 1024)
    assert lines == ["x" * 1024, "short", ("ab " * 400)[:1024].rstrip(), "y" * 1024]
    assert (invalid, cut) == (0, 2)  # 1024 characters exactly is not cut
    spaced = read_captions(b"a" + b" " * 5000 + b"b")  # whitespace runs collapse before the cut
    assert spaced == (["a b"], 0, 0)


def test_a_huge_caption_is_cut_and_noted_not_skipped(tmp_path):
    write(tmp_path / "a.png", encode(solid(RED, (8, 8))))
    write(tmp_path / "a.txt", "a red square " * 100_000)  # one 1.3M-character line
    ds = FolderDataset(tmp_path, 8)
    with pytest.warns(SkipWarning, match="long_caption_cut 1"):
        [(image, caption)] = list(ds)
    assert len(caption) <= MAX_CAPTION_CHARS and caption.startswith("a red square a red square")
    assert ds.skip_stats.notes["long_caption_cut"] == 1 and ds.skip_stats.n_skipped == 0


def test_pick_caption_is_deterministic_and_varies():
    lines = ["a", "b", "c", "d"]
    assert pick_caption(lines, 0, 3, "k") == pick_caption(lines, 0, 3, "k")
    picks = {pick_caption(lines, 0, epoch, "k") for epoch in range(30)}
    assert len(picks) >= 2 and picks <= set(lines)


def test_skip_stats_rate_threshold_and_report():
    stats = SkipStats("test dataset", max_skip_rate=0.2, min_files=10)
    for _ in range(3):
        stats.keep()
    stats.skip("truncated_image", "a.jpg", "cut short")  # 1 of 4 = 25% > 20%, but only 4 < 10 seen
    assert (stats.seen, stats.kept, stats.n_skipped) == (4, 3, 1) and stats.rate == 0.25
    report = stats.report()
    assert "test dataset" in report and "truncated_image 1" in report and "a.jpg" in report
    with pytest.raises(DataError, match=r"1 of 4 .*data\.max_skip_rate"):
        stats.finish()  # at the end of a pass the rate is exact, so it counts


def test_skip_stats_one_skip_can_count_many_items():
    stats = SkipStats("test dataset", max_skip_rate=0.5, min_files=5)
    for _ in range(4):
        stats.keep()
    stats.skip("bad_shard", "b.tar", "ReadError: unexpected end of data", n=3)
    assert (stats.seen, stats.kept, stats.n_skipped) == (7, 4, 3) and stats.skipped["bad_shard"] == 3
    assert "bad_shard 3" in stats.report() and "estimate" in stats.report()
    assert "estimate" in SKIP_REASONS["bad_shard"]
    with pytest.raises(DataError, match=r"5 of 9 items"):  # 5 of 9 = 56% > 50%, and 9 >= min_files
        stats.skip("bad_shard", "c.tar", n=2)
    with pytest.raises(ValueError, match="n=0"):
        stats.skip("bad_shard", "d.tar", n=0)


# --- FolderDataset ------------------------------------------------------------------------------


def make_folder(root):
    """Six good samples, six bad ones (one per reason), and files that must be ignored."""
    write(root / "a.png", encode(solid(RED)))
    write(root / "a.txt", "a red square\n")
    write(root / "sub/b.jpg", encode(solid(90, mode="L"), "JPEG"))
    write(root / "sub/b.txt", "first caption of b\n\nsecond caption of b\n")
    write(root / "sub/deep/c.webp", encode(solid((0, 255, 0, 255), mode="RGBA"), "WEBP"))
    write(root / "sub/deep/c.txt", "  a webp   with spaces \r\n")
    write(root / "d.BMP", encode(solid(BLUE), "BMP"))
    write(root / "d.txt", "a bitmap")
    write(root / "e.gif", _gif_with_transparency())
    write(root / "e.txt", "a gif")
    write(root / "f.png", _gray16_png())
    write(root / "f.txt", b"\xff\xfe not utf-8\nvalid caption of f\n")  # one invalid line dropped
    # the bad ones
    write(root / "nocap.png", encode(solid(RED)))  # missing_caption
    write(root / "zero.jpg", b"")  # empty_file
    write(root / "zero.txt", "zero")
    write(root / "trunc.jpg", noise_jpeg()[:1500])  # truncated_image
    write(root / "trunc.txt", "truncated")
    write(root / "garbage.png", b"\x00garbage" * 50)  # unreadable_image
    write(root / "garbage.txt", "garbage")
    write(root / "blankcap.png", encode(solid(RED)))  # empty_caption
    write(root / "blankcap.txt", b"\n   \n\xc3\x28\n")  # blank, blank, invalid UTF-8
    write(root / "bomb.png", encode(solid(3, (1200, 1200), "L")))  # too_many_pixels at max_pixels=10**6
    write(root / "bomb.txt", "a bomb")
    # ignored: hidden files and folders, non-images
    write(root / ".hidden.png", b"junk")
    write(root / ".ipynb_checkpoints/x.png", b"junk")
    write(root / ".ipynb_checkpoints/x.txt", "junk")
    write(root / "notes.md", "not an image")
    good = {"a red square", "a webp with spaces", "a bitmap", "a gif", "valid caption of f"}
    bad = {"missing_caption": 1, "empty_file": 1, "truncated_image": 1, "unreadable_image": 1,
           "empty_caption": 1, "too_many_pixels": 1}
    return good, bad


def test_folder_dataset_keeps_good_and_counts_bad(tmp_path):
    good, bad = make_folder(tmp_path)
    ds = FolderDataset(tmp_path, 8, max_skip_rate=1.0, max_pixels=1_000_000)
    assert len(ds.files) == 12
    with pytest.warns(SkipWarning) as record:
        samples = list(ds)
    captions = [c for _, c in samples]
    b_caption = [c for c in captions if "of b" in c]
    assert set(captions) - set(b_caption) == good and len(b_caption) == 1 and len(captions) == 6
    assert b_caption[0] in {"first caption of b", "second caption of b"}
    for image, caption in samples:
        assert image.shape == (8, 8, 3) and image.dtype == torch.uint8
    by_caption = dict((c, im) for im, c in samples)
    assert close(by_caption["a red square"][4, 4], RED, 0)
    assert close(by_caption["a gif"][4, 0], (0, 0, 0), 3)  # transparent half composited on black
    stats = ds.skip_stats
    assert dict(stats.skipped) == bad and stats.seen == 12 and stats.kept == 6
    assert stats.notes["invalid_utf8_line"] == 2
    report = str(record[0].message)
    assert all(reason in report for reason in bad) and "trunc.jpg" in report and str(tmp_path) in report


def test_folder_dataset_shuffle_is_seeded_per_epoch(tmp_path):
    for i in range(20):
        write(tmp_path / f"{i:03d}.png", encode(solid((i * 10, 0, 0), (4, 4))))
        write(tmp_path / f"{i:03d}.txt", f"caption {i}")
    write(tmp_path / "multi.png", encode(solid(RED, (4, 4))))
    write(tmp_path / "multi.txt", "one\ntwo\nthree\nfour\n")

    def order(ds):  # the single-caption files only, so only the file order can differ
        return [c for _, c in ds if c.startswith("caption")]
    ds = FolderDataset(tmp_path, 4, seed=5)
    first = order(ds)
    assert sorted(first) == sorted(f"caption {i}" for i in range(20))
    assert order(ds) == first and order(FolderDataset(tmp_path, 4, seed=5)) == first  # reproducible
    assert order(FolderDataset(tmp_path, 4, seed=6)) != first  # another seed, another order
    ds.set_epoch(1)
    assert order(ds) != first  # another epoch, another order
    unshuffled = order(FolderDataset(tmp_path, 4, shuffle=False))
    assert unshuffled == [f"caption {i}" for i in range(20)] != first  # sorted by path
    multi = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        multi |= {c for _, c in ds if not c.startswith("caption")}
    assert len(multi) >= 2 and multi <= {"one", "two", "three", "four"}


def test_folder_dataset_aborts_when_too_many_files_are_bad(tmp_path):
    for i in range(20):
        write(tmp_path / f"good{i:02d}.png", encode(solid(GREEN, (4, 4))))
        write(tmp_path / f"good{i:02d}.txt", f"good {i}")
    for i in range(10):
        write(tmp_path / f"bad{i:02d}.png", b"not a png")
        write(tmp_path / f"bad{i:02d}.txt", f"bad {i}")
    ds = FolderDataset(tmp_path, 4, max_skip_rate=0.1, min_files=5)
    yielded = []
    with pytest.raises(DataError) as info:
        for sample in ds:
            yielded.append(sample)
    message = str(info.value)
    assert "data.max_skip_rate" in message and str(tmp_path) in message and "unreadable_image" in message
    assert "bad" in message  # names an offending file
    assert len(yielded) < 20  # aborted midway, not after the whole pass


def test_folder_dataset_one_bad_first_file_does_not_abort(tmp_path):
    write(tmp_path / "000_bad.png", b"garbage")
    write(tmp_path / "000_bad.txt", "bad")
    for i in range(30):
        write(tmp_path / f"{i + 1:03d}.png", encode(solid(GREEN, (4, 4))))
        write(tmp_path / f"{i + 1:03d}.txt", f"good {i}")
    ds = FolderDataset(tmp_path, 4, shuffle=False, max_skip_rate=0.05, min_files=10)
    with pytest.warns(SkipWarning):
        assert len(list(ds)) == 30  # 1 of 31 = 3.2% < 5%
    assert dict(ds.skip_stats.skipped) == {"unreadable_image": 1}
    strict = FolderDataset(tmp_path, 4, shuffle=False, max_skip_rate=0.05, min_files=1)
    with pytest.raises(DataError, match=r"1 of 1 items"):  # without the grace count, file one aborts
        list(strict)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        FolderDataset(tmp_path / "missing", 8)
    with pytest.raises(DataError, match="no images"):
        FolderDataset(tmp_path, 8)
    write(tmp_path / "a.png", encode(solid(RED)))
    with pytest.raises(DataError, match="no caption files"):
        FolderDataset(tmp_path, 8)


# --- splitting across ranks and workers ---------------------------------------------------------


@pytest.mark.parametrize("n_items", [3, 4, 5, 7, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_split_for_consumer_is_a_partition(n_items, world_size, num_workers):
    items = [f"shard{i}" for i in range(n_items)]
    seen = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # idle-worker warnings are tested below
        for rank in range(world_size):
            for worker in range(num_workers):
                seen.update(split_for_consumer(items, rank, world_size, worker, num_workers))
    assert seen == Counter(items)


def test_split_for_consumer_too_few_items():
    with pytest.raises(DataError, match="cannot feed 3 ranks"):
        split_for_consumer(["a", "b"], 0, 3, 0, 1)
    with pytest.warns(UserWarning, match="idle"):  # 2 shards for rank 0's 4 workers
        assert split_for_consumer(["a", "b", "c", "d"], 0, 2, 0, 4) == ["a"]


# --- TarShardDataset ----------------------------------------------------------------------------


def write_shard(path, members):
    """members: (name, bytes) in order; streaming readers rely on that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(root, n_shards=5, per_shard=4):
    keys = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}_{i}"
            keys.append(key)
            members += [(f"{key}.png", encode(solid((s * 40, i * 60, 0), (6, 6)))),
                        (f"{key}.txt", f"caption {key}".encode())]
        write_shard(root / f"shard-{s:03d}.tar", members)
    return keys


@pytest.mark.parametrize("world_size, num_workers, shuffle", [(1, 1, False), (2, 2, True), (1, 5, True)])
def test_tar_each_sample_read_exactly_once_across_consumers(tmp_path, world_size, num_workers, shuffle):
    keys = make_shards(tmp_path)
    ds = TarShardDataset(tmp_path, 6, shuffle=shuffle, shuffle_buffer=3)
    seen = Counter()
    for rank in range(world_size):
        for worker in range(num_workers):
            for image, caption in ds.iter_for(rank, world_size, worker, num_workers):
                assert image.shape == (6, 6, 3) and image.dtype == torch.uint8
                seen[caption] += 1
    assert seen == Counter(f"caption {k}" for k in keys)


def test_tar_split_with_real_dataloader_workers_and_env_ranks(tmp_path, monkeypatch):
    keys = make_shards(tmp_path, n_shards=4, per_shard=3)
    ds = TarShardDataset(str(tmp_path / "*.tar"), 6)
    seen = Counter()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)  # what torchrun sets; workers inherit it
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen.update(caption for _, caption in loader)
    assert seen == Counter(f"caption {k}" for k in keys)


def test_tar_shuffle_is_seeded_per_epoch(tmp_path):
    make_shards(tmp_path)
    ds = TarShardDataset(tmp_path, 6, seed=1, shuffle_buffer=8)
    first = [c for _, c in ds]
    assert [c for _, c in ds] == first
    assert [c for _, c in TarShardDataset(tmp_path, 6, seed=1, shuffle_buffer=8)] == first
    ds.set_epoch(1)
    second = [c for _, c in ds]
    assert second != first and sorted(second) == sorted(first)


def test_tar_shuffles_whole_shards_and_samples_through_the_buffer(tmp_path):
    make_shards(tmp_path, n_shards=6, per_shard=8)

    def keys(ds):
        return [c.removeprefix("caption ") for _, c in ds]
    natural = keys(TarShardDataset(tmp_path, 6, shuffle=False))
    assert natural == sorted(natural) and len(natural) == 48  # path order, then member order
    shards_only = TarShardDataset(tmp_path, 6, shuffle_buffer=0)
    epoch0 = keys(shards_only)
    shards_only.set_epoch(1)
    epoch1 = keys(shards_only)
    for order in (epoch0, epoch1):  # whole shards move; a shard's samples stay together, in order
        blocks = [order[i:i + 8] for i in range(0, 48, 8)]
        assert all(b == sorted(b) and len({k.split("_")[0] for k in b}) == 1 for b in blocks)
    shard_order = [[k.split("_")[0] for k in order[::8]] for order in (natural, epoch0, epoch1)]
    assert shard_order[0] != shard_order[1] != shard_order[2]
    one_shard = keys(TarShardDataset(tmp_path / "shard-000.tar", 6, shuffle_buffer=4))
    assert one_shard != natural[:8] and sorted(one_shard) == natural[:8]  # only the buffer shuffles


def test_tar_counts_bad_members_and_survives_a_truncated_shard(tmp_path):
    png = encode(solid(RED, (6, 6)))
    write_shard(tmp_path / "a.tar", [
        ("k1.png", png), ("k1.txt", b"good one"),
        ("k2.jpg", b"garbage bytes" * 10), ("k2.txt", b"garbage"),  # unreadable_image
        ("k3.png", png),  # missing_caption
        ("k4.txt", b"caption without image"),  # missing_image
        ("k5.png", png), ("k5.txt", b"  \n\xff\n"),  # empty_caption (+1 invalid line)
        (".k6.png", b"hidden"),  # ignored
        ("k7.png", png), ("k7.txt", b"good two"),
    ])
    write_shard(tmp_path / "b.tar", [("t1.png", png), ("t1.txt", b"trunc 1"), ("t2.png", png),
                                     ("t2.txt", b"trunc 2"), ("t3.png", png), ("t3.txt", b"trunc 3")])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: 4 * 1024 + 512 + 10])  # cut inside t3.png's data
    ds = TarShardDataset(tmp_path, 6, shuffle=False, max_skip_rate=1.0)
    with pytest.warns(SkipWarning, match="bad_shard"):
        captions = sorted(c for _, c in ds)
    assert captions == ["good one", "good two", "trunc 1", "trunc 2"]
    # b.tar lost t3 and whatever followed: estimated as a.tar's 6 samples (k1-k5, k7) - the 2 it gave
    assert dict(ds.skip_stats.skipped) == {"unreadable_image": 1, "missing_caption": 1, "missing_image": 1,
                                           "empty_caption": 1, "bad_shard": 4}
    assert ds.skip_stats.notes["invalid_utf8_line"] == 1


def _padded(n: int) -> int:
    return -(-n // 512) * 512  # tar stores member data in whole 512-byte blocks


def _cut(at):
    return lambda data, members: data[: at(members)]


# How to damage shard-002 (12 samples: members[2 * i] is s2_i.png, members[2 * i + 1] is s2_i.txt),
# and (samples it still gives, samples it lost). 12 - 5 = 7 lost when s2_0 .. s2_4 survive.
END = lambda m: m[-1].offset_data + _padded(m[-1].size)  # noqa: E731 -- where the end-of-archive marker starts
DAMAGE = [
    ("cut on the header of s2_5 (like head -c)", _cut(lambda m: m[10].offset), 5, 7),
    ("cut inside the header of s2_5", _cut(lambda m: m[10].offset + 100), 5, 7),
    ("cut between s2_5.png and s2_5.txt", _cut(lambda m: m[11].offset), 5, 7),
    ("cut inside the data of s2_5.txt", _cut(lambda m: m[11].offset_data + 3), 5, 7),
    ("garbage header for s2_5", lambda d, m: d[:m[10].offset] + b"garbage!" * 64 + d[m[10].offset + 512:], 5, 7),
    ("no end-of-archive marker", _cut(END), 12, 1),  # nothing known lost, but the end is missing: at least 1
    ("end-of-archive marker cut inside", _cut(lambda m: END(m) + 100), 12, 1),
]


def damaged_shards(root, damage):
    """Four shards of 12 samples; shard-002 damaged by `damage(data, members) -> data`."""
    make_shards(root, n_shards=4, per_shard=12)
    bad = root / "shard-002.tar"
    with tarfile.open(bad) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[10:12]] == ["s2_5.png", "s2_5.txt"]
    bad.write_bytes(damage(bad.read_bytes(), members))
    return bad


@pytest.mark.parametrize("name, damage, gives, lost", DAMAGE, ids=[case[0] for case in DAMAGE])
def test_tar_damaged_shard_counts_the_samples_it_lost(tmp_path, name, damage, lost, gives):
    bad = damaged_shards(tmp_path, damage)
    ds = TarShardDataset(tmp_path, 6, shuffle=False, max_skip_rate=0.2)
    with pytest.warns(SkipWarning) as record:
        captions = [c for _, c in ds]
    assert len(captions) == 36 + gives and sum(c.startswith("caption s2_") for c in captions) == gives
    stats = ds.skip_stats
    assert dict(stats.skipped) == {"bad_shard": lost}, name
    assert (stats.seen, stats.kept) == (36 + gives + lost, 36 + gives)
    report = str(record[0].message)
    assert f"bad_shard {lost}" in report and "estimate" in report and str(bad) in report


def test_tar_truncated_shard_loss_trips_max_skip_rate(tmp_path):
    # 4 shards x 12, one cut like `head -c` on a block boundary: 7 of 48 = 14.6% lost, over 5%
    damaged_shards(tmp_path, DAMAGE[0][1])
    ds = TarShardDataset(tmp_path, 6, shuffle=False)  # default max_skip_rate=0.05
    yielded = []
    with pytest.raises(DataError, match=r"7 of 48 items skipped .*bad_shard 7.*shard-002\.tar"):
        for sample in ds:
            yielded.append(sample)
    assert len(yielded) == 41  # min_files=100: only the end-of-pass check can abort this small pass


def test_tar_truncated_shard_read_first_gives_the_same_counts(tmp_path):
    damaged_shards(tmp_path, DAMAGE[0][1])
    bad_first = []
    for seed in range(40):
        first = next(iter(TarShardDataset(tmp_path, 6, seed=seed, shuffle_buffer=0, max_skip_rate=1.0)))[1]
        if first.startswith("caption s2_"):
            bad_first.append(seed)
    assert bad_first, "no seed reads the damaged shard first"
    for seed in bad_first[:3]:
        for buffer in (0, 16):
            ds = TarShardDataset(tmp_path, 6, seed=seed, shuffle_buffer=buffer, max_skip_rate=0.2)
            with pytest.warns(SkipWarning, match="bad_shard 7"):
                assert len(list(ds)) == 41
            assert (ds.skip_stats.seen, ds.skip_stats.kept, dict(ds.skip_stats.skipped)) == (48, 41, {"bad_shard": 7})


def test_tar_lone_truncated_shard_says_the_loss_is_unknown(tmp_path):
    bad = damaged_shards(tmp_path, DAMAGE[0][1])
    ds = TarShardDataset(bad, 6, max_skip_rate=1.0)
    with pytest.warns(SkipWarning, match="could not be estimated") as record:
        assert len(list(ds)) == 5
    assert (ds.skip_stats.seen, dict(ds.skip_stats.skipped)) == (6, {"bad_shard": 1})
    assert "bad_shard 1" in str(record[0].message)


def test_tar_complete_shard_with_short_padding_is_fine(tmp_path):
    # tar writers pad the end to 10 KiB; one zero block after the last member is enough to be complete
    damaged_shards(tmp_path, _cut(lambda m: END(m) + 512))
    ds = TarShardDataset(tmp_path, 6, shuffle=False)
    assert len(list(ds)) == 48 and ds.skip_stats.n_skipped == 0


def tar_bytes(members) -> bytes:
    """An uncompressed tar archive of (name, bytes) members, in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_compressed_shard(path, opener, members, cut_at=None):
    """Compress the tar of `members` (its first `cut_at` bytes, if given: a tar cut before compressing)."""
    with opener(path, "wb") as f:
        f.write(tar_bytes(members)[:cut_at])
    return path


@pytest.mark.parametrize("suffix, opener", [("gz", gzip.open), ("bz2", bz2.open), ("xz", lzma.open)])
def test_tar_truncated_compressed_shard_is_caught_by_the_decompressor(tmp_path, suffix, opener):
    rng = np.random.default_rng(0)  # noise images do not compress, so a cut lands inside the samples
    for s in ("a", "b"):
        write_compressed_shard(tmp_path / f"{s}.tar.{suffix}", opener, [
            (f"{s}{i:02d}.{ext}", encode(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
             if ext == "png" else f"caption {s}{i}".encode()) for i in range(12) for ext in ("png", "txt")])
    data = (tmp_path / f"b.tar.{suffix}").read_bytes()
    shards = [tmp_path / f"a.tar.{suffix}", tmp_path / f"b.tar.{suffix}"]
    ds = TarShardDataset(shards, 6, shuffle=False, max_skip_rate=1.0)
    assert len(list(ds)) == 24 and ds.skip_stats.n_skipped == 0  # intact, compressed shards are read
    for cut in range(len(data) // 10, len(data) * 9 // 10, len(data) // 15):
        (tmp_path / f"b.tar.{suffix}").write_bytes(data[:cut])
        with pytest.warns(SkipWarning, match="bad_shard"):
            kept = len(list(ds))
        stats = ds.skip_stats
        assert (stats.seen, stats.kept, list(stats.skipped)) == (24, kept, ["bad_shard"]), (cut, stats.report())
        assert "EOFError" in stats.report(), cut


def test_tar_too_few_shards_and_bad_specs(tmp_path):
    make_shards(tmp_path, n_shards=2)
    ds = TarShardDataset(tmp_path, 6)
    with pytest.raises(DataError, match="2 shards cannot feed 4 ranks"):
        next(ds.iter_for(0, 4, 0, 1))
    with pytest.raises(DataError, match="no .tar files"):
        TarShardDataset(tmp_path / "*.nothing", 6)
    with pytest.raises(DataError, match="missing"):
        TarShardDataset([tmp_path / "shard-000.tar", tmp_path / "gone.tar"], 6)
    assert expand_shards(tmp_path) == expand_shards(str(tmp_path / "shard-*.tar")) == [
        str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]


def test_load_image_can_keep_the_native_size(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (10, 200, 30)).save(path)
    im = load_image(path, None)
    assert im.shape == (20, 40, 3) and tuple(im[5, 30].tolist()) == (10, 200, 30)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_skip_rate_must_be_a_fraction(rate):
    with pytest.raises(DataError, match="max_skip_rate"):
        SkipStats("test", max_skip_rate=rate)


@pytest.mark.parametrize("suffix, opener", [("gz", gzip.open), ("xz", lzma.open)])
def test_tar_cut_before_it_was_compressed_is_caught_by_the_end_marker(tmp_path, suffix, opener):
    """A compressed stream that ends properly but holds a cut tar: the decompressor is happy, the
    missing end-of-archive marker is not."""
    members = [(f"{i:02d}.{ext}", encode(Image.new("RGB", (8, 8), (20 * i, 0, 0))) if ext == "png"
                else f"caption {i}".encode()) for i in range(12) for ext in ("png", "txt")]
    write_compressed_shard(tmp_path / f"a.tar.{suffix}", opener, members)
    at = tar_bytes(members).index(b"05.png") // 512 * 512  # the header of sample 5: a cut on a block boundary
    write_compressed_shard(tmp_path / f"b.tar.{suffix}", opener, members, cut_at=at)
    ds = TarShardDataset([tmp_path / f"a.tar.{suffix}", tmp_path / f"b.tar.{suffix}"], 6, shuffle=False,
                         max_skip_rate=1.0)
    with pytest.warns(SkipWarning, match=r"bad_shard 7 samples lost.*the file ends at byte"):
        assert len(list(ds)) == 17
    assert (ds.skip_stats.seen, ds.skip_stats.kept) == (24, 17)


def test_plain_tar_whose_first_member_looks_like_bzip2_is_read_as_a_tar(tmp_path):
    """Compression is sniffed from the first bytes, and a plain tar starts with a member name."""
    members = [(f"BZh{i}.{ext}", encode(Image.new("RGB", (8, 8), (20 * i, 0, 0))) if ext == "png"
                else f"caption {i}".encode()) for i in range(4) for ext in ("png", "txt")]
    (tmp_path / "a.tar").write_bytes(tar_bytes(members))
    ds = TarShardDataset(tmp_path / "a.tar", 6, shuffle=False)
    assert len(list(ds)) == 4 and ds.skip_stats.n_skipped == 0
