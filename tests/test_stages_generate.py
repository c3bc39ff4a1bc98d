"""Text to image end to end on a smoke run: candidates, rankings, `generate`'s folder (read back by the
judge), the reranking curve's arithmetic, prompts files and the CLI's refusals."""

import json

import numpy as np
import pytest
import torch

from minidalle.cli.main import main
from minidalle.config import get_config
from minidalle.data import read_split
from minidalle.errors import CheckpointError, ConfigError, DataError
from minidalle.stages.generate import MARKER, best_of, candidates, curve_from_scores, generate, load_pipeline, rank, read_prompts, rerank_curve, run_config


def test_best_of_picks_the_top_score_of_each_disjoint_group():
    scores = np.array([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 4.0]])
    assert best_of(scores, 2).tolist() == [[1, 2], [0, 3]]
    assert best_of(scores, 4).tolist() == [[1], [3]]
    assert best_of(scores, 1).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_the_curve_judges_what_each_ranking_picks():
    ok = np.array([[False, True, False, False], [True, False, False, False]])
    color = np.array([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    size = np.full((2, 4), np.nan)  # no caption states a size
    verdicts = {"ok": ok, "checks": {"color": color, "size": size}}
    good = ok * 10.0 + color  # a ranking that knows the answer
    bad = -good
    curve = curve_from_scores(verdicts, {"good": good, "bad": bad}, sizes=(1, 2, 4))
    assert curve["good"][1]["all"] == curve["bad"][1]["all"] == ok.mean()  # one sample: rankings can't matter
    assert curve["good"][4]["all"] == 1.0 and curve["bad"][4]["all"] == 0.0
    assert curve["good"][2]["all"] == 0.5  # groups {0,1}->1 ok, {2,3}->2 not; {0,1}->0 ok, {2,3} none: 2 of 4
    assert curve["good"][2]["color"] == 0.75 and curve["good"][2]["size"] is None  # picks 1, 2 | 0, 2


def test_prompts_files(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert read_prompts(f) == ["a red circle", "a blue square"]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, match in (("empty.txt", "no captions"), ("latin1.txt", "UTF-8"), ("missing.txt", "no such file")):
        with pytest.raises(DataError, match=match):
            read_prompts(tmp_path / name)


def test_run_config_points_every_stage_into_the_run_folder(tmp_path):
    cfg = run_config(get_config("smoke"), tmp_path)
    assert cfg.train.out_dir == str(tmp_path / "transformer") and cfg.text.out_dir == str(tmp_path / "bpe")
    assert cfg.dvae_train.out_dir == str(tmp_path / "dvae") and cfg.clip_train.out_dir == str(tmp_path / "clip")
    with pytest.raises(DataError, match="not a folder"):
        run_config(get_config("smoke"), tmp_path / "nowhere")


def test_a_missing_run_says_what_to_train(tmp_path):
    with pytest.raises(CheckpointError, match="train transformer"):
        load_pipeline(get_config("smoke"), run=tmp_path)


# --- on a trained smoke run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(smoke_demo):
    """A smoke run folder with every stage, dvae/, bpe/, transformer/ and clip/: the session's smoke demo
    (tests/conftest.py), which the tests here read or copy, never change."""
    return smoke_demo


@pytest.fixture(scope="module")
def pipe(run):
    return load_pipeline(get_config("smoke"), run=run)


def test_candidates_are_reproducible_and_scored_both_ways(pipe, one_thread):
    prompts = ["a red circle.", "a small blue square above a green triangle."]
    a = candidates(pipe, prompts, n=3, seed=5, progress=False, top_k=8)
    b = candidates(pipe, prompts, n=3, seed=5, progress=False, top_k=8)
    N = pipe.model.layout.image_len
    assert a.codes.shape == (2, 3, N) and torch.equal(a.codes, b.codes)
    size = pipe.cfg.data.image_size
    assert a.images.shape == (2, 3, size, size, 3) and a.images.dtype == torch.uint8
    assert rank(pipe, a, "likelihood").shape == rank(pipe, a, "clip").shape == (2, 3)
    assert torch.all(a.logp < 0)
    with pytest.raises(ConfigError, match="rank by"):
        rank(pipe, a, "judge")


def test_generate_writes_a_folder_the_judge_reads(pipe, tmp_path, one_thread):
    out = tmp_path / "gen"
    prompts = ["a red circle.", "a blue square on the left."]
    res = generate(pipe, prompts, out, n=4, keep=2, progress=False)
    rows = read_split(out)  # the layout `data` writes
    assert [r["caption"] for r in rows] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert [r["rank"] for r in rows] == [1, 2, 1, 2]
    assert rows[0]["score"] >= rows[1]["score"] and rows[2]["score"] >= rows[3]["score"]
    assert all((out / r["file"]).is_file() and (out / r["file"]).with_suffix(".txt").is_file() for r in rows)
    assert (out / "grid.png").stat().st_size > 0 and res["files"] == 4
    assert main(["judge", str(out)]) == 0
    generate(pipe, prompts[:1], out, n=2, keep=1, progress=False, by="likelihood")  # its own folder: replaced
    assert len(read_split(out)) == 1 and not (out / "00003.png").exists()
    assert json.loads((out / MARKER).read_text())["rank"] == "likelihood"


def test_generate_refuses_a_foreign_folder_and_bad_counts(pipe, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="did not write"):
        generate(pipe, ["a red circle."], tmp_path, n=2, keep=1, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="keep"):
        generate(pipe, ["a red circle."], tmp_path / "new", n=2, keep=3, progress=False)


def test_the_rerank_curve_on_a_smoke_run(pipe, tmp_path, one_thread):
    res = rerank_curve(pipe, n_prompts=2, sizes=(1, 2, 4), progress=False, plot=tmp_path / "curve.png")
    for split in ("val", "heldout"):
        curve = res["curve"][split]
        assert set(curve) == {"clip", "likelihood", "judge"}
        assert res[f"{split}_all_single"] == curve["clip"][1]["all"] == curve["judge"][1]["all"]
        # the judge's own pick is the ceiling: never below what another ranking picks
        for size in (1, 2, 4):
            assert curve["judge"][size]["all"] >= max(curve["clip"][size]["all"], curve["likelihood"][size]["all"])
    assert 0 <= res["rank_time_fraction"] <= 1 and (tmp_path / "curve.png").is_file()


@pytest.mark.parametrize("argv,match", [
    (["generate", "--out", "{tmp}/o"], "give a prompt"),
    (["generate", "", "--out", "{tmp}/o"], "prompt 1 is empty"),
    (["generate", "a red circle", "--out", "{tmp}/o", "--keep", "9", "--n", "2"], "keep=9"),
    (["generate", "a red circle", "--out", "{tmp}/o", "--top-p", "0"], "not in"),
    (["generate", "a red circle", "--out", "{tmp}/o", "--top-k", "-1"], ">= 0"),
    (["generate", "a " * 40 + "circle", "--out", "{tmp}/o"], "does not fit"),
    (["generate", "a red circle", "--out", "{tmp}/o", "--run", "{tmp}/none"], "not a folder"),
])
def test_generate_cli_refuses_bad_input_in_one_line(argv, match, run, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--run" not in argv:
        argv += ["--run", str(run)]
    assert main(argv + ["--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_generate_cli_end_to_end_and_truncation_flag(run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["generate", "a " * 40 + "circle", "--truncate", "--n", "2", "--keep", "1", "--out", str(out),
                 "--run", str(run), "--preset", "smoke", "--rank", "likelihood"]) == 0
    text = capsys.readouterr().out
    assert "cut" in text and len(read_split(out)) == 1


# --- messages that name the real cause and the real flag ------------------------------------------------
def test_a_smoke_run_samples_without_naming_its_preset(run, tmp_path, monkeypatch, capsys):
    """The toy preset's (uncapped) clip_train.max_steps used to make a finished smoke reranker 'missing'."""
    monkeypatch.setenv("MINIDALLE_SMOKE", "0")
    assert main(["generate", "a red circle", "--n", "2", "--keep", "1", "--out", str(tmp_path / "o"),
                 "--run", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["sources"]["clip"].startswith(str(run / "clip"))


def test_the_rerank_curve_without_a_reranker_draws_the_other_rankings(run, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=lambda d, names: ["clip"] if d == str(run) else [])
    assert main(["eval", "rerank-curve", "--run", str(bare), "--preset", "smoke", "--n", "1"]) == 0
    said = capsys.readouterr()
    assert "no reranker in" in said.out and "--rank" not in said.out + said.err
    assert (bare / "rerank_curve.png").is_file()


def test_generate_takes_a_checkpoint_folder_as_the_readme_and_export_say(run, tmp_path, capsys):
    from minidalle.infra import checkpoint as ckpt

    step = ckpt.latest_valid_checkpoint(run / "transformer" / "checkpoints")
    assert main(["generate", "a red circle", "--checkpoint", str(step), "--run", str(run), "--n", "2", "--keep", "1",
                 "--out", str(tmp_path / "o"), "--preset", "smoke", "--rank", "likelihood"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["sources"]["transformer"] == str(step)


def test_a_long_prompt_names_the_flag_that_cuts_it(run, tmp_path, capsys):
    assert main(["generate", "a " * 40 + "circle", "--out", str(tmp_path / "o"), "--run", str(run),
                 "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "pass --truncate" in err and "pass truncate=True" not in err


def test_a_prompts_file_with_a_byte_order_mark(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red circle\na blue square\n".encode("utf-8"))
    assert read_prompts(f) == ["a red circle", "a blue square"]


def test_emoji_and_cjk_prompts_draw_without_a_warning_per_glyph(tmp_path):
    import warnings

    from minidalle.viz import save_ranked_grid

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_ranked_grid(["a red circle 😀", "一个红色的圆"], [torch.zeros(2, 8, 8, 3, dtype=torch.uint8)] * 2,
                         [[0.2, 0.1]] * 2, tmp_path / "g.png")
    assert not [w for w in caught if "Glyph" in str(w.message)] and (tmp_path / "g.png").is_file()


def test_a_checkpoint_of_the_other_stage_is_named_as_such(run, tmp_path, capsys):
    from minidalle.infra import checkpoint as ckpt
    from minidalle.stages.reranker import load_clip
    from minidalle.stages.transformer import load_transformer

    reranker = ckpt.latest_valid_checkpoint(run / "clip" / "checkpoints")
    transformer = ckpt.latest_valid_checkpoint(run / "transformer" / "checkpoints")
    assert main(["eval", "transformer", "--checkpoint", str(reranker), "--preset", "smoke", "--n", "1"]) == 2
    assert "is a reranker (CLIP) checkpoint, not a transformer one" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is a transformer checkpoint, not a reranker"):
        load_clip(transformer)
    with pytest.raises(CheckpointError, match=r"is an image tokenizer \(dVAE\) checkpoint .*not a transformer"):
        load_transformer(ckpt.latest_valid_checkpoint(run / "dvae" / "checkpoints"))


def test_a_damaged_checkpoint_is_reported_once(run, tmp_path):
    import shutil
    import warnings

    from minidalle.infra import checkpoint as ckpt

    copy = tmp_path / "clip"
    shutil.copytree(run / "clip", copy)
    newest = ckpt.latest_valid_checkpoint(copy / "checkpoints")
    (newest / ckpt.MODEL_FILE).write_bytes(b"damaged")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # the demo and the loaders look in one folder several times
            assert ckpt.latest_valid_checkpoint(copy / "checkpoints") != newest
    assert sum("skipping invalid checkpoint" in str(w.message) for w in caught) == 1
