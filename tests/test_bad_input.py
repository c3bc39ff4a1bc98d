"""Every command, fed wrong types, sizes, paths and damaged files, answers like a tool, not a crash.

The contract checked for each case: exit status 2, the last line on stderr is one `error: ...`
line that names the input (the flag or the file), there is no traceback, nothing was trained or
written, and no temporary file is left behind. Damaged checkpoint files are fuzzed at random offsets
with hypothesis: each damaged checkpoint is refused with a message, or the resume falls back to an
older intact one, and is never loaded with contents other than the ones saved.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidalle.infra import checkpoint as ckpt
from minidalle.cli.main import main
from minidalle.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


# --- inputs the cases need, made in the test's folder -------------------------------------------------

def full_checkpoint(d: Path) -> None:
    ckpt.save_checkpoint(d / "ck", 1, torch.nn.Linear(2, 2), {"step": 1}, {"train": {}})


def a_file(d: Path) -> None:
    (d / "notes.txt").write_text("not a folder\n")


def bad_captions(line: str):
    def make(d: Path) -> None:
        main(["data", "--preset", "smoke", "--n", "2", "--out", str(d / "split"), "--json"])
        (d / "split" / "captions.jsonl").write_text(line + "\n")
    return make


def non_utf8_captions(d: Path) -> None:
    (d / "split").mkdir()
    (d / "split" / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "caf\xe9"}\n')


def missing_image(d: Path) -> None:
    bad_captions('{"file": "gone.png", "caption": "a red circle"}')(d)


def broken_images(d: Path) -> None:
    (d / "imgs").mkdir()
    for i in range(4):
        (d / "imgs" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a header, then garbage
        (d / "imgs" / f"{i}.txt").write_text("a picture\n")


def truncated_shard(d: Path) -> None:
    from PIL import Image
    import io

    (d / "shards").mkdir()
    with tarfile.open(d / "shards" / "000.tar", "w") as tar:
        for i in range(8):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(buf, format="PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.txt", b"a red square\n")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = (d / "shards" / "000.tar").read_bytes()
    (d / "shards" / "000.tar").write_bytes(whole[: len(whole) // 3 // 512 * 512])  # cut on a block boundary


def every_checkpoint_claims_format_2(d: Path) -> None:
    shutil.copytree(_smoke_run(), d / "run")
    for m in (d / "run" / "checkpoints").glob("step_*/manifest.json"):
        m.write_text(m.read_text().replace('"format": 1', '"format": 2'))


def used_out_dir(d: Path) -> None:
    shutil.copytree(_smoke_run(), d / "run")


def no_setup(d: Path) -> None:
    pass


TRAIN = ["train", "dvae", "--preset", "smoke"]
T2 = ["train", "transformer", "--preset", "smoke"]
TC = ["train", "clip", "--preset", "smoke"]
CASES = {
    # config values: wrong type, out of range, not finite, unknown
    "batch_size=0": (TRAIN + ["--dvae_train.batch_size=0"], no_setup, "dvae_train.batch_size=0 is invalid"),
    "batch_size<0": (TRAIN + ["--dvae_train.batch_size=-3"], no_setup, "dvae_train.batch_size=-3 is invalid"),
    "batch_size=2.5": (TRAIN + ["--dvae_train.batch_size=2.5"], no_setup, "'dvae_train.batch_size' expects int"),
    "lr=fast": (TRAIN + ["--dvae_train.lr=fast"], no_setup, "'dvae_train.lr' expects float"),
    "lr=nan": (TRAIN + ["--dvae_train.lr=nan"], no_setup, "'dvae_train.lr' expects float (a finite number)"),
    "lr=inf": (TRAIN + ["--dvae_train.lr=inf"], no_setup, "'dvae_train.lr' expects float (a finite number)"),
    "max_steps=0": (TRAIN + ["--dvae_train.max_steps=0"], no_setup, "dvae_train.max_steps=0 is invalid"),
    "keep_last=1": (TRAIN + ["--dvae_train.keep_last=1"], no_setup, "dvae_train.keep_last=1 is invalid"),
    "min_lr>lr": (TRAIN + ["--dvae_train.min_lr=1"], no_setup,
                  "dvae_train.min_lr=1.0 is invalid: it must be between 0 and dvae_train.lr=0.0003"),
    "parallel=mpi": (TRAIN + ["--dvae_train.parallel=mpi"], no_setup, "dvae_train.parallel='mpi' is invalid"),
    "grad_accum=0": (TRAIN + ["--dvae_train.grad_accum=0"], no_setup, "dvae_train.grad_accum=0 is invalid"),
    "fp16 with fsdp": (TRAIN + ["--dvae_train.parallel=fsdp", "--dvae_train.precision=fp16"], no_setup,
                       "with dvae_train.parallel=fsdp use bf16"),
    "powersgd without ddp": (TRAIN + ["--dvae_train.powersgd_rank=4"], no_setup,
                             "add --dvae_train.parallel=ddp or set --dvae_train.powersgd_rank=0"),
    "powersgd with skip": (TRAIN + ["--dvae_train.parallel=ddp", "--dvae_train.powersgd_rank=4",
                                    "--dvae_train.nonfinite=skip"], no_setup, "error-feedback memory"),
    "vq on many processes": (TRAIN + ["--dvae.quantizer=vq", "--dvae_train.parallel=ddp"], no_setup,
                             "codebooks would drift apart"),
    "export nowhere": (["export", "{d}/nowhere"], no_setup, "no checkpoint folder at {d}/nowhere"),
    "export a full checkpoint": (["export", "{d}/ck/step_0000001"], full_checkpoint, "is already a full checkpoint"),
    "hidden=6": (TRAIN + ["--dvae.hidden=6"], no_setup, "dvae.hidden=6 is invalid"),
    "quantizer": (TRAIN + ["--dvae.quantizer=kmeans"], no_setup, "dvae.quantizer='kmeans' is invalid"),
    "tau_end=0": (TRAIN + ["--dvae.tau_end=0"], no_setup, "dvae.tau_end=0.0 is invalid"),
    "skip_rate=2": (TRAIN + ["--data.max_skip_rate=2"], no_setup, "data.max_skip_rate=2.0 is invalid"),
    "image_size=30": (TRAIN + ["--data.image_size=30"], no_setup, "image size 30 is not divisible"),
    "dataset": (TRAIN + ["--data.dataset=imagenet"], no_setup, "data.dataset='imagenet' is invalid"),
    "unknown key": (TRAIN + ["--dvae_train.lrr=1"], no_setup, "unknown config key 'dvae_train.lrr'"),
    "bare word": (TRAIN + ["oops"], no_setup, "override 'oops' should look like --key=value"),
    "preset": (["train", "dvae", "--preset", "huge"], no_setup, "unknown preset 'huge'"),
    "text_len=0": (["train", "bpe", "--preset", "smoke", "--text.text_len=0"], no_setup, "text.text_len=0 is invalid"),
    "vocab<256": (["train", "bpe", "--preset", "smoke", "--text.vocab_size=100"], no_setup,
                  "text.vocab_size=100 is invalid"),
    "image_size=1e9": (["data", "--preset", "smoke", "--data.image_size=1e9", "--out", "{d}/out"], no_setup,
                       "data.image_size=1000000000 is invalid"),
    # argparse: one line too, naming the argument
    "n=0": (["data", "--n", "0", "--out", "{d}/out"], no_setup, "argument --n: 0 is not a positive number"),
    "n=abc": (["bench", "judge", "--n", "abc"], no_setup, "argument --n: 'abc' is not a whole number"),
    "mib=abc": (["bench", "bpe", "--mib", "abc"], no_setup, "argument --mib: 'abc' is not a number"),
    "resume and start over": (TRAIN + ["--resume", "--start-over"], no_setup,
                              "argument --start-over: not allowed with argument --resume"),
    "bpe --resume": (["train", "bpe", "--preset", "smoke", "--resume"], no_setup,
                     "--resume applies to `train dvae`, `train transformer` and `train clip`"),
    "split": (["data", "--split", "test", "--out", "{d}/out"], no_setup, "argument --split: invalid choice: 'test'"),
    "command": (["trian", "dvae"], no_setup, "argument command: invalid choice: 'trian'"),
    "mib<0": (["bench", "bpe", "--mib", "-1"], no_setup, "argument --mib: -1 is not a positive number"),
    "mib=nan": (["bench", "bpe", "--mib", "nan"], no_setup, "argument --mib: nan is not a positive number"),
    "device": (TRAIN + ["--dvae_train.device=xyz"], no_setup, "dvae_train.device='xyz' is not a device"),
    "image_size=4": (TRAIN + ["--data.image_size=4"], no_setup, "image_size=4 is too small to draw shapes"),
    # paths: a file where a folder belongs, a folder that is not there
    "dvae out is a file": (TRAIN + ["--dvae_train.out_dir={d}/notes.txt/run"], a_file,
                           "--dvae_train.out_dir={d}/notes.txt/run: {d}/notes.txt is a file"),
    "bpe out is a file": (["train", "bpe", "--preset", "smoke", "--text.out_dir={d}/notes.txt"], a_file,
                          "--text.out_dir={d}/notes.txt: {d}/notes.txt is a file"),
    "bench out is a file": (["bench", "dvae", "--preset", "smoke", "--out", "{d}/notes.txt"], a_file,
                            "--out={d}/notes.txt: {d}/notes.txt is a file"),
    "demo out is a file": (["demo", "--preset", "smoke", "--out", "{d}/notes.txt"], a_file,
                           "--out={d}/notes.txt: {d}/notes.txt is a file"),
    "demo device": (["demo", "--preset", "smoke", "--out", "{d}/run", "--device", "npu"], no_setup,
                    "--device='npu' is not a device"),
    "demo n=0": (["demo", "--preset", "smoke", "--out", "{d}/run", "--n-prompts", "0"], no_setup,
                 "argument --n-prompts: 0 is not a positive number"),
    "eval no run": (["eval", "--preset", "smoke", "--run", "{d}/nowhere"], no_setup,
                    "no run folder {d}/nowhere: make one with `make demo`"),
    "bench all skip": (["bench", "all", "--preset", "smoke", "--skip", "dave"], no_setup,
                       "--skip dave: unknown benchmark 'dave'"),
    "data out is a file": (["data", "--preset", "smoke", "--n", "2", "--out", "{d}/notes.txt"], a_file,
                           "{d}/notes.txt is a file"),
    "data out below a file": (["data", "--preset", "smoke", "--n", "2", "--out", "{d}/notes.txt/x"], a_file,
                              "--out={d}/notes.txt/x: {d}/notes.txt is a file"),
    "judge no folder": (["judge", "{d}/nowhere"], no_setup, "{d}/nowhere/captions.jsonl not found"),
    "folder no path": (TRAIN + ["--data.dataset=folder"], no_setup, "the folder dataset needs data.path"),
    "folder missing": (TRAIN + ["--data.dataset=folder", "--data.path={d}/nowhere"], no_setup,
                       "folder dataset {d}/nowhere: not a folder"),
    "tar none": (TRAIN + ["--data.dataset=tar", "--data.path={d}"], no_setup, "no .tar files matched"),
    # damaged inputs
    "captions types": (["judge", "{d}/split"], bad_captions('{"file": 123, "caption": 5}'),
                       "{d}/split/captions.jsonl, line 1: expected a JSON object whose 'file'"),
    "captions list": (["judge", "{d}/split"], bad_captions('["a.png", "a red circle"]'),
                      "{d}/split/captions.jsonl, line 1"),
    "captions utf8": (["judge", "{d}/split"], non_utf8_captions, "{d}/split/captions.jsonl is not UTF-8"),
    "captions image gone": (["judge", "{d}/split"], missing_image, "{d}/split/gone.png"),
    "broken images": (TRAIN + ["--data.dataset=folder", "--data.path={d}/imgs"], broken_images,
                      "4 of 4 items skipped"),
    "truncated shard": (TRAIN + ["--data.dataset=tar", "--data.path={d}/shards"], truncated_shard, "bad_shard"),
    "no valid checkpoint": (TRAIN + ["--dvae_train.out_dir={d}/run", "--resume"], every_checkpoint_claims_format_2,
                            "cannot resume: none of the 2 checkpoints in {d}/run/checkpoints can be read"),
    "used out_dir": (TRAIN + ["--dvae_train.out_dir={d}/run"], used_out_dir,
                     "continue that run with --resume (resume=True in Python)"),
    # stage 2: the model section, the transformer's commands
    "n_head=0": (T2 + ["--model.n_head=0"], no_setup, "model.n_head=0 is invalid"),
    "kernel even": (T2 + ["--model.conv_kernel=4"], no_setup, "model.conv_kernel=4 is invalid: it must be odd"),
    "kernel > grid": (T2 + ["--model.conv_kernel=5"], no_setup, "model.conv_kernel=5 is invalid for a 4x4 image grid"),
    "attn_impl": (T2 + ["--model.attn_impl=fast"], no_setup, "model.attn_impl='fast' is invalid"),
    "caption dropout=1": (T2 + ["--model.caption_dropout=1"], no_setup, "model.caption_dropout=1.0 is invalid"),
    "precision": (T2 + ["--train.precision=fp8"], no_setup, "train.precision='fp8' is invalid"),
    "ema=1": (T2 + ["--train.ema_decay=1"], no_setup, "train.ema_decay=1.0 is invalid"),
    "transformer out is a file": (T2 + ["--train.out_dir={d}/notes.txt"], a_file,
                                  "--train.out_dir={d}/notes.txt: {d}/notes.txt is a file"),
    "temperature<0": (["eval", "transformer", "--temperature", "-1"], no_setup,
                      "argument --temperature: -1 is not a number >= 0"),
    "eval nothing trained": (["eval", "transformer", "--preset", "smoke"], no_setup,
                             "no transformer checkpoint in runs/smoke/transformer"),
    "eval not a checkpoint": (["eval", "transformer", "--preset", "smoke", "--checkpoint", "{d}/nowhere"], no_setup,
                              "{d}/nowhere"),
    "info preset": (["info", "--preset", "huge"], no_setup, "unknown preset 'huge'"),
    # the reranker: its sections and its commands
    "clip heads": (TC + ["--clip.text_heads=3"], no_setup,
                   "clip.text_width=32 is invalid: it must be a multiple of clip.text_heads=3"),
    "clip temperature=0": (TC + ["--clip.temperature=0"], no_setup, "clip.temperature=0.0 is invalid"),
    "clip negatives=-1": (TC + ["--clip.hard_negatives=-1"], no_setup, "clip.hard_negatives=-1 is invalid"),
    "clip downsamples": (TC + ["--clip.image_downsamples=5"], no_setup,
                         "clip.image_downsamples=5 is invalid for 16x16 images"),
    "clip lr=0": (TC + ["--clip_train.lr=0"], no_setup, "clip_train.lr=0.0 is invalid"),
    "clip device": (TC + ["--clip_train.device=xyz"], no_setup, "clip_train.device='xyz' is not a device"),
    "clip out is a file": (TC + ["--clip_train.out_dir={d}/notes.txt"], a_file,
                           "--clip_train.out_dir={d}/notes.txt: {d}/notes.txt is a file"),
    "eval clip nothing trained": (["eval", "clip", "--preset", "smoke"], no_setup,
                                  "no reranker checkpoint at runs/smoke/clip"),
    "eval clip not a checkpoint": (["eval", "clip", "--preset", "smoke", "--checkpoint", "{d}/nowhere"], no_setup,
                                   "no reranker checkpoint at {d}/nowhere"),
}


def _files(d: Path) -> dict:
    """Every file under `d` with the sha256 of its bytes."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    argv, setup, needle = CASES[name]
    monkeypatch.chdir(tmp_path)  # default out_dirs (runs/...) land here, not in the repository
    setup(tmp_path)
    before = _files(tmp_path)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skip reports may warn on the way to the error
        assert main([a.format(d=tmp_path) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err, err
    assert needle.format(d=tmp_path) in lines[-1], lines[-1]
    assert not out.strip(), f"a failed command printed a result: {out}"
    after = _files(tmp_path)
    left = [f for f in after if ".tmp" in f]
    assert not left, f"temporary files left behind: {left}"
    if name not in {"broken images", "truncated shard"}:  # these fail only once the data is read
        changed = {f: h for f, h in after.items() if before.get(f) != h and not f.endswith(ckpt.LOCK_FILE)}
        assert not changed and set(before) <= set(after), f"a refused command wrote {sorted(changed)} or deleted " \
                                                          f"{sorted(set(before) - set(after))}"


def test_errors_are_one_line_from_the_real_command_line(tmp_path):
    """The same contract through `python -m minidalle` (the module entry point, a fresh interpreter)."""
    for args, needle in ((["train", "dvae", "--preset", "smoke", "--dvae_train.batch_size=0"], "dvae_train.batch_size=0"),
                         (["judge", str(tmp_path)], "captions.jsonl not found")):
        proc = subprocess.run([sys.executable, "-m", "minidalle", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr and not proc.stdout


def test_a_finished_run_reports_its_last_figures_as_strict_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(_smoke_run(), tmp_path / "run")
    capsys.readouterr()
    assert main(TRAIN + [f"--dvae_train.out_dir={tmp_path / 'run'}", "--resume"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "already finished at step 20; nothing was trained" in "\n".join(out)
    result = json.loads(out[-1], parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    last = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"][-1]
    assert result["final_loss"] == last["loss"] and result["steps"] == 20
    assert result["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step_0000020")


# --- damaged checkpoints, fuzzed ---------------------------------------------------------------------

_RUN = {}


@pytest.fixture(autouse=True, scope="module")
def _run_folder(tmp_path_factory):
    _RUN["factory"] = tmp_path_factory  # where _smoke_run trains, if a case asks for it


def _smoke_run() -> Path:
    """One finished smoke dVAE run (checkpoints at steps 10 and 20), trained once per module."""
    if "path" not in _RUN:
        out = _RUN["factory"].mktemp("smoke-run") / "run"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(TRAIN + [f"--dvae_train.out_dir={out}", "--json"]) == 0
        _RUN["path"] = out
    return _RUN["path"]


def _tiny_run(root: Path) -> Path:
    """A 4-step run of a 4->1 linear model with checkpoints at steps 2 and 4 (milliseconds to make)."""
    from minidalle.config import TrainConfig
    from minidalle.train import Trainer

    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=4, ckpt_every=2, warmup_steps=1, eval_every=0, lr=1e-2, min_lr=1e-3, out_dir=str(root))
    Trainer(torch.nn.Linear(4, 1), cfg, lambda i: torch.full((2, 4), float(i)), lambda m, b: m(b).pow(2).mean(),
            progress=False).fit()
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = _tiny_run(tmp_path_factory.mktemp("tiny") / "run")
    saved = {s: ckpt.read_checkpoint(p) for s, p in ckpt.list_checkpoints(root / "checkpoints")}
    return root, saved


def _same(a: ckpt.Loaded, b: ckpt.Loaded) -> bool:
    def flat(x):
        return json.dumps(x, sort_keys=True, default=lambda t: t.tolist())
    return (a.step == b.step and a.tensors.keys() == b.tensors.keys()
            and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
            and flat(a.state) == flat(b.state) and a.config == b.config)


DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**9), st.just(0)),
)


def _damage(path: Path, how) -> None:
    kind, at, value = how
    data = bytearray(path.read_bytes())
    at = at % (len(data) + 1) if kind == "insert" else at % max(len(data), 1)  # truncate keeps < all bytes
    if kind == "flip" and data:
        data[at] ^= value
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data.insert(at, value)
    elif kind == "delete" and data:
        del data[at]
    path.write_bytes(bytes(data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(victims=st.lists(st.tuples(st.sampled_from([2, 4]), st.sampled_from([*ckpt.PAYLOAD, ckpt.MANIFEST_FILE]),
                                  DAMAGE), min_size=1, max_size=3))
def test_damaged_checkpoints_are_refused_or_skipped_never_loaded_wrong(tiny_run, tmp_path_factory, victims):
    root, saved = tiny_run
    work = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(root, work)
    for step, name, how in victims:
        _damage(work / "checkpoints" / ckpt.step_dir_name(step) / name, how)
    # every folder alone: refused with a CheckpointError naming its folder, or read back exactly
    for step in (2, 4):
        folder = work / "checkpoints" / ckpt.step_dir_name(step)
        try:
            loaded = ckpt.read_checkpoint(folder)
        except CheckpointError as e:
            assert folder.name in str(e)
        else:
            assert _same(loaded, saved[step]), f"{folder.name} loaded with contents other than those saved"
    # a resume: falls back to the newest intact checkpoint, or refuses when there is none
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, rejected = ckpt.find_resumable(work / "checkpoints")
    if loaded is None:
        assert [p.name for p, _ in rejected] == ["step_0000004", "step_0000002"]
    else:
        assert _same(loaded, saved[loaded.step]) and len(rejected) == (4 - loaded.step) // 2


@given(how=DAMAGE)
def test_fuzz_damage_helper_really_damages(tmp_path_factory, how):
    """The fuzz above is only as good as `_damage`: every damage it draws changes the bytes."""
    f = tmp_path_factory.getbasetemp() / "damage-me"
    f.write_bytes(b"abcdefgh")
    _damage(f, how)
    assert f.read_bytes() != b"abcdefgh", how
