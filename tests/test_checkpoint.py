"""Checkpoints: atomic under SIGKILL, checksummed, refused when damaged, pruned, never unpickled."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minidalle.infra import checkpoint as ckpt
from minidalle.infra import devices
from minidalle.infra import files
from minidalle.config import TrainConfig
from minidalle.errors import CheckpointError, ConfigError
from minidalle.infra.resume import read_metrics
from minidalle.train import Trainer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


# --- a tiny regression problem shared with the subprocess in test_kill_mid_save ----------------------

def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch_at(i: int):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 4, generator=g)  # (B, 4)
    return x, x.sum(1, keepdim=True)  # target (B, 1)


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def small_cfg(out_dir, **kw) -> TrainConfig:
    base = dict(max_steps=6, ckpt_every=2, warmup_steps=1, eval_every=0, log_every=1, lr=1e-2,
                min_lr=1e-3, out_dir=str(out_dir))
    return TrainConfig(**{**base, **kw})


def run(out_dir, resume=False, **kw):
    trainer = Trainer(make_model(), small_cfg(out_dir, **kw), batch_at, loss_fn, progress=False)
    return trainer, trainer.fit(resume=resume)


def steps_on_disk(out_dir) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(Path(out_dir) / "checkpoints")]


# --- 1. a crash in the middle of a save loses nothing -------------------------------------------------

# Where the second save (step 4) of a 6-step run dies: right after the n-th of its four files lands
# in the temp folder, or right after the finished folder is renamed into place, before pruning.
FILES_WRITTEN = {"after_model": 1, "after_config": 2, "after_state": 3, "after_manifest": 4}
CRASH_POINTS = (*FILES_WRITTEN, "after_rename")


def train_until_killed(out_dir: str, point: str) -> None:
    """Train like `run(out_dir)`, but SIGKILL this process at `point` of the step-4 save.

    The library has no crash hook, so we make one from outside: replace the functions that
    `save_checkpoint` calls (looked up as `ckpt.<name>` / `torch.save` when it runs) with wrappers that
    kill us right after the real function returns (for pruning: instead of calling it). This only
    ever runs in a throwaway child process, so the patches never leak into the test session.
    SIGKILL, not an exception: no `except`, `finally` or atexit handler gets to tidy up -- just like
    a power cut or the OOM killer.
    """
    armed = False  # the step-2 save must finish untouched: it is what the crash must not lose

    def arm(trainer):
        nonlocal armed
        armed = True

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def die_after_nth_file(write, path_arg: int):
        """Wrap a writer whose positional argument `path_arg` is the file it creates."""
        def wrapped(*args, **kwargs):
            result = write(*args, **kwargs)
            folder = Path(args[path_arg]).parent  # whatever folder it is -- a broken save may skip the temp one
            if armed and len(list(folder.iterdir())) == FILES_WRITTEN.get(point):
                die()
            return result
        return wrapped

    def die_before(fn):
        def wrapped(*args, **kwargs):
            if armed:
                die()
            return fn(*args, **kwargs)
        return wrapped

    ckpt.save_model = die_after_nth_file(ckpt.save_model, path_arg=1)  # save_model(model, filename)
    ckpt.write_synced = die_after_nth_file(ckpt.write_synced, path_arg=0)  # config.json and manifest.json
    torch.save = die_after_nth_file(torch.save, path_arg=1)  # state.pt
    if point == "after_rename":
        ckpt.prune_checkpoints = die_before(ckpt.prune_checkpoints)  # called right after the rename
    trainer = Trainer(make_model(), small_cfg(out_dir, device="cpu"), batch_at, loss_fn, progress=False)
    trainer.add_callback("on_checkpoint", arm)
    trainer.fit()


def kill_each_in_a_child(jobs: dict[str, str]) -> None:
    """Subprocess entry point: run `train_until_killed` for each {point: out_dir} in a forked child,
    all at once, and print {point: exit code} as JSON (-9 means killed by SIGKILL, as Popen reports).

    Why fork: importing torch costs ~1.3 s of CPU, and five fresh interpreters on a 2-core machine
    took ~7 s. This process pays once and each child starts with everything loaded. Forking a
    process that has used threads can deadlock the child; here the parent only imports and builds
    one tiny optimizer, which starts no worker threads.
    """
    # The first optimizer a process builds imports torch._dynamo (~0.8 s); do it here, once, so the
    # children inherit it instead of each paying for it.
    torch.optim.AdamW(make_model().parameters())
    children = {}
    for point, out_dir in jobs.items():
        pid = os.fork()
        if pid == 0:  # in the child: never return into the parent's code
            try:
                train_until_killed(out_dir, point)
                print(f"{point}: the save finished, the crash never happened", flush=True)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)
        children[pid] = point
    codes = {children[pid]: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children}
    print(json.dumps(codes), flush=True)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Run every crash point in one subprocess; returns {point: (out_dir, exit code, output)}."""
    outs = {point: tmp_path_factory.mktemp(point) for point in CRASH_POINTS}
    script = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; import test_checkpoint; "
              f"test_checkpoint.kill_each_in_a_child({ {k: str(v) for k, v in outs.items()} !r})")
    # CUDA cannot be used in a forked child once the parent has touched it, and even
    # torch.cuda.is_available() does. These runs test the file system, not the GPU: hide it.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    codes = json.loads(proc.stdout.splitlines()[-1])
    return {point: (outs[point], codes[point], output) for point in CRASH_POINTS}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX fork and SIGKILL")
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_mid_save(killed_runs, tmp_path, point):
    out, code, output = killed_runs[point]
    assert code == -signal.SIGKILL, output
    root = out / "checkpoints"
    temps = [p for p in root.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    if point == "after_rename":  # step 4 is in place and complete; step 2 was not pruned yet
        assert not temps and steps_on_disk(out) == [2, 4]
        ckpt.verify_checkpoint(root / "step_0000004")
        newest = 4
    else:
        assert steps_on_disk(out) == [2]  # no damaged step_* folder is visible...
        assert len(temps) == 1 and temps[0].name.startswith(".tmp-step_0000004-")
        assert len(list(temps[0].iterdir())) == FILES_WRITTEN[point]  # ...though it really died mid-write
        newest = 2

    state, _ = ckpt.load_checkpoint(root / "step_0000002", make_model())  # verifies, then loads
    assert state["step"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped (damaged) newer folder would warn: there must be none
        assert ckpt.latest_valid_checkpoint(root) == root / ckpt.step_dir_name(newest)

        # a new Trainer resumes there, removes the dead writer's temp folder and reproduces an
        # uninterrupted run exactly; the config is unchanged, so it does not warn either
        _, hist = run(out, resume=True, device="cpu")
    assert [r["step"] for r in hist["train"]] == list(range(newest + 1, 7))
    assert not [p for p in root.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    _, straight = run(tmp_path / "straight", device="cpu")  # all on one device: losses match bit for bit
    assert [r["loss"] for r in hist["train"]] == [r["loss"] for r in straight["train"][newest:]]
    assert steps_on_disk(out) == [4, 6]


# --- 2. damaged checkpoints are refused, naming the file -----------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A finished run with checkpoints at steps 4 and 6; returns (out_dir, newest checkpoint folder)."""
    run(tmp_path)
    return tmp_path, tmp_path / "checkpoints" / "step_0000006"


def test_manifest_describes_files(saved):
    _, path = saved
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    for name in ckpt.PAYLOAD:
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert ckpt.verify_checkpoint(path)["step"] == 6


def test_flipped_byte_in_weights_is_refused(saved):
    out, path = saved
    f = path / ckpt.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*checksum"):
        ckpt.load_checkpoint(path, make_model())
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Trainer(make_model(), small_cfg(out, max_steps=8), batch_at, loss_fn, progress=False).fit(resume=path)


def test_truncated_state_is_refused(saved):
    _, path = saved
    f = path / ckpt.STATE_FILE
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state\.pt.*truncated"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("victim", [ckpt.MANIFEST_FILE, ckpt.CONFIG_FILE, ckpt.STATE_FILE])
def test_missing_file_is_refused(saved, victim):
    _, path = saved
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.") + ".*missing"):
        ckpt.verify_checkpoint(path)


def test_garbage_manifest_is_refused(saved):
    _, path = saved
    (path / ckpt.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        ckpt.verify_checkpoint(path)


class _Evil:
    """Unpickling this would create a file -- stand-in for code an attacker wants to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_never_run_even_with_a_forged_manifest(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"
    torch.save({"step": 6, "payload": _Evil(marker)}, path / ckpt.STATE_FILE)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    data = (path / ckpt.STATE_FILE).read_bytes()
    manifest["files"][ckpt.STATE_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))  # checksums now agree
    with pytest.raises(CheckpointError, match=r"state\.pt.*weights_only"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_state_loads_with_weights_only(saved):
    _, path = saved
    state = torch.load(path / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 6 and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    assert state["optimizer"]["state"], "optimizer moments must be saved for an exact resume"


def test_resume_skips_newer_invalid_checkpoint_with_warning(saved):
    out, path = saved
    (path / ckpt.STATE_FILE).write_bytes(b"\0" * 10)
    trainer = Trainer(make_model(), small_cfg(out, max_steps=8), batch_at, loss_fn, progress=False)
    with pytest.warns(UserWarning, match=r"step_0000006.*state\.pt"), \
            pytest.warns(UserWarning, match=r"train\.max_steps: 6 -> 8"):  # resuming to train longer
        hist = trainer.fit(resume=True)
    assert hist["train"][0]["step"] == 5  # resumed from step 4, the newest valid one
    assert steps_on_disk(out) == [6, 8] and ckpt.verify_checkpoint(path)  # the bad step 6 was rewritten


def test_resume_from_an_explicit_older_checkpoint(saved):
    out, _ = saved
    older = out / "checkpoints" / "step_0000004"
    trainer = Trainer(make_model(), small_cfg(out, max_steps=8), batch_at, loss_fn, progress=False)
    with pytest.warns(UserWarning, match=r"newer checkpoints exist \(step_0000006\)"), \
            pytest.warns(UserWarning, match=r"train\.max_steps: 6 -> 8"):
        hist = trainer.fit(resume=older)
    assert hist["train"][0]["step"] == 5 and steps_on_disk(out) == [6, 8]


def test_latest_valid_checkpoint_and_read_config(saved):
    out, path = saved
    root = out / "checkpoints"
    assert ckpt.latest_valid_checkpoint(root) == path
    assert ckpt.read_config(path)["train"]["max_steps"] == 6
    (path / ckpt.MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match="step_0000006"):
        assert ckpt.latest_valid_checkpoint(root) == root / "step_0000004"
    assert ckpt.latest_valid_checkpoint(out / "nowhere") is None


def test_non_plain_state_or_config_is_refused_before_writing(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=r"state\['rng'\].*numpy"):
        ckpt.save_checkpoint(root, 1, make_model(), {"rng": np.zeros(3)}, {})
    with pytest.raises(CheckpointError, match=r"config\.json.*JSON"):
        ckpt.save_checkpoint(root, 1, make_model(), {}, {"path": Path("x")})
    assert not root.exists() or not list(root.iterdir())  # nothing half-written left behind


def test_keep_last_below_two_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, 1, make_model(), {}, {}, keep_last=1)


# --- 3. pruning, temp cleaning, tied weights, RNG round trip ----------------------------------------

@pytest.mark.parametrize("keep_last,max_steps,expect", [(2, 10, [8, 10]), (3, 10, [6, 8, 10]), (2, 7, [6, 7])])
def test_keep_last_pruning(tmp_path, keep_last, max_steps, expect):
    run(tmp_path, keep_last=keep_last, max_steps=max_steps)
    assert steps_on_disk(tmp_path) == expect
    for s in expect:
        ckpt.verify_checkpoint(tmp_path / "checkpoints" / ckpt.step_dir_name(s))


def test_stale_temp_folders_are_cleaned_but_live_ones_kept(tmp_path):
    dead = tmp_path / ".tmp-step_0000004-4999999"  # above Linux's pid_max: no such process
    live = tmp_path / f".tmp-step_0000004-{os.getppid()}"  # our parent is certainly alive
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    assert ckpt.clean_stale_temp(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # weight tying, as in GPT-2: one tensor, two names


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    src = Tied()
    path = ckpt.save_checkpoint(tmp_path, 3, src, {"step": 3}, {"model": "tied"})
    torch.manual_seed(2)
    dst = Tied()
    assert not torch.equal(dst.emb.weight, src.emb.weight)
    state, config = ckpt.load_checkpoint(path, dst)
    assert torch.equal(dst.emb.weight, src.emb.weight) and dst.head.weight is dst.emb.weight
    assert state == {"step": 3} and config == {"model": "tied"}


def test_wrong_architecture_is_refused(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*does not fit"):
        ckpt.load_checkpoint(path, torch.nn.Linear(4, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_checkpoint_resumes_on_cpu(tmp_path):
    run(tmp_path, max_steps=4, device="cuda")
    trainer = Trainer(make_model(), small_cfg(tmp_path, max_steps=6, device="cpu"), batch_at, loss_fn, progress=False)
    with pytest.warns(UserWarning, match=r"train\.device: 'cuda' -> 'cpu'"):
        hist = trainer.fit(resume=True)
    assert [r["step"] for r in hist["train"]] == [5, 6] and all(p.device.type == "cpu" for p in trainer.model.parameters())


def test_rng_state_round_trip():
    import random
    state = devices.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    devices.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


# --- 4. resume never wipes a run, and falls back past anything unreadable --------------------------

def _forge_manifest(path: Path, name: str, data: bytes) -> None:
    """Replace `name` in a checkpoint with `data` and rewrite the manifest so the checksums agree."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def _snapshot(out_dir: Path) -> dict:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*"))
            if p.is_file() and p.name != ckpt.LOCK_FILE}


def test_resume_refuses_when_no_checkpoint_can_be_read_and_changes_nothing(saved):
    out, _ = saved
    for _, p in ckpt.list_checkpoints(out / "checkpoints"):  # every manifest claims another format
        m = p / ckpt.MANIFEST_FILE
        m.write_text(m.read_text().replace('"format": 1', '"format": 2'))
    dead_saver = out / "checkpoints" / ".tmp-step_0000008-4999999"  # a save that died; maybe worth rescuing
    shutil.copytree(out / "checkpoints" / "step_0000006", dead_saver)
    before = _snapshot(out)
    trainer = Trainer(make_model(), small_cfg(out), batch_at, loss_fn, progress=False)
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints.*step_0000006: manifest\.json has "
                                              r"format 2.*step_0000004: .*format 2.*Nothing was changed.*--start-over"):
        trainer.fit(resume=True)
    assert _snapshot(out) == before  # not one byte rewritten: the old run can still be rescued by hand


