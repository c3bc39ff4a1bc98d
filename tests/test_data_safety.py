"""What a command may delete, read and write, tried as a careless or hostile user would (smoke preset).

- `data --out` and `generate --out` delete only files they wrote, only inside their folder, and only
  after deciding that they may; files outside the folder always survive; a refusal changes nothing.
- A run folder cannot run code: a sharded checkpoint's pickled index is never read without
  --trust-sharded.
- `eval` writes where the user pointed it, never where a checkpoint's config.json says.
- `demo` reuses a stage only when it was trained with the settings asked for, retrains one built on
  tokenizers that changed, holds its run folder's lock, and reports the seeds its checkpoints hold.
"""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minidalle.infra import checkpoint as ckpt
from minidalle.stages import pipeline
from minidalle.cli.main import main
from minidalle.config import get_config

LEDGER = ".minidalle-written.json"  # files.LEDGER (spelled out, so this file also runs against older code)

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict:
    """Every file under root (hidden ones too) -> sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(smoke_demo):
    """A smoke run folder with every stage (dvae/, bpe/, transformer/, clip/): the session's smoke demo
    (tests/conftest.py), which the tests here read, or copy before they change anything."""
    return smoke_demo


def generate(run: Path, out: Path, *extra: str) -> int:
    return main(["generate", "a red circle", "a blue square on the left", "--n", "2", "--keep", "1", "--out", str(out),
                 "--run", str(run), "--preset", "smoke", *extra])


# --- data --out ---------------------------------------------------------------------------------------
def test_data_never_deletes_what_a_hand_written_index_names(tmp_path, capsys):
    """The documented captions.jsonl format, written by hand, naming the folder's own image, a file in a
    sibling folder (through ..) and an absolute path: `data --out` refuses, and every file survives."""
    mine, victim = tmp_path / "mine", tmp_path / "victim"
    mine.mkdir()
    victim.mkdir()
    (mine / "cat.png").write_bytes(b"my own image")
    (victim / "keep.png").write_bytes(b"someone else's")
    (tmp_path / "abs.png").write_bytes(b"far away")
    rows = [{"file": "cat.png", "caption": "a cat"}, {"file": "../victim/keep.png", "caption": "x"},
            {"file": str(tmp_path / "abs.png"), "caption": "y"}]
    (mine / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(tmp_path)
    assert main(["data", "--preset", "smoke", "--n", "2", "--out", str(mine)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # not even a lock file: a refused folder is left exactly as it was


def test_data_refuses_a_folder_generate_wrote_without_touching_it(run, tmp_path, capsys):
    out = tmp_path / "gen"
    assert generate(run, out) == 0
    before = snapshot(out)
    assert main(["data", "--preset", "smoke", "--n", "2", "--out", str(out)]) == 2
    assert "holds the output of `generate`" in capsys.readouterr().err
    assert snapshot(out) == before


def test_data_replaces_its_own_folder_and_says_so(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--preset", "smoke", "--n", "3", "--out", str(out)]) == 0
    assert main(["data", "--preset", "smoke", "--n", "1", "--out", str(out)]) == 0
    assert "replaced the 7 files an earlier `data` wrote" in capsys.readouterr().out  # 3 PNGs, 3 .txt, the index
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["00000.png", "00000.txt", "captions.jsonl"]
    (out / "00000.txt").write_text("edited by hand\n")  # changed since data wrote it: not data's to delete
    assert main(["data", "--preset", "smoke", "--n", "1", "--out", str(out)]) == 2
    assert "00000.txt changed since `data` wrote it" in capsys.readouterr().err
    assert (out / "00000.txt").read_text() == "edited by hand\n"


# --- generate --out -------------------------------------------------------------------------------------
def test_generate_with_a_user_file_in_its_folder_loses_nothing(run, tmp_path, capsys):
    out = tmp_path / "gen"
    assert generate(run, out) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert generate(run, out, "--seed", "1") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("tamper", ["index", "ledger"])
def test_generate_never_deletes_a_path_read_from_its_folder(run, tmp_path, tamper, capsys):
    """A captions.jsonl line, or a ledger entry, naming ../victim/keep.png: the victim survives."""
    out, victim = tmp_path / "gen", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.png").write_bytes(b"keep me")
    assert generate(run, out) == 0
    if tamper == "index":
        with open(out / "captions.jsonl", "a") as f:
            f.write(json.dumps({"file": "../victim/keep.png", "caption": "a red circle"}) + "\n")
    else:
        ledger = json.loads((out / LEDGER).read_text())
        ledger["files"]["../victim/keep.png"] = [{"sha256": "0" * 64, "bytes": 7}]
        (out / LEDGER).write_text(json.dumps(ledger))
    before = snapshot(out)
    assert generate(run, out) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert (victim / "keep.png").read_bytes() == b"keep me" and snapshot(out) == before


def test_a_rerun_into_its_own_folder_replaces_it_and_says_so(run, tmp_path, capsys):
    out = tmp_path / "gen"
    assert generate(run, out) == 0
    first = capsys.readouterr().out
    assert "[generate] replaced" not in first
    assert main(["generate", "a red circle", "--n", "2", "--keep", "1", "--out", str(out), "--run", str(run),
                 "--preset", "smoke"]) == 0
    assert "replaced the 7 files an earlier generate wrote" in capsys.readouterr().out  # 2 x (png, txt) + 3
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["00000.png", "00000.txt", "captions.jsonl", "generate.json", "grid.png"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_generate_that_fails_half_way_leaves_the_earlier_results(run, tmp_path, monkeypatch, fail_at):
    from minidalle.stages import generate as gen

    out = tmp_path / "gen"
    assert generate(run, out) == 0
    before = snapshot(out)
    calls = []

    def fail_in_a_chunk(*a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    import minidalle.sampling as sampling

    real = sampling.decode_images
    monkeypatch.setattr(sampling, "decode_images", fail_in_a_chunk)
    pipe = gen.load_pipeline(get_config("smoke"), run=run)
    with pytest.raises(KeyboardInterrupt):  # 4 candidates in chunks of 2: it stops in the first or second one
        gen.generate(pipe, ["a red circle", "a blue square"], out, n=2, keep=1, chunk_size=2, progress=False)
    assert snapshot(out) == before and not list(out.glob(".tmp-*"))  # the staged files went too


def test_an_unwritable_out_is_refused_before_any_sampling(run, tmp_path, monkeypatch):
    """Root writes anywhere, so the folder's refusal is simulated where OwnedFolder makes its staging folder."""
    import minidalle.sampling as sampling
    from minidalle.stages import generate as gen

    pipe = gen.load_pipeline(get_config("smoke"), run=run)
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: pytest.fail("sampled before the folder was checked"))
    real_mkdir = Path.mkdir

    def no_write(self, *a, **k):
        if self.name.startswith(".tmp-generate-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", no_write)
    with pytest.raises(Exception, match="cannot write there"):
        gen.generate(pipe, ["a red circle"], tmp_path / "out", n=2, keep=1, progress=False)


