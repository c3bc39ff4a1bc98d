"""Stage 1 end to end at smoke size: train, reload, encode with a cache, report, CLI."""

import json

import pytest
import torch

from minidalle.cli.main import main
from minidalle.config import get_config
from minidalle.data import ShapesWorld
from minidalle.errors import CheckpointError, DataError
from minidalle.quantize import perplexity, temperature_at
from minidalle.stages.image_tokenizer import encode_dataset, load_dvae, object_cells, psnr, reconstruction_report, tokenizer_id, train_dvae
from minidalle.viz import to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dvae")
    cfg = get_config("smoke", {"dvae_train.out_dir": str(out), "dvae_train.max_steps": 6,
                               "dvae_train.ckpt_every": 3, "dvae_train.eval_every": 3}, smoke=True)
    model, trainer = train_dvae(cfg, progress=False)
    return cfg, model, trainer


def test_training_follows_the_schedules_and_checkpoints(trained):
    cfg, model, trainer = trained
    assert trainer.step == 6 and trainer.last_checkpoint.name == "step_0000006"
    temps = [r["temperature"] for r in trainer.history["train"]]
    assert temps == pytest.approx([temperature_at(k, cfg.dvae) for k in range(1, 7)])  # update k uses step k
    assert all(a > b for a, b in zip(temps, temps[1:]))
    assert len(trainer.history["eval"]) == 2  # eval at steps 3 and 6 on ShapesWorld val


def test_reload_gives_the_same_codes(trained):
    cfg, model, trainer = trained
    again, cfg2 = load_dvae(trainer.last_checkpoint)
    images = ShapesWorld("val", cfg.data.image_size).batch(0, 4)[0]
    assert torch.equal(again.encode(images), model.encode(images)) and cfg2.dvae == cfg.dvae


def test_encode_dataset_caches_by_tokenizer(trained, tmp_path):
    cfg, model, trainer = trained
    ds = ShapesWorld("train", cfg.data.image_size, seed=1)
    tok = tokenizer_id(trainer.last_checkpoint)
    codes = encode_dataset(model, ds, 10, tmp_path, tok, batch_size=4, progress=False)
    assert codes.shape == (10, 4, 4) and codes.dtype == torch.long
    assert torch.equal(codes, model.encode(ds.batch(0, 10)[0]))
    files = list(tmp_path.glob("codes-*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert torch.equal(encode_dataset(model, ds, 10, tmp_path, tok, progress=False), codes)
    assert files[0].stat().st_mtime_ns == stamp  # the second call read the cache, wrote nothing
    encode_dataset(model, ds, 10, tmp_path, "another-tokenizer", progress=False)
    assert len(list(tmp_path.glob("codes-*.safetensors"))) == 2  # a new tokenizer never reuses codes
    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    with pytest.warns(UserWarning, match="unreadable"):
        assert torch.equal(encode_dataset(model, ds, 10, tmp_path, tok, progress=False), codes)
    short = [(im, "") for im in ds.batch(0, 3)[0]]  # a finite dataset of 3 images
    with pytest.raises(DataError, match="ran out after 3 images"):
        encode_dataset(model, short, 5, tmp_path, tok, progress=False)


def test_reconstruction_report_and_psnr(trained):
    cfg, model, trainer = trained
    r = reconstruction_report(model, "heldout", cfg.data.image_size, 8)
    assert r["original"]["overall"] == 1.0 and 0 <= r["reconstruction"]["overall"] <= 1
    assert 0 < r["psnr"] < 100 and 1 <= r["perplexity"] <= cfg.dvae.vocab_size
    # The object cells, recounted by hand from the images: a cell holds an object if any pixel is not black.
    images = ShapesWorld("heldout", cfg.data.image_size, 0, 8).batch(0, 8)[0]  # what the report drew (seed 0)
    h = model.grid_size(cfg.data.image_size)
    f = cfg.data.image_size // h
    by_hand = [[bool(images[i, r_ * f:(r_ + 1) * f, c * f:(c + 1) * f].any()) for r_ in range(h) for c in range(h)]
               for i in range(8)]
    expected = sum(map(sum, by_hand)) / (8 * h * h)
    assert r["object_cells"] == pytest.approx(expected) and 0 < expected < 1
    object_codes = model.encode(images)[torch.tensor(by_hand).reshape(8, h, h)]  # codes of those cells only
    counts = torch.bincount(object_codes, minlength=cfg.dvae.vocab_size)
    assert r["perplexity_objects"] == pytest.approx(float(perplexity(counts)))
    x = torch.rand(2, 3, 4, 4)
    assert psnr(x, x) == float("inf") and psnr(x, x + 0.1) == pytest.approx(20.0, abs=0.01)
    assert to_uint8(torch.ones(1, 3, 2, 2)).shape == (1, 2, 2, 3)


def test_cli_train_and_bench_dvae(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "dvae", "--preset", "smoke", f"--dvae_train.out_dir={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] > 0 and (out / "reconstructions.png").is_file()
    assert main(["train", "dvae", "--preset", "smoke", f"--dvae_train.out_dir={out}"]) == 2  # refuses to overwrite
    assert "resume" in capsys.readouterr().err
    assert main(["bench", "dvae", "--preset", "smoke", "--n", "8", "--out", str(tmp_path / "bench"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["paper_params"]["encoder"] > 50e6 and res["val"]["original"]["n"] == 8
    with pytest.raises(CheckpointError):
        from minidalle.bench.dvae import benchmark_dvae
        benchmark_dvae(get_config("smoke"), tmp_path / "bench", n_eval=8, progress=False)


def test_object_cells_marks_the_cells_with_any_lit_pixel():
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    images[0, 5, 9, 2] = 1      # one faint blue pixel: row 5, column 9 -> cell (1, 2) of an 8x8 grid
    images[1, 31, 0] = 255      # the bottom-left corner -> cell (7, 0)
    cells = object_cells(images, 8)
    assert cells.shape == (2, 8, 8) and cells.dtype == torch.bool
    assert cells.nonzero().tolist() == [[0, 1, 2], [1, 7, 0]]
    with pytest.raises(DataError, match="5x5 grid"):
        object_cells(images, 5)