def test_start_over_moves_the_old_run_aside_and_trains_from_zero(saved):
    out, _ = saved
    before = _snapshot(out)
    trainer = Trainer(make_model(), small_cfg(out), batch_at, loss_fn, progress=False)
    with pytest.warns(UserWarning, match="starting over: the previous run's checkpoints and metrics.jsonl moved to"):
        hist = trainer.fit(resume=True, start_over=True)
    assert hist["train"][0]["step"] == 1 and steps_on_disk(out) == [4, 6]
    (aside,) = out.glob("set-aside-*")
    assert {k: v for k, v in _snapshot(aside).items()} == before  # all of it kept, byte for byte


@pytest.mark.parametrize("victim, garbage, words", [
    (ckpt.STATE_FILE, b"PK\x03\x04 not a torch zip file", r"state\.pt cannot be loaded with weights_only"),
    (ckpt.STATE_FILE, None, r"state\.pt is not a training state: .*no optimizer state"),  # loads, but is no state
    (ckpt.MODEL_FILE, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", r"model\.safetensors cannot be read as safetensors"),
])
def test_unreadable_file_with_a_matching_manifest_falls_back_to_the_previous_checkpoint(saved, tmp_path_factory, victim,
                                                                                        garbage, words):
    out, path = saved
    if garbage is None:
        import io
        buf = io.BytesIO()
        torch.save({"step": 6}, buf)
        garbage = buf.getvalue()
    _forge_manifest(path, victim, garbage)  # the checksums agree: only reading the file can tell
    if victim == ckpt.MODEL_FILE:
        with pytest.raises(CheckpointError, match=words):  # named explicitly, it is refused
            ckpt.load_checkpoint(path, make_model())
    trainer = Trainer(make_model(), small_cfg(out), batch_at, loss_fn, progress=False)
    with pytest.warns(UserWarning, match="skipping invalid checkpoint step_0000006: .*" + words):
        hist = trainer.fit(resume=True)
    assert [r["step"] for r in hist["train"]] == [5, 6]  # resumed from step 4
    _, straight = run(tmp_path_factory.mktemp("straight"))
    assert [r["loss"] for r in hist["train"]] == [r["loss"] for r in straight["train"][4:]]


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["files"].__setitem__(ckpt.MODEL_FILE, "0" * 64), "entry for model.safetensors is not a checksum"),
    (lambda m: m["files"][ckpt.STATE_FILE].__setitem__("sha256", 12345), "entry for state.pt is not a checksum"),
    (lambda m: m["files"][ckpt.CONFIG_FILE].__setitem__("bytes", "many"), "entry for config.json is not a checksum"),
    (lambda m: m.__setitem__("files", ["model.safetensors"]), "no 'files' table"),
    (lambda m: m.__setitem__("step", 5), "says step 5, but the folder is step_0000006"),
])
def test_a_manifest_that_is_not_checksums_is_refused_with_a_message(saved, edit, words):
    out, path = saved
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    edit(manifest)
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=words):
        ckpt.verify_checkpoint(path)
    with pytest.warns(UserWarning, match="skipping invalid checkpoint step_0000006"):
        assert ckpt.latest_valid_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_0000004"


