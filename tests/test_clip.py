"""The reranker: shapes, the symmetric contrastive loss, one-fact-changed negatives, reranking after an
overfit, the BPE it must be loaded with, exact resume, bad input, and `train clip` / `eval clip`."""

import json
from dataclasses import replace
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minidalle import clip
from minidalle.stages import reranker, reranker_data
from minidalle import data
from minidalle.bpe import RegexTokenizer
from minidalle.cli.main import main
from minidalle.config import get_config
from minidalle.errors import CheckpointError, DataError
from minidalle.judge import binding_swap, judge
from minidalle.model import caption_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


@pytest.fixture(scope="module")
def cfg():
    return get_config("smoke", smoke=True)


@pytest.fixture(scope="module")
def tok(cfg):
    from minidalle.stages.text_tokenizer import training_captions

    return RegexTokenizer(lowercase=True).train(training_captions(cfg.data), cfg.text.vocab_size, progress=False)


def _pairs(cfg, tok, n, split="train", start=0):
    """n ShapesWorld pairs at the smoke size: (float images (n, 3, H, W), ids (n, T), captions)."""
    ds = data.ShapesWorld(split, cfg.data.image_size, 0)
    images, captions = ds.batch(start, n)
    model_layout = clip.CLIP.from_config(cfg).layout
    ids = torch.tensor([caption_ids(tok, c, model_layout)[0] for c in captions])
    return clip.to_float_images(images), ids, captions


