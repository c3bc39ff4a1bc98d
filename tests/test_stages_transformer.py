"""Stage 2's glue: caption ids with per-position pads and BPE dropout, pairs served by index, the
`train transformer` / `eval transformer` / `info` commands, and the tokenizer checks."""

import json
import shutil

import pytest
import torch

from minidalle.stages import transformer as t2i
from minidalle.model import caption_ids
from minidalle.stages import text_tokenizer
from minidalle.stages.text_tokenizer import train_text_tokenizer
from minidalle.bpe import RegexTokenizer
from minidalle.cli.main import main
from minidalle.config import get_config, parse_overrides
from minidalle.errors import CheckpointError, ConfigError, DataError
from minidalle.model import Layout

CAPTIONS = ["a red circle.", "a small blue square at the top left.", "two shapes: a green triangle above a red circle."]


@pytest.fixture(scope="module")
def tok():
    return RegexTokenizer(lowercase=True).train(CAPTIONS * 20, 300, progress=False)


def test_caption_ids_pad_each_position_with_its_own_id(tok):
    lay = Layout(text_len=40, text_vocab=tok.vocab_size, grid=4, image_vocab=8)
    ids, cut = caption_ids(tok, CAPTIONS[0], lay)
    n = len(tok.encode(CAPTIONS[0]))
    assert not cut and len(ids) == 40
    assert ids[:n] == tok.encode(CAPTIONS[0])
    assert ids[n:] == [tok.vocab_size + p for p in range(n, 40)]


def test_caption_ids_with_dropout_vary_by_seed_and_never_cut(tok):
    lay = Layout(text_len=40, text_vocab=tok.vocab_size, grid=4, image_vocab=8)
    plain = caption_ids(tok, CAPTIONS[2], lay)[0]
    drawn = {tuple(caption_ids(tok, CAPTIONS[2], lay, dropout=0.5, seed=s)[0]) for s in range(20)}
    n_plain = sum(i < tok.vocab_size for i in plain)
    assert len(drawn) > 1 and any(sum(i < tok.vocab_size for i in d) > n_plain for d in drawn)  # more, shorter tokens
    assert caption_ids(tok, CAPTIONS[2], lay, 0.5, seed=3) == caption_ids(tok, CAPTIONS[2], lay, 0.5, seed=3)
    # a text length the plain encoding just fits: dropout (more, shorter tokens) falls back to it
    tight = Layout(text_len=len(tok.encode(CAPTIONS[2])), text_vocab=tok.vocab_size, grid=4, image_vocab=8)
    for s in range(20):
        ids, cut = caption_ids(tok, CAPTIONS[2], tight, dropout=0.9, seed=s)
        assert not cut and ids == tok.encode(CAPTIONS[2])


def test_a_caption_that_does_not_fit_is_refused_or_cut_and_counted(tok):
    lay = Layout(text_len=3, text_vocab=tok.vocab_size, grid=2, image_vocab=8)
    with pytest.raises(DataError, match="more than the model.s 3"):
        caption_ids(tok, CAPTIONS[1], lay)
    ids, cut = caption_ids(tok, CAPTIONS[1], lay, truncate=True)
    assert cut and ids == tok.encode(CAPTIONS[1])[:3]
    pairs = t2i.Pairs(torch.zeros(3, 4, dtype=torch.long), CAPTIONS, tok, lay, batch_size=2)
    assert pairs.cut == sum(len(tok.encode(c)) > 3 for c in CAPTIONS) >= 2