def test_resuming_a_finished_run_reports_its_last_figures(saved):
    out, path = saved
    trainer = Trainer(make_model(), small_cfg(out), batch_at, loss_fn, progress=False)
    hist = trainer.fit(resume=True)
    assert hist["train"] == [] and trainer.step == 6 and trainer.last_checkpoint == path
    last = [r for r in read_metrics(out) if r["split"] == "train"][-1]
    assert last["step"] == 6 and trainer.loss == last["loss"]


# --- 5. one writer per run folder ------------------------------------------------------------------

def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    first = Trainer(make_model(), small_cfg(tmp_path), batch_at, loss_fn, progress=False)
    refused = []

    def start_a_second_one(trainer):
        if trainer.step == 3:
            second = Trainer(make_model(), small_cfg(tmp_path), batch_at, loss_fn, progress=False)
            with pytest.raises(CheckpointError, match=rf"{tmp_path} is in use by another training run \(pid "
                                                      rf"{os.getpid()} on .*\).*choose another folder \(--train\.out_dir\)"):
                second.fit(resume=True)
            refused.append(trainer.step)

    first.add_callback("on_step_end", start_a_second_one)
    first.fit()
    assert refused == [3] and steps_on_disk(tmp_path) == [4, 6]
    with pytest.warns(UserWarning, match=r"train\.max_steps: 6 -> 8"):
        run(tmp_path, resume=True, max_steps=8)  # released when fit returned: the next run goes ahead


