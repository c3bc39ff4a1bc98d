"""The main job (`demo`) and the whole-pipeline evaluation (`eval`), on the smoke preset."""

import json
import shutil

import numpy as np
import pytest

from minidalle.stages import pipeline
from minidalle.stages import report as reporting
from minidalle.cli.main import main
from minidalle.config import get_config
from minidalle.errors import CheckpointError, DataError
from minidalle.judge import to_spec


@pytest.fixture(scope="module")
def demo_run(smoke_demo):
    """The session's smoke demo (tests/conftest.py), for the tests that only read what it wrote."""
    return smoke_demo


def test_demo_writes_samples_and_a_report(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    for key in ("val_all_best16", "val_all_single", "heldout_all_best16", "heldout_all_single", "minutes"):
        assert key in report
    for split in ("val", "heldout"):
        single, best = report[f"{split}_all_single"], report[f"{split}_all_best16"]
        assert 0 <= single <= 1 and 0 <= best <= 1
        assert report[f"{split}_gain"] == pytest.approx(best - single)
    assert (demo_run / "samples.png").stat().st_size > 10_000
    md = (demo_run / "report.md").read_text()
    assert "samples.png" in md and "| shape |" in md and "## Stages" in md
    stages = json.loads((demo_run / "stages.json").read_text())
    assert set(stages) == set(pipeline.STAGES) and all(s["seconds"] >= 0 for s in stages.values())
    assert report["minutes_complete"] and report["minutes"] * 60 >= sum(s["seconds"] for s in stages.values())
    assert report["machine"]["cpus"] >= 1 and report["configs"]["train"]["out_dir"] == str(demo_run / "transformer")


def test_per_attribute_counts_are_the_prompts_that_state_it(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    prompts = reporting.split_prompts(get_config("smoke"), report["n_prompts"])
    for split, table in report["per_attribute"].items():
        specs = [to_spec(p) for p in prompts[split]]
        two = sum(len(s.objects) == 2 for s in specs)
        assert table["relation"]["prompts"] == two if two else "relation" not in table
        assert table["two"]["prompts"] == two if two else "two" not in table
        assert table["one"]["prompts"] == len(specs) - two if two < len(specs) else "one" not in table
        if two:
            assert report[f"{split}_two_best16"] == table["two"]["best"]
        assert table["all"]["prompts"] == len(specs) and table["samples"] == len(specs) * report["candidates"]


def test_a_second_demo_reuses_every_stage(demo_run, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a finished stage was trained again")

    for where in ("minidalle.stages.image_tokenizer.train_dvae", "minidalle.stages.transformer.train_transformer",
                  "minidalle.stages.reranker.train_clip", "minidalle.stages.text_tokenizer.train_text_tokenizer"):
        monkeypatch.setattr(where, refuse)
    before = json.loads((demo_run / "stages.json").read_text())
    report = pipeline.run_demo(get_config("smoke"), demo_run, progress=False, log=lambda m: None)
    assert all(s["reused"] for s in report["stages"].values())
    # the stage times are the ones recorded when they were trained, so `minutes` still covers the whole pipeline
    assert {k: s["seconds"] for k, s in report["stages"].items()} == {k: s["seconds"] for k, s in before.items()}


def test_an_interrupted_demo_continues_with_the_stage_it_stopped_in(tmp_path, monkeypatch):
    from minidalle.stages import reranker

    out, real = tmp_path / "run", reranker.train_clip

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(reranker, "train_clip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_demo(get_config("smoke"), out, progress=False, log=lambda m: None)
    assert set(json.loads((out / "stages.json").read_text())) == {"dvae", "bpe", "transformer"}

    calls = []
    monkeypatch.setattr(reranker, "train_clip", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("minidalle.stages.transformer.train_transformer",
                        lambda *a, **k: pytest.fail("the finished transformer was trained again"))
    report = pipeline.run_demo(get_config("smoke"), out, n_prompts=2, progress=False, log=lambda m: None)
    assert calls == [1] and not report["stages"]["clip"]["reused"] and report["stages"]["transformer"]["reused"]
    assert (out / "report.json").is_file()


def test_stage_one_is_trained_again_with_the_next_seed_when_it_lost_the_meaning(tmp_path, monkeypatch):
    import minidalle.stages.image_tokenizer as it

    readings = iter([0.4, 0.97])
    monkeypatch.setattr(pipeline, "_smoke", lambda cfg: False)  # smoke runs skip the check: too few updates
    monkeypatch.setattr(it, "reconstruction_report",
                        lambda *a, **k: {"reconstruction": {"overall": next(readings)}, "psnr": 20.0})
    cfg = pipeline.stage_config(get_config("smoke"), tmp_path / "run", seed=5)
    (tmp_path / "run" / "transformer" / "checkpoints").mkdir(parents=True)  # trained on the codes about to change
    st = pipeline._Stages(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    entry = pipeline._dvae_stage(st)
    assert not (tmp_path / "run" / "transformer").exists()
    assert list((tmp_path / "run").glob("set-aside-*/transformer/checkpoints"))
    assert [t["seed"] for t in entry["tries"]] == [5, 6] and [t["judge"] for t in entry["tries"]] == [0.4, 0.97]
    assert list((tmp_path / "run" / "dvae").glob("set-aside-*"))  # the rejected run is kept, not deleted
    assert json.loads((tmp_path / "run" / "stages.json").read_text())["dvae"]["facts"]["seed"] == 6


def test_one_seed_sets_every_stage():
    cfg = pipeline.stage_config(get_config("smoke"), "/tmp/x-minidalle-run", seed=7)
    assert (cfg.dvae_train.seed, cfg.train.seed, cfg.clip_train.seed) == (7, 7, 7)
    assert cfg.clip_train.out_dir.endswith("x-minidalle-run/clip")
    shutil.rmtree("/tmp/x-minidalle-run", ignore_errors=True)


def test_accuracy_table_single_is_the_mean_and_best_is_the_top_scored():
    ok = np.array([[True, False, False, False], [False, False, True, False]])
    shape = ok.astype(float)
    relation = np.array([[np.nan] * 4, [1.0, 0.0, 0.0, 1.0]])  # only the second caption states a relation
    scores = np.array([[0.1, 0.9, 0.2, 0.3], [0.0, 0.1, 0.8, 0.2]])
    verdicts = {"ok": ok, "checks": {"shape": shape, "relation": relation, "size": np.full((2, 4), np.nan)}}
    t = reporting.accuracy_table(verdicts, scores)
    assert t["all"] == {"single": 0.25, "best": 0.5, "prompts": 2}
    assert t["relation"] == {"single": 0.5, "best": 0.0, "prompts": 1}
    assert "size" not in t and t["samples"] == 8


def test_accuracy_table_splits_one_and_two_object_captions_and_counts_swaps():
    ok = np.array([[True, False], [False, True], [False, False]])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    swap = np.array([[np.nan, np.nan], [0.0, 0.0], [1.0, 0.0]])  # prompt 0: one object, no swap possible
    verdicts = {"ok": ok, "checks": {}, "swap": swap, "objects": np.array([1, 2, 2])}
    t = reporting.accuracy_table(verdicts, scores)
    assert t["one"] == {"single": 0.5, "best": 1.0, "prompts": 1}
    assert t["two"] == {"single": 0.25, "best": 0.5, "prompts": 2}
    assert t["binding_swaps"] == {"single": 0.25, "best": 0.5, "prompts": 2}  # prompt 2's pick is the swap
    head = reporting._headline({"val": t}, 2)
    assert head["val_two_best2"] == 0.5 and head["val_binding_swaps_single"] == 0.25 and head["val_one_best2"] == 1.0
    md = reporting.accuracy_markdown({"per_attribute": {"val": t}})
    assert "| all facts, two-object captions | 2 | 0.250 | 0.500 |" in md and "binding swaps" in md


def test_eval_reads_the_demo_run_and_writes_its_report(demo_run, capsys):
    assert main(["eval", "--preset", "smoke", "--run", str(demo_run), "--n", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_prompts"] == 3 and res["per_attribute"]["val"]["samples"] == 3 * 16
    assert json.loads((demo_run / "eval.json").read_text())["val_all_best16"] == res["val_all_best16"]
    assert "| attribute |" in (demo_run / "eval.md").read_text()


def test_eval_without_a_run_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="make demo"):
        reporting.evaluate_run(get_config("smoke"), tmp_path / "missing")
    with pytest.raises(DataError, match="judge"):
        reporting.evaluate_run(get_config("smoke", {"data.dataset": "emoji"}), tmp_path)


def test_start_over_sets_the_earlier_run_aside(tmp_path):
    out = tmp_path / "run"
    (out / "transformer").mkdir(parents=True)
    (out / "stages.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    aside = pipeline.set_aside(out)
    assert (aside / "transformer").is_dir() and (aside / "stages.json").is_file()
    assert (out / "notes.txt").is_file() and not (out / "transformer").exists()
    assert pipeline.set_aside(out) is None


def test_eval_seeds_puts_runs_side_by_side_preferring_their_eval(tmp_path, capsys):
    a, b = tmp_path / "s1", tmp_path / "s2"
    for run, seed in ((a, 1), (b, 2)):
        run.mkdir()
        (run / "report.json").write_text(json.dumps({"seed": seed, "minutes": 9.5, "machine_gflops": 61.0,
                                                     "n_prompts": 64, "val_all_single": 0.5, "val_two_best16": 0.9}))
    (b / "eval.json").write_text(json.dumps({"n_prompts": 256, "val_all_single": 0.75}))
    assert main(["eval", "seeds", "--runs", str(a), str(b), "--out", str(tmp_path / "sum")]) == 0
    rows = json.loads((tmp_path / "sum" / "seeds.json").read_text())["rows"]
    assert [(r["seed"], r["from"], r["prompts"], r["val_all_single"]) for r in rows] == [
        (1, "report.json", 64, 0.5), (2, "eval.json", 256, 0.75)]
    md = (tmp_path / "sum" / "seeds.md").read_text()
    assert "| 1 | 64 | 0.50 |" in md and "| 2 | 256 | 0.75 |" in md and "Generated" in md
    with pytest.raises(CheckpointError, match="report.json"):
        reporting.seeds_summary([tmp_path / "empty"])
    assert main(["eval", "seeds", "--out", str(tmp_path / "sum")]) == 2  # no --runs: a one-line refusal
    assert "--runs" in capsys.readouterr().err