def test_pairs_are_a_pure_function_of_the_batch_index(tok):
    lay = Layout(text_len=40, text_vocab=tok.vocab_size, grid=2, image_vocab=8)
    codes = torch.arange(3 * 4).view(3, 4)
    a = t2i.Pairs(codes, CAPTIONS, tok, lay, batch_size=2, seed=5, dropout=0.3)
    b = t2i.Pairs(codes, CAPTIONS, tok, lay, batch_size=2, seed=5, dropout=0.3)
    for i in (7, 0, 3):  # any order, any instance: exact resume needs nothing but i
        for x, y in zip(a(i), b(i)):
            assert torch.equal(x, y)
    seen = torch.cat([a(i)[1] for i in range(3)])  # 6 samples = two epochs of 3, each a permutation
    assert sorted(seen[:3, 0].tolist()) == [0, 4, 8] and sorted(seen[3:, 0].tolist()) == [0, 4, 8]
    # the caption travels with its image
    text, image = a(1)
    for row_text, row_image in zip(text, image):
        caption = CAPTIONS[int(row_image[0]) // 4]
        ids = [i for i in row_text.tolist() if i < tok.vocab_size]
        assert tok.decode(ids) == caption.lower()


def test_real_captions_that_do_not_fit_are_cut_and_counted_not_refused(tmp_path, monkeypatch):
    long = "a very long caption " * 20
    monkeypatch.setattr(text_tokenizer, "training_captions", lambda data, n=None: CAPTIONS * 30 + [long])
    cfg = get_config("smoke", {"data.dataset": "folder", "data.path": str(tmp_path), "text.text_len": 16,
                               "text.vocab_size": 320, "text.out_dir": str(tmp_path / "bpe")})
    lines = []
    summary = train_text_tokenizer(cfg, log=lines.append)
    assert summary["captions_cut"] == 1
    assert any("1 of 91 training captions are longer than text.text_len=16" in line for line in lines)


def test_captions_that_run_out_of_merges_before_the_vocab_size_are_refused(tmp_path, monkeypatch):
    # "ab ab ab" splits into the chunks "ab", " ab", " ab": merge (a, b), then (" ", ab), then nothing is
    # left to pair, so 2 merges: 258 tokens at most
    monkeypatch.setattr(text_tokenizer, "training_captions", lambda data, n=None: ["ab ab ab"] * 10)
    cfg = get_config("smoke", {"data.dataset": "folder", "data.path": str(tmp_path), "text.vocab_size": 300,
                               "text.out_dir": str(tmp_path / "bpe")})
    with pytest.warns(UserWarning, match="allows only"), \
            pytest.raises(DataError, match=r"allow only 258 tokens .*--text.vocab_size=258 or lower"):
        train_text_tokenizer(cfg, log=lambda m: None)
    assert not (tmp_path / "bpe").exists()  # nothing written


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run of `train transformer` (it trains the tokenizers it needs first)."""
    root = tmp_path_factory.mktemp("t2i")
    flags = [f"--dvae_train.out_dir={root}/dvae", f"--text.out_dir={root}/bpe", f"--train.out_dir={root}/transformer"]
    assert main(["train", "transformer", "--preset", "smoke", *flags]) == 0
    return root, flags


def test_train_transformer_trains_and_records_its_tokenizers(smoke_run):
    root, _ = smoke_run
    from minidalle.infra import checkpoint as ckpt
    from minidalle.stages.image_tokenizer import tokenizer_id

    last = ckpt.latest_valid_checkpoint(root / "transformer" / "checkpoints")
    assert last.name == "step_0000020"
    ids = ckpt.read_config(last)["tokenizers"]
    dvae = ckpt.latest_valid_checkpoint(root / "dvae" / "checkpoints")
    assert ids["dvae"] == tokenizer_id(dvae)
    model, cfg, _ = t2i.load_transformer(last)
    assert cfg.model.n_layer == 3 and not model.training
    metrics = [json.loads(line) for line in (root / "transformer" / "metrics.jsonl").read_text().splitlines()]
    assert {"text_loss", "image_loss"} <= set(metrics[-1])


def test_resuming_with_another_image_tokenizer_is_refused(smoke_run, tmp_path, capsys):
    root, flags = smoke_run
    shutil.copytree(root / "transformer", tmp_path / "transformer")
    flags = [f for f in flags if not f.startswith("--train.out_dir")] + [f"--train.out_dir={tmp_path}/transformer"]
    # another dVAE: a different seed gives different weights
    other = [f"--dvae_train.out_dir={tmp_path}/dvae2", "--dvae_train.seed=7"]
    flags = [f for f in flags if not f.startswith("--dvae_train.out_dir")] + other
    capsys.readouterr()
    assert main(["train", "transformer", "--preset", "smoke", "--resume", "--train.max_steps=30", *flags]) == 2
    err = capsys.readouterr().err
    assert "trained with other tokenizers" in err and "--start-over" in err
    # the same when the checkpoint to continue is named (resume=<folder> in Python)
    named = next((tmp_path / "transformer" / "checkpoints").glob("step_*"))
    cfg = get_config("smoke", {**parse_overrides(flags), "train.max_steps": 30})
    with pytest.raises(CheckpointError, match="trained with other tokenizers"):
        t2i.train_transformer(cfg, resume=str(named), progress=False, log=lambda line: None)


def test_resuming_with_another_architecture_says_so_and_names_the_setting(smoke_run, tmp_path, capsys):
    root, flags = smoke_run
    shutil.copytree(root / "transformer", tmp_path / "transformer")
    flags = [f for f in flags if not f.startswith("--train.out_dir")] + [f"--train.out_dir={tmp_path}/transformer"]
    capsys.readouterr()
    assert main(["train", "transformer", "--preset", "smoke", "--resume", "--train.max_steps=30",
                 "--model.n_layer=4", *flags]) == 2
    err = capsys.readouterr().err
    assert "weights of another architecture" in err and "model.n_layer: 3 -> 4" in err and "--start-over" in err
    assert "optimizer" not in err.split("error:")[-1]


def test_eval_transformer_reports_the_judge_per_split(smoke_run, capsys):
    _, flags = smoke_run
    capsys.readouterr()
    assert main(["eval", "transformer", "--preset", "smoke", "--n", "4", "--json", *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for split in ("val", "heldout"):
        assert 0 <= result[f"{split}_all_single"] <= 1
        assert result[split]["n"] == 4 and "color" in result[split]
    assert result["step"] == 20


def test_eval_without_a_trained_transformer_says_how_to_train_one(tmp_path, capsys):
    assert main(["eval", "transformer", "--preset", "smoke", f"--train.out_dir={tmp_path}/none"]) == 2
    assert "train transformer --preset smoke" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["smoke", "toy", "paper"])
def test_info_counts_every_stage_on_the_meta_device(preset, capsys):
    assert main(["info", "--preset", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = get_config(preset)
    with torch.device("meta"):
        from minidalle.model import DALLE

        expected = sum(p.numel() for p in DALLE.from_config(cfg).parameters())
    assert info["transformer_params"] == expected
    assert info["sequence_len"] == cfg.text.text_len + info["grid"] ** 2
    # 6 FLOPs per weight per token (forward and backward); embedding lookups are not matmuls
    assert 0.5 * 6 * expected < info["flops_weights"] <= 6 * expected
    assert info["flops_per_token"] == pytest.approx(info["flops_weights"] + info["flops_attention"])
    if preset == "paper":
        assert abs(info["transformer_params"] - 12e9) / 12e9 < 0.03 and info["sequence_len"] == 1280


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(smoke_run, tmp_path):
    """Exact resume through the stage-2 data: batch order, BPE dropout and caption dropout included."""
    root, flags = smoke_run
    keep = [f for f in flags if not f.startswith("--train.out_dir")]

    def cfg(out, steps):
        return get_config("smoke", {**parse_overrides(keep), "train.out_dir": str(out), "train.max_steps": steps})

    quiet = {"progress": False, "log": lambda line: None}
    _, straight, _ = t2i.train_transformer(cfg(tmp_path / "a", 12), **quiet)
    stop_at_5 = {"on_step_end": lambda t: t.step == 5 and t.request_stop()}  # same schedule, cut short
    _, first, _ = t2i.train_transformer(cfg(tmp_path / "b", 12), callbacks=stop_at_5, **quiet)
    _, second, _ = t2i.train_transformer(cfg(tmp_path / "b", 12), resume=True, **quiet)
    losses = [r["loss"] for r in first.history["train"] + second.history["train"]]
    assert losses == [r["loss"] for r in straight.history["train"]]


def test_train_guided_trains_on_with_caption_dropout_once(smoke_run, tmp_path):
    root, flags = smoke_run
    cfg = get_config("smoke", overrides=parse_overrides(flags))
    quiet = dict(progress=False, log=lambda line: None)
    model, path = t2i.train_guided(cfg, caption_dropout=0.25, steps=3, out_dir=tmp_path / "guided", **quiet)
    assert model.cfg.caption_dropout == 0.25 and not model.training and path.name == "step_0000003"
    base, _, _ = t2i.load_transformer(t2i.finished_transformer(cfg))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    reloaded, again = t2i.train_guided(cfg, caption_dropout=0.25, steps=3, out_dir=tmp_path / "guided", **quiet)
    assert again == path and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                   reloaded.state_dict().values()))
    with pytest.raises(ConfigError, match="caption dropout 0.25, not 0.1"):    # another recipe in the same folder
        t2i.train_guided(cfg, caption_dropout=0.1, steps=3, out_dir=tmp_path / "guided", **quiet)
    _, more = t2i.train_guided(cfg, caption_dropout=0.25, steps=5, out_dir=tmp_path / "guided", **quiet)
    assert more.name == "step_0000005"                                        # a longer run trains on from step 3
    empty = get_config("smoke", overrides=parse_overrides([f"--train.out_dir={tmp_path}/none"]))
    with pytest.raises(CheckpointError, match="no finished transformer"):
        t2i.train_guided(empty, steps=3, out_dir=tmp_path / "g2", **quiet)