def test_a_lock_held_by_another_process_is_refused_and_a_dead_ones_lock_replaced(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minidalle.infra.checkpoint import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another training run \(pid {holder.pid} on "):
            run(tmp_path)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # SIGKILLed: its lock file still names it, but the kernel released the lock with the process
    assert f'"pid": {holder.pid}' in (tmp_path / ckpt.LOCK_FILE).read_text()
    _, hist = run(tmp_path)
    assert len(hist["train"]) == 6 and (tmp_path / ckpt.LOCK_FILE).read_text() == ""  # released again


def test_a_checkpoint_that_does_not_fit_leaves_the_model_untouched(saved):
    """Weights that fit but an optimizer state that does not (a layer frozen since): nothing is copied."""
    out, _ = saved
    torch.manual_seed(5)
    model = make_model()
    model[0].weight.requires_grad_(False)  # one matrix fewer for AdamW; the state_dict is the same
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, small_cfg(out), batch_at, loss_fn, progress=False)
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        trainer.fit(resume=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_start_over_and_an_explicit_checkpoint_together_are_refused(saved):
    out, path = saved
    trainer = Trainer(make_model(), small_cfg(out), batch_at, loss_fn, progress=False)
    with pytest.raises(ConfigError, match="choose one"):
        trainer.fit(resume=path, start_over=True)
    assert steps_on_disk(out) == [4, 6] and not list(out.glob("set-aside-*"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX fork")
def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    """DataLoader workers are forked: if they inherited the lock, it would outlive a killed trainer."""
    script = (f"import os, sys, time; from minidalle.infra.checkpoint import RunLock; RunLock({str(tmp_path)!r}).acquire()\n"
              "if os.fork() == 0:\n    time.sleep(30); os._exit(0)\n"
              "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()  # the parent dies; its forked child lives on for 30 s
        holder.wait()
        _, hist = run(tmp_path)  # the lock went with the parent
        assert len(hist["train"]) == 6
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.stdout.close()


def test_a_filesystem_without_locks_warns_and_trains(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"not locked against a second trainer: its filesystem cannot lock files"):
        _, hist = run(tmp_path)
    assert len(hist["train"]) == 6