def _overfit(cfg, batch, steps=80, lr=3e-3):
    torch.manual_seed(0)
    model = clip.CLIP.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = clip.clip_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_shapes_unit_embeddings_and_the_logit_scale(cfg, tok):
    images, ids, _ = _pairs(cfg, tok, 5)
    model = clip.CLIP.from_config(cfg)
    assert model.encode_image(images).shape == (5, cfg.clip.embed_dim)
    assert torch.allclose(model.encode_image(images).norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(model.encode_text(ids).norm(dim=-1), torch.ones(5), atol=1e-5)
    logits = model(images[:3], ids)
    assert logits.shape == (3, 5)
    assert model.logit_scale().item() == pytest.approx(1 / cfg.clip.temperature, rel=1e-5)
    assert logits.abs().max() <= model.logit_scale() + 1e-4  # cosines times the scale
    with torch.no_grad():
        model.log_scale.fill_(10.0)  # exp(10) ~ 22,000: clamped, as CLIP does
    assert model.logit_scale().item() == clip.MAX_LOGIT_SCALE


def test_pads_are_masked_and_trailing_pads_change_nothing(cfg, tok):
    model = clip.CLIP.from_config(cfg).eval()
    _, ids, _ = _pairs(cfg, tok, 4)
    other = ids.clone()
    pads = ids >= cfg.text.vocab_size
    other[pads] = cfg.text.vocab_size  # the wrong pad id everywhere: pads are not read
    assert torch.allclose(model.encode_text(ids), model.encode_text(other), atol=1e-6)
    one = model.encode_text(ids[:1])  # a batch whose longest caption is shorter: same vector
    assert torch.allclose(one, model.encode_text(ids)[:1], atol=1e-6)


class _Fixed(torch.nn.Module):
    """A stand-in model whose logits are a given matrix (for checking the loss alone)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.s = logits, torch.nn.Parameter(torch.zeros(()))

    def forward(self, images, ids):
        return self.logits + 0 * self.s

    def logit_scale(self):
        return torch.tensor(1.0)


def test_loss_is_symmetric_infonce():
    torch.manual_seed(1)
    m = torch.randn(6, 6) * 3
    batch = (torch.zeros(6, 3, 16, 16), torch.zeros(6, 32, dtype=torch.long))
    loss, parts = clip.clip_loss(_Fixed(m), batch)
    swapped, _ = clip.clip_loss(_Fixed(m.T.contiguous()), batch)  # images and captions exchange roles
    assert loss.item() == pytest.approx(swapped.item(), rel=1e-6)
    target = torch.arange(6)
    assert loss.item() == pytest.approx(((F.cross_entropy(m, target) + F.cross_entropy(m.T, target)) / 2).item(),
                                        rel=1e-6)
    assert float(parts["i2t"]) == pytest.approx(F.cross_entropy(m, target).item(), rel=1e-6)
    # images past the captions compete for the captions only
    extra = torch.cat([m, torch.randn(2, 6)])
    loss2, parts2 = clip.clip_loss(_Fixed(extra), (torch.zeros(8, 3, 16, 16), batch[1]))
    assert float(parts2["i2t"]) == pytest.approx(float(parts["i2t"]), rel=1e-6)
    assert float(parts2["t2i"]) == pytest.approx(F.cross_entropy(extra.T, target).item(), rel=1e-6)


def test_loss_falls_and_rerank_and_recall_find_the_pairs_after_an_overfit(cfg, tok):
    images, ids, captions = _pairs(cfg, tok, 6)
    model, losses = _overfit(cfg, (images, ids))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    for i in range(6):  # the matching caption above every wrong one, for the same image
        wrong = [captions[j] for j in range(6) if j != i]
        scores = clip.rerank(model, tok, [captions[i]] + wrong, images[i:i + 1].expand(6, -1, -1, -1))
        assert scores.argmax().item() == 0, (i, scores)
    # and each caption ranks its own image first among all six (what best-of-N needs)
    scores = clip.rerank(model, tok, [captions[0]] * 6, images)
    assert scores.shape == (6,) and scores.argmax().item() == 0
    uint8 = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # the judge's layout gives the same
    assert torch.allclose(clip.rerank(model, tok, [captions[0]] * 6, uint8), scores, atol=1e-4)
    assert torch.allclose(clip.rerank(model, tok, [captions[0]] * 6, list(uint8.numpy())), scores, atol=1e-4)
    r = clip.recall_at_k(model, tok, uint8, captions, ks=(1, 5))
    assert r["i2t@1"] == 1.0 and r["t2i@1"] == 1.0 and r["n"] == 6
    assert model.training is False  # rerank leaves the mode as it was


def test_one_fact_changed_scenes_are_wrong_for_the_judge_too():
    """Each negative contradicts the original caption, and its own caption fits it and not the original:
    checked with the judge, which knows nothing of spec_holds."""
    ds = data.ShapesWorld("val", 32, 0)
    seen = set()
    for j in range(24):
        scene, text = ds.example(j)
        negs = reranker_data.one_fact_changed(scene, text, np.random.default_rng(j), k=len(reranker_data.FACTS))
        assert len({n.fact for n in negs}) == len(negs) >= 3
        for neg in negs:
            seen.add(neg.fact)
            image = data.render(neg.scene, 32)
            assert not judge(image, text).ok, (text, neg)
            assert not data.is_heldout(neg.scene)
            if neg.caption is None:
                assert neg.fact == "count"
                continue
            assert judge(image, neg.caption).ok, (neg.caption, neg)
            assert not judge(data.render(scene, 32), neg.caption).ok, (text, neg.caption)
    assert seen == set(reranker_data.FACTS)


def test_superellipses_are_the_shapes_at_their_exponents_and_others_past_halfway():
    from minidalle.judge import detect

    ds = data.ShapesWorld("val", 32, 0)
    exact = {"diamond": 1.0, "circle": 2.0, "square": float("inf")}
    rng = np.random.default_rng(0)
    flipped = kept = tried = 0
    for j in range(60):
        scene = ds.scene(j)
        ps = {k: exact[o.shape] for k, o in enumerate(scene.objects) if o.shape in exact}
        assert np.array_equal(reranker_data.render_morphed(scene, 32, ps), data.render(scene, 32))
        if len(scene.objects) != 1 or scene.objects[0].shape not in exact:
            continue
        tried += 1
        shape = scene.objects[0].shape
        kept += detect(reranker_data.render_morphed(scene, 32, reranker_data.morphs(scene, rng, past=False)))[0].shape == shape
        flipped += detect(reranker_data.render_morphed(scene, 32, reranker_data.morphs(scene, rng, past=True)))[0].shape != shape
    assert tried >= 15 and kept == tried and flipped >= 0.8 * tried, (tried, kept, flipped)


def test_pairs_are_a_pure_function_of_the_batch_index(cfg, tok):
    layout = clip.CLIP.from_config(cfg).layout
    make = lambda: reranker_data.ShapesPairs("train", 40, 16, 0, tok, layout, batch_size=8, negatives=2, strength=1.0, seed=3,
                                    morph_negatives=1, morph_jitter=0.5)
    a, b = make(), make()
    for i in (4, 0, 9):  # any order, any instance
        for x, y in zip(a(i), b(i)):
            assert torch.equal(x, y)
    images, ids = a(0)
    pairs = int((a.kind[a._index(range(8))] == 0).sum())
    assert len(ids) == pairs and len(images) >= pairs and images.min() >= 0 and images.max() <= 1
    assert len(images) > 8  # the negatives came along
    assert sum("morph" in f for f in a.facts) > 10 and int((a.kind == 1).sum()) > 10  # image-only rivals
    clean = reranker_data.ShapesPairs("train", 40, 16, 0, tok, layout, batch_size=8, negatives=2, strength=0.0, seed=3,
                             morph_negatives=1, morph_jitter=0.5)
    assert not torch.equal(clean(0)[0], images) and torch.equal(clean(0)[1], ids)  # augmentation: images only


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `train clip --preset smoke --json` (it trains the BPE it needs first): (folder, flags, its JSON)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("clip")
    flags = [f"--text.out_dir={root}/bpe", f"--clip_train.out_dir={root}/clip"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "clip", "--preset", "smoke", "--json", *flags]) == 0
    return root, flags, json.loads(out.getvalue().strip().splitlines()[-1])


def test_train_clip_command_then_eval_clip(smoke_run, capsys):
    root, flags, summary = smoke_run
    assert summary["steps"] == 20 and summary["pairs"] == 512 and summary["hard_negatives"] > 0
    for split in ("val", "heldout"):
        assert set(summary[split]) >= {"i2t@1", "i2t@5", "t2i@1", "t2i@5"}
        assert 0 <= summary[split]["i2t@1"] <= summary[split]["i2t@5"] <= 1
        assert 0 <= summary[f"facts_{split}"]["overall"] <= 1
    assert (root / "bpe" / "bpe.model").is_file()
    model, cfg, tok = reranker.load_clip(root / "clip")
    assert not model.training and cfg.clip == get_config("smoke").clip and tok.vocab_size == cfg.text.vocab_size
    assert main(["eval", "clip", "--preset", "smoke", "--n", "16", "--json", *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val"]["n"] == 16 and result["checkpoint"].endswith("step_0000020")
    # a finished run, resumed, trains nothing and says so
    assert main(["train", "clip", "--preset", "smoke", "--resume", *flags]) == 0
    assert "already finished at step 20" in capsys.readouterr().out


def test_finished_clip_needs_max_steps(smoke_run, tmp_path):
    root, _, _ = smoke_run
    cfg = get_config("smoke", {"clip_train.out_dir": str(root / "clip"), "text.out_dir": str(root / "bpe")})
    assert reranker.finished_clip(cfg).name == "step_0000020"
    longer = get_config("smoke", {"clip_train.out_dir": str(root / "clip"), "clip_train.max_steps": 30})
    assert reranker.finished_clip(longer) is None
    assert reranker.finished_clip(get_config("smoke", {"clip_train.out_dir": str(tmp_path / "none")})) is None


def test_another_bpe_is_refused_for_loading_and_resuming(smoke_run, tmp_path, capsys):
    root, _, _ = smoke_run
    other = tmp_path / "bpe2"
    assert main(["train", "bpe", "--preset", "smoke", "--data.seed=5", f"--text.out_dir={other}", "--json"]) == 0
    with pytest.raises(CheckpointError, match="another text tokenizer"):
        reranker.load_clip(root / "clip", bpe=other)
    assert reranker.load_clip(root / "clip", bpe=root / "bpe" / "bpe.model")[2].vocab_size > 256
    shutil.copytree(root / "clip", tmp_path / "clip")
    capsys.readouterr()
    argv = ["train", "clip", "--preset", "smoke", "--resume", "--clip_train.max_steps=30",
            f"--text.out_dir={other}", f"--clip_train.out_dir={tmp_path}/clip"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another text tokenizer" in err and "--start-over" in err


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(smoke_run, tmp_path):
    root, _, _ = smoke_run

    def cfg(out):
        return get_config("smoke", {"text.out_dir": str(root / "bpe"), "clip_train.out_dir": str(out),
                                    "clip_train.max_steps": 12, "clip_train.eval_every": 0})

    quiet = {"progress": False, "log": lambda line: None}
    _, straight, _ = reranker.train_clip(cfg(tmp_path / "a"), **quiet)
    stop_at_5 = {"on_step_end": lambda t: t.step == 5 and t.request_stop()}
    _, first, _ = reranker.train_clip(cfg(tmp_path / "b"), callbacks=stop_at_5, **quiet)
    assert first.step == 5
    _, second, _ = reranker.train_clip(cfg(tmp_path / "b"), resume=True, **quiet)
    losses = [r["loss"] for r in first.history["train"] + second.history["train"]]
    assert losses == [r["loss"] for r in straight.history["train"]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("call, words", [
    (lambda m, t, im: clip.rerank(m, t, ["a red circle"] * 2, torch.rand(2, 3, 8, 8)), "trained on 16x16"),
    (lambda m, t, im: clip.rerank(m, t, ["a red circle"] * 2, torch.rand(2, 16, 16)), "batch of RGB images"),
    (lambda m, t, im: clip.rerank(m, t, [], im[:0]), "no prompts given"),
    (lambda m, t, im: clip.rerank(m, t, "a red circle", im), "must be a list of strings"),
    (lambda m, t, im: clip.rerank(m, t, ["a red circle"] * 3, im), "3 prompts and 2 images"),
    (lambda m, t, im: clip.rerank(m, t, ["a red circle", "  "], im), "prompt 1 is '  '"),
    (lambda m, t, im: clip.rerank(m, t, ["a red circle"] * 2, im * 255), "float images must lie in [0, 1]"),
    (lambda m, t, im: clip.rerank(m, t, ["a red circle " * 30] * 2, im), "more than the model's 32"),
    (lambda m, t, im: clip.embed_images(m, im.long()), "uint8 (0..255) or float"),
    (lambda m, t, im: clip.recall_at_k(m, t, im, ["a red circle"]), "1 captions and 2 images"),
    (lambda m, t, im: clip.clip_loss(m, (im[:1], torch.zeros(2, 32, dtype=torch.long))), "an image for every caption"),
])
def test_bad_input_is_a_clear_error(cfg, tok, call, words):
    model = clip.CLIP.from_config(cfg)
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(DataError) as e:
        call(model, tok, images)
    assert words in str(e.value)


def test_a_two_object_pair_brings_a_swap_first_and_a_shape_swap_keeps_each_place_colour():
    ds = data.ShapesWorld("train", 32, 0)
    twos = [ds.example(j) for j in range(60) if len(ds.example(j)[0].objects) == 2]
    firsts = []
    for j, (scene, text) in enumerate(twos):
        negs = reranker_data.one_fact_changed(scene, text, np.random.default_rng(j), k=2, swap_first=True)
        a, b = scene.objects
        by_colour = data.Scene((replace(a, color=b.color), replace(b, color=a.color)), relation=scene.relation)
        by_shape = data.Scene((replace(a, shape=b.shape), replace(b, shape=a.shape)), relation=scene.relation)
        if negs[0].fact not in ("binding", "shape_swap"):  # only when neither swap may be drawn in training
            assert all(data.is_heldout(s) or (a.color == b.color if s is by_colour else a.shape == b.shape)
                       for s in (by_colour, by_shape)), (text, negs)
        firsts.append(negs[0].fact)
        for neg in negs:
            if neg.fact == "shape_swap":
                (c, d) = neg.scene.objects
                assert (c.color, c.shape, d.color, d.shape) == (a.color, b.shape, b.color, a.shape)
                if a.color != b.color:  # one colour for both: the swap is a changed relation, no binding to read
                    assert binding_swap(judge(data.render(neg.scene, 32), text)) is True
    assert {"binding", "shape_swap"} <= set(firsts) and len(twos) > 10


def test_trimming_the_padding_columns_changes_no_embedding(cfg, tok):
    """On the CPU the text encoder drops the columns that are padding in every caption; on a GPU it keeps
    them (finding them would make the host wait). Both give the same embeddings."""
    torch.manual_seed(0)
    model = clip.CLIP.from_config(cfg).eval()
    _, ids, _ = _pairs(cfg, tok, 4)
    assert (ids >= model.text.text_vocab).all(dim=0).any()  # some trailing columns are padding everywhere
    with torch.no_grad():
        assert torch.allclose(model.text(ids, trim=True), model.text(ids, trim=False), atol=1e-5)