def test_generate_streams_its_candidates_and_estimates_a_long_job(run, tmp_path, monkeypatch, capsys):
    """However large n is, no more than one chunk of candidates is decoded (and so held) at a time."""
    import minidalle.sampling as sampling
    from minidalle.stages import generate as gen

    seen, real = [], sampling.decode_images
    monkeypatch.setattr(sampling, "decode_images", lambda dvae, codes, grid, **k: seen.append(len(codes)) or
                        real(dvae, codes, grid, **k))
    pipe = gen.load_pipeline(get_config("smoke"), run=run)
    out = tmp_path / "streamed"
    res = gen.generate(pipe, ["a red circle", "a green diamond"], out, n=7, keep=2, chunk_size=3, progress=False,
                       by="likelihood")
    assert max(seen) <= 3 and sum(seen) == 14 and res["files"] == 4
    assert "in 5 chunks of 3: about" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["rank"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    # the same draws held whole (candidates, same seed and chunks): its two best of 7 are the ones kept
    whole = gen.candidates(pipe, ["a red circle", "a green diamond"], n=7, seed=0, progress=False, chunk_size=3)
    best = whole.logp.argsort(dim=1, descending=True)[:, :2].tolist()
    assert [r["candidate"] for r in rows] == best[0] + best[1]
    # without chunk_size the chunk is what the sampler fits in memory (here: as if 4 rows fitted)
    seen.clear()
    monkeypatch.setattr(sampling, "rows_per_chunk", lambda *a, **k: 4)
    gen.generate(pipe, ["a red circle"], tmp_path / "default", n=9, keep=1, progress=False, by="likelihood")
    assert seen == [4, 4, 1]


def test_the_overview_shows_a_bounded_number_of_prompts(run, tmp_path, monkeypatch):
    from minidalle.stages import generate as gen
    from minidalle import viz

    got = []
    real = viz.save_ranked_grid
    monkeypatch.setattr(viz, "save_ranked_grid", lambda prompts, *a, **k: got.append(list(prompts)) or
                        real(prompts, *a, **k))
    pipe = gen.load_pipeline(get_config("smoke"), run=run)
    prompts = [f"a red circle {'on the left' if i % 2 else 'at the top'}" for i in range(gen.GRID_PROMPTS + 3)]
    prompts[0] = "a " * 40 + "red circle"  # 90 characters, more tokens than the model reads: cut
    prompts[1] = "a red circle " + "and more " * 2000  # and a runaway one
    res = gen.generate(pipe, prompts, tmp_path / "many", n=1, keep=1, progress=False, by="likelihood",
                       truncate=True)
    assert res["grid_prompts"] == gen.GRID_PROMPTS and len(got[0]) == gen.GRID_PROMPTS and res["files"] == len(prompts)
    shown = got[0][0]  # what the model read, then " ...": fewer words than were typed
    assert shown.endswith(" ...") and shown.count("a ") < prompts[0].count("a ") and len(shown) < len(prompts[0])
    assert len(got[0][1]) <= gen.GRID_CAPTION


# --- train bpe ----------------------------------------------------------------------------------------
def test_train_bpe_sets_a_different_tokenizer_aside_and_generate_says_where(tmp_path, capsys):
    copy = tmp_path / "run"  # a run of its own: a copy's config.json would still name the original's tokenizer
    assert main(["train", "transformer", "--preset", "smoke", f"--dvae_train.out_dir={copy}/dvae",
                 f"--text.out_dir={copy}/bpe", f"--train.out_dir={copy}/transformer"]) == 0
    old = hashlib.sha256((copy / "bpe" / "bpe.model").read_bytes()).hexdigest()
    assert main(["train", "bpe", "--preset", "smoke", f"--text.out_dir={copy}/bpe"]) == 0
    assert "already holds this very tokenizer" in capsys.readouterr().out  # the same settings: nothing moves
    vocab = get_config("smoke").text.vocab_size
    assert main(["train", "bpe", "--preset", "smoke", f"--text.out_dir={copy}/bpe",
                 f"--text.vocab_size={vocab - 1}"]) == 0
    said = capsys.readouterr().out
    (aside,) = (copy / "bpe").glob("set-aside-*")
    assert f"set aside in {aside}" in said
    assert hashlib.sha256((aside / "bpe.model").read_bytes()).hexdigest() == old
    assert generate(copy, tmp_path / "out", "--rank", "likelihood") == 2
    assert f"it was set aside in {aside}" in capsys.readouterr().err


# --- a run folder cannot run code ------------------------------------------------------------------------
class _Planted:
    """Unpickling this creates the file `path`: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def sharded_copy(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of the run whose newest transformer checkpoint claims to be sharded (`sharded_stage`)."""
    shutil.copytree(run, dest)
    return sharded_stage(ckpt.latest_valid_checkpoint(dest / "transformer" / "checkpoints"), marker)


def sharded_stage(step: Path, marker: Path) -> Path:
    """Make checkpoint `step` claim to be sharded, with a planted sharded/.metadata and a manifest that
    vouches for it (whoever writes a folder writes its manifest)."""
    (step / ckpt.MODEL_FILE).unlink()
    (step / "sharded").mkdir()
    (step / "sharded" / ".metadata").write_bytes(pickle.dumps(_Planted(str(marker))))
    files = {}
    for name in (ckpt.CONFIG_FILE, ckpt.STATE_FILE, "sharded/.metadata"):
        data = (step / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = json.loads((step / ckpt.MANIFEST_FILE).read_text())
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps({**manifest, "kind": "sharded", "world": 1, "files": files}))
    return step


def test_the_pickle_in_a_run_folder_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "the-pickle-ran"
    step = sharded_copy(run, tmp_path / "shared", marker)
    runs = {"generate --run": ["generate", "a red circle", "--run", str(tmp_path / "shared"), "--out",
                               str(tmp_path / "o1"), "--preset", "smoke"],
            "generate --checkpoint": ["generate", "a red circle", "--checkpoint", str(step), "--run",
                                      str(tmp_path / "shared"), "--out", str(tmp_path / "o2"), "--preset", "smoke"],
            "eval transformer": ["eval", "transformer", "--checkpoint", str(step), "--preset", "smoke", "--n", "2"],
            "eval pipeline": ["eval", "--run", str(tmp_path / "shared"), "--preset", "smoke", "--n", "2"],
            "export": ["export", str(step)]}
    for name, argv in runs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "--trust-sharded" in err and "pickle" in err, name
        assert not marker.exists(), f"{name} ran the pickle"
    # the test can fail: opting in does read the index, so a planted pickle runs
    assert main(["export", str(step), "--trust-sharded"]) == 2
    assert marker.exists()


def test_a_planted_pickle_in_an_unfinished_stage_never_runs_when_training_continues(run, tmp_path, capsys):
    """demo and train continue an unfinished stage by resuming it; a sharded checkpoint there is not read."""
    marker = tmp_path / "the-pickle-ran"
    shared = tmp_path / "shared"
    shutil.copytree(run, shared)
    shutil.rmtree(ckpt.latest_valid_checkpoint(shared / "dvae" / "checkpoints"))  # stopped a checkpoint earlier
    sharded_stage(ckpt.latest_valid_checkpoint(shared / "dvae" / "checkpoints"), marker)
    train = ["train", "transformer", "--preset", "smoke", f"--dvae_train.out_dir={shared}/dvae",
             f"--text.out_dir={shared}/bpe", f"--train.out_dir={tmp_path}/fresh"]
    for argv in (["demo", "--preset", "smoke", "--out", str(shared), "--n-prompts", "1", "--n", "2"], train):
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "--trust-sharded" in err and not marker.exists(), argv[0]
    assert main(train + ["--trust-sharded"]) == 2 and marker.exists()  # opted in, the planted pickle does run


# --- eval writes where it was pointed --------------------------------------------------------------------
def test_eval_writes_its_grids_beside_the_checkpoint_named_never_where_its_config_says(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)  # its config.json still names the original run's folders
    before = snapshot(run)
    step = ckpt.latest_valid_checkpoint(copy / "transformer" / "checkpoints")
    assert main(["eval", "transformer", "--checkpoint", str(step), "--preset", "smoke", "--n", "2",
                 f"--dvae_train.out_dir={copy}/dvae", f"--text.out_dir={copy}/bpe"]) == 0
    assert (copy / "transformer" / "samples_val.png").is_file() and snapshot(run) == before
    out = tmp_path / "figures"
    assert main(["eval", "transformer", "--checkpoint", str(step), "--preset", "smoke", "--n", "2", "--out", str(out),
                 f"--dvae_train.out_dir={copy}/dvae", f"--text.out_dir={copy}/bpe"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["samples_heldout.png", "samples_val.png"]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["grid"] == str(out / "samples_val.png")


# --- the demo ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(smoke_demo):
    return smoke_demo  # the session's smoke demo (tests/conftest.py): the tests below copy it before changing it


def test_demo_reports_the_seeds_its_checkpoints_hold(demo):
    report = json.loads((demo / "report.json").read_text())
    held = {name: ckpt.read_config(ckpt.latest_valid_checkpoint(demo / name / "checkpoints"))[sec]["seed"]
            for name, sec in (("dvae", "dvae_train"), ("transformer", "train"), ("clip", "clip_train"))}
    assert report["seeds"] == held and report["seed"] == get_config("smoke").train.seed


def test_demo_with_another_seed_on_an_existing_run_is_refused_and_changes_nothing(demo, tmp_path, capsys):
    out = tmp_path / "run"  # a copy: were the refusal to fail, the shared run would be retrained under the others
    shutil.copytree(demo, out)
    before = snapshot(out)
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--seed", "8", "--n-prompts", "2", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.seed 1337, now 8" in err and "clip_train.seed 1337, now 8" in err and "--start-over" in err
    assert snapshot(out) == before


def test_demo_retrains_a_transformer_whose_image_tokenizer_changed(demo, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    old = ckpt.read_config(ckpt.latest_valid_checkpoint(out / "transformer" / "checkpoints"))["tokenizers"]["dvae"]
    shutil.rmtree(out / "dvae" / "checkpoints")
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--n-prompts", "2", "--n", "2",
                 "--dvae_train.lr=0.002"]) == 0
    said = capsys.readouterr().out
    assert "the transformer in" in said and "trained with another image tokenizer" in said
    report = json.loads((out / "report.json").read_text())
    assert not report["stages"]["transformer"]["reused"] and report["stages"]["clip"]["reused"]
    new = ckpt.read_config(report["sources"]["transformer"])["tokenizers"]["dvae"]
    assert new != old and list(out.glob("set-aside-*/transformer/checkpoints"))


def test_start_over_is_refused_while_a_stage_is_being_trained(demo, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from minidalle.infra.checkpoint import RunLock; "
                               f"RunLock({str(out / 'transformer')!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["demo", "--preset", "smoke", "--out", str(out), "--start-over"]) == 2
        assert f"in use by another training run (pid {holder.pid}" in capsys.readouterr().err
        assert (out / "transformer").is_dir() and (out / "dvae").is_dir() and not list(out.glob("set-aside-*"))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_second_demo_on_one_folder_is_refused(demo, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from minidalle.infra.checkpoint import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        assert main(["demo", "--preset", "smoke", "--out", str(out), "--start-over"]) == 2
        assert "in use by another demo" in capsys.readouterr().err
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_start_over_sets_the_earlier_evaluation_aside_too(demo, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    assert main(["eval", "--run", str(out), "--preset", "smoke", "--n", "1", "--json"]) == 0
    assert (out / "eval.json").is_file()
    aside = pipeline.set_aside(out)
    assert {"eval.json", "eval.md", "report.json"} <= {p.name for p in aside.iterdir()}
    assert not (out / "eval.json").exists()


def test_an_interrupted_stage_counts_its_earlier_training_and_says_the_minutes_are_incomplete(tmp_path, monkeypatch):
    from minidalle.train import Trainer

    out, real_fit = tmp_path / "run", Trainer.fit

    def stop_clip_half_way(self, *a, **k):
        if self.section == "clip_train" and not list((self.out_dir / "checkpoints").glob("step_*")):
            self.add_callback("on_step_end", lambda t: t.step == 2 and t.request_stop())
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", stop_clip_half_way)
    interrupted = {"done": False}

    def crash_after_clip(*a, **k):
        if not interrupted["done"]:
            interrupted["done"] = True
            raise KeyboardInterrupt  # the demo dies after the reranker's first two updates were saved
        return real_load(*a, **k)

    import minidalle.stages.generate as gen

    real_load = gen.load_pipeline
    monkeypatch.setattr(gen, "load_pipeline", crash_after_clip)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_demo(get_config("smoke"), out, n_prompts=1, n=2, progress=False, log=lambda m: None)
    earlier = ckpt.read_checkpoint(ckpt.latest_valid_checkpoint(out / "clip" / "checkpoints")).state["train_seconds"]
    report = pipeline.run_demo(get_config("smoke"), out, n_prompts=1, n=2, progress=False, log=lambda m: None)
    clip = report["stages"]["clip"]
    assert report["resumed"] == {"clip": 2} and not report["minutes_complete"] and clip["resumed_from"] == 2
    assert clip["seconds"] >= earlier > 0 and clip["train_seconds"] >= earlier
    assert "not counted" in (out / "report.md").read_text()
    again = pipeline.run_demo(get_config("smoke"), out, n_prompts=1, n=2, progress=False, log=lambda m: None)
    assert again["resumed"] == {"clip": 2} and not again["minutes_complete"]  # a later run still says so


def test_owned_folder_refuses_a_ledger_entry_that_is_not_a_plain_name(tmp_path):
    from minidalle.infra.files import OwnedFolder

    out = OwnedFolder(tmp_path / "o", "generate").check()
    out.write("00000.png", b"x")
    out.commit()
    ledger = json.loads((tmp_path / "o" / LEDGER).read_text())
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"x")
    for bad in (str(victim), "../victim.png", "sub/00000.png", ".hidden", "..", "00001.png\n"):
        entries = {**ledger["files"], bad: ledger["files"]["00000.png"]}
        (tmp_path / "o" / LEDGER).write_text(json.dumps({**ledger, "files": entries}))
        with pytest.raises(Exception, match="not a ledger minidalle wrote"):
            OwnedFolder(tmp_path / "o", "generate").check()
    assert (tmp_path / "o" / "00000.png").read_bytes() == b"x" and victim.read_bytes() == b"x"


def test_a_lock_file_that_is_a_link_is_refused_never_followed(tmp_path, capsys):
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("precious")
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    assert main(["data", "--preset", "smoke", "--n", "1", "--out", str(out)]) == 2
    assert "is not a lock file minidalle made" in capsys.readouterr().err and victim.read_text() == "precious"


def test_a_file_edited_while_the_command_ran_is_not_replaced(tmp_path):
    from minidalle.infra.files import OwnedFolder

    first = OwnedFolder(tmp_path / "o", "generate", index="captions.jsonl").check()
    first.write("00000.png", b"old")
    first.commit()
    second = OwnedFolder(tmp_path / "o", "generate", index="captions.jsonl").check()
    second.write("00000.png", b"new")
    (tmp_path / "o" / "00000.png").write_bytes(b"edited by the user meanwhile")
    with pytest.raises(Exception, match=r"changed since `generate` wrote it; nothing was replaced.* The new files are "
                                         r"in .*set-aside-"):
        second.commit()
    second.abandon()
    assert (tmp_path / "o" / "00000.png").read_bytes() == b"edited by the user meanwhile"
    assert [p.read_bytes() for p in (tmp_path / "o").glob("set-aside-*/00000.png")] == [b"new"]  # kept, in sight
    with pytest.raises(Exception, match="did not write .*set-aside-"):  # refused until they are moved out
        OwnedFolder(tmp_path / "o", "generate", index="captions.jsonl").check()
    third = OwnedFolder(tmp_path / "p", "generate").check()  # a file that appears under a name being written
    third.write("00000.png", b"new")
    (tmp_path / "p" / "00000.png").write_bytes(b"the user's own")
    with pytest.raises(Exception, match="00000.png appeared while `generate` ran"):
        third.commit()
    assert (tmp_path / "p" / "00000.png").read_bytes() == b"the user's own"


def test_a_commit_cut_short_never_leaves_an_index_that_mixes_old_and_new(tmp_path, monkeypatch):
    from minidalle.infra import files

    first = files.OwnedFolder(tmp_path / "o", "data", index="captions.jsonl").check()
    first.write("00000.png", b"old")
    first.write("captions.jsonl", "old index\n")
    first.commit()
    second = files.OwnedFolder(tmp_path / "o", "data", index="captions.jsonl").check()
    second.write("00000.png", b"new")
    second.write("captions.jsonl", "new index\n")
    real, moved = os.replace, []

    def die_after_one(src, dst):  # the process dies after moving one file in (the ledger's writes go through)
        if Path(dst).name.startswith("."):
            return real(src, dst)
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        second.commit()
    monkeypatch.setattr(files.os, "replace", real)
    second.abandon()  # what dying does: the lock goes with the process
    assert not (tmp_path / "o" / "captions.jsonl").exists()  # no index rather than one naming the wrong files
    assert (tmp_path / "o" / "00000.png").read_bytes() == b"new"
    files.OwnedFolder(tmp_path / "o", "data", index="captions.jsonl").check().abandon()  # the ledger covers it all


def test_a_stale_staging_folder_goes_even_when_its_process_id_is_alive(run, tmp_path):
    """In a container every run may be pid 1: under the folder's lock any staging folder left is dead."""
    out = tmp_path / "gen"
    assert generate(run, out) == 0
    (out / ".tmp-generate-1-abcdef").mkdir()  # pid 1 is alive (init), as a container's own pid would be
    (out / ".tmp-generate-1-abcdef" / "00000.png").write_bytes(b"half of a killed run")
    assert generate(run, out) == 0
    assert not (out / ".tmp-generate-1-abcdef").exists()


def test_a_folder_an_older_minidalle_wrote_is_named_as_such(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "00000.png").write_bytes(b"png")
    (out / "captions.jsonl").write_text(json.dumps({"file": "00000.png", "caption": "a red circle"}) + "\n")
    assert main(["data", "--preset", "smoke", "--n", "1", "--out", str(out)]) == 2
    assert "older minidalle, which kept no record of its files" in capsys.readouterr().err


def test_a_setting_added_since_a_run_was_trained_counts_as_its_default(demo, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    step = ckpt.latest_valid_checkpoint(out / "transformer" / "checkpoints")
    config = json.loads((step / ckpt.CONFIG_FILE).read_text())
    del config["train"]["powersgd_rank"]  # as a run from before the setting existed
    rewrite_config(step, config)
    pipeline.check_reuse(pipeline.stage_config(get_config("smoke"), out), out)  # no refusal


def rewrite_config(step: Path, config: dict) -> None:
    """Put `config` in a checkpoint's config.json, with a manifest that vouches for it."""
    (step / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    manifest = json.loads((step / ckpt.MANIFEST_FILE).read_text())
    data = (step / ckpt.CONFIG_FILE).read_bytes()
    manifest["files"][ckpt.CONFIG_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_later_dvae_seed_is_reused_only_as_the_demos_own_retry(demo, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    for step in (p for _, p in ckpt.list_checkpoints(out / "dvae" / "checkpoints")):
        config = ckpt.read_config(step)
        config["dvae_train"]["seed"] += 1  # as if the judge had rejected the first seed's tokenizer
        rewrite_config(step, config)
    cfg = pipeline.stage_config(get_config("smoke"), out)
    with pytest.raises(Exception, match=r"dvae \(dvae_train.seed 1338, now 1337\)"):
        pipeline.check_reuse(cfg, out)  # stages.json records one try only: not the demo's retry
    stages = json.loads((out / "stages.json").read_text())
    stages["dvae"]["tries"] = [{"seed": 1337, "judge": 0.5}, {"seed": 1338, "judge": 0.95}]
    (out / "stages.json").write_text(json.dumps(stages))
    pipeline.check_reuse(cfg, out)


def test_a_bpe_the_demo_trained_is_compared_by_its_settings_not_trained_again(demo, tmp_path, monkeypatch):
    from minidalle.bpe import RegexTokenizer

    out = tmp_path / "run"
    shutil.copytree(demo, out)
    monkeypatch.setattr(RegexTokenizer, "train", lambda *a, **k: pytest.fail("the BPE was trained again"))
    cfg = pipeline.stage_config(get_config("smoke"), out)
    pipeline.check_reuse(cfg, out)
    with pytest.raises(Exception, match=r"bpe \(text.lowercase True, now False\)"):
        pipeline.check_reuse(pipeline.stage_config(get_config("smoke", {"text.lowercase": False}), out), out)


def test_a_damaged_stages_record_is_ignored_with_a_warning(demo, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo, out)
    for text in ("[]", '{"dvae": "x"}', "not json"):
        (out / "stages.json").write_text(text)
        with pytest.warns(UserWarning, match="not the record a demo writes"):
            pipeline.check_reuse(pipeline.stage_config(get_config("smoke"), out), out)


def test_a_damaged_copy_of_the_dvae_is_passed_over_for_an_intact_one(tmp_path, capsys):
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    assert main(["train", "transformer", "--preset", "smoke", f"--dvae_train.out_dir={orig}/dvae",
                 f"--text.out_dir={orig}/bpe", f"--train.out_dir={orig}/transformer"]) == 0
    shutil.copytree(orig, copy)
    weights = ckpt.latest_valid_checkpoint(orig / "dvae" / "checkpoints") / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # the run its config.json names, damaged
    assert generate(copy, tmp_path / "o", "--rank", "likelihood") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["sources"]["dvae"].startswith(str(copy))


def test_a_transformer_is_found_with_its_dvae_after_stage_one_trained_on(tmp_path):
    root = tmp_path / "run"  # a run of its own: a copy's config.json would name the original's dVAE
    flags = [f"--dvae_train.out_dir={root}/dvae", f"--text.out_dir={root}/bpe"]
    assert main(["train", "transformer", "--preset", "smoke", *flags, f"--train.out_dir={root}/transformer"]) == 0
    assert main(["train", "dvae", "--preset", "smoke", "--resume", "--dvae_train.max_steps=30", *flags]) == 0
    assert generate(root, tmp_path / "o", "--rank", "likelihood") == 0  # its dVAE is step 20, kept beside 30
