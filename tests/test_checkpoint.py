"""Checkpoints: atomic under SIGKILL, checksummed, refused when damaged, pruned, never unpickled."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minidalle import checkpoint as ckpt
from minidalle.config import TrainConfig
from minidalle.errors import CheckpointError, ConfigError
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

KILL_SCRIPT = """
import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from minidalle.checkpoint import CRASH_ENV
from minidalle.train import Trainer
from test_checkpoint import batch_at, loss_fn, make_model, small_cfg
trainer = Trainer(make_model(), small_cfg({out!r}), batch_at, loss_fn, progress=False)
# arm the crash only once the first checkpoint (step 2) is complete, so the save of step 4 dies
trainer.add_callback("on_checkpoint", lambda t: os.environ.__setitem__(CRASH_ENV, {point!r}))
trainer.fit()
print("survived")
"""


CRASH_POINTS = ("2", "4")  # after 2 of the 3 payload files; after the manifest but before the rename


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Start one subprocess per crash point (concurrently: each spends ~1 s importing torch) and
    wait until each has been SIGKILLed in its second save. Returns {point: (out_dir, process)}."""
    env = {k: v for k, v in os.environ.items() if k != ckpt.CRASH_ENV}
    runs = {}
    for point in CRASH_POINTS:
        out = tmp_path_factory.mktemp(f"killed_at_{point}")
        script = KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(out), point=point)
        runs[point] = (out, subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for out, proc in runs.values():
        proc.output = proc.communicate(timeout=60)[0]
    return runs


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_mid_save(killed_runs, tmp_path, point):
    out, proc = killed_runs[point]
    assert proc.returncode == -signal.SIGKILL, proc.output

    root = out / "checkpoints"
    temps = [p for p in root.iterdir() if p.name.startswith(".tmp-step_0000004")]
    assert len(temps) == 1, "the killed save should have left its half-written temp folder"
    assert len(list(temps[0].iterdir())) == int(point)  # it really died mid-write
    assert steps_on_disk(out) == [2]  # ...yet no damaged step_* folder is visible
    ckpt.verify_checkpoint(root / "step_0000002")

    # resume picks step 2, cleans the temp folder and reproduces an uninterrupted run exactly
    _, hist = run(out, resume=True)
    assert [r["step"] for r in hist["train"]] == [3, 4, 5, 6]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    _, straight = run(tmp_path / "straight")
    assert [r["loss"] for r in hist["train"]] == [r["loss"] for r in straight["train"][2:]]
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
    with pytest.warns(UserWarning, match=r"step_0000006.*state\.pt"):
        hist = trainer.fit(resume=True)
    assert hist["train"][0]["step"] == 5  # resumed from step 4, the newest valid one
    assert steps_on_disk(out) == [6, 8] and ckpt.verify_checkpoint(path)  # the bad step 6 was rewritten


def test_resume_from_an_explicit_older_checkpoint(saved):
    out, _ = saved
    older = out / "checkpoints" / "step_0000004"
    trainer = Trainer(make_model(), small_cfg(out, max_steps=8), batch_at, loss_fn, progress=False)
    with pytest.warns(UserWarning, match=r"newer checkpoints exist \(step_0000006\)"):
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
    hist = trainer.fit(resume=True)
    assert [r["step"] for r in hist["train"]] == [5, 6] and all(p.device.type == "cpu" for p in trainer.model.parameters())


def test_rng_state_round_trip():
    import random
    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
