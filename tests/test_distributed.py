"""Training on several processes (gloo on CPU): equal results, restarts, faults, sharded checkpoints.

Each test launches tests/dist_worker.py on 1 or 2 processes (torchrun where its restart logic is
the point, plain processes with torchrun's environment otherwise: a launch costs less) and
compares the final weights with one uninterrupted process trained in this test process on the
same global batch. Every launch has a wall-clock limit, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidalle import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
LIMIT = 120  # seconds any one launch may take before the test fails (typical: 6-20 s on 2 cores)
FSDP_TOL = 1e-6  # FSDP reduce-scatters in another order than one process sums: equal up to rounding


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, *args: str, torchrun: bool = False, restarts: int = 0) -> tuple[int, str, float]:
    """Run the worker on n processes; return (worst exit code, all stderr, seconds)."""
    t0 = time.perf_counter()
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               f"--max-restarts={restarts}", WORKER, *args]
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LIMIT)
        return p.returncode, p.stderr, time.perf_counter() - t0
    if n == 1:  # a plain process: ddp / fsdp form a group of one
        p = subprocess.run([sys.executable, WORKER, *args], env=_env(), capture_output=True, text=True, timeout=LIMIT)
        return p.returncode, p.stderr, time.perf_counter() - t0
    port, procs = _port(), []
    for r in range(n):
        env = {**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errs, codes = [], []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, LIMIT - (time.perf_counter() - t0)))
            errs.append(err)
            codes.append(p.returncode)
    finally:
        for p in procs:
            p.kill()
    return max(codes, key=abs), "\n".join(errs), time.perf_counter() - t0


def check(rc: int, err: str) -> None:
    assert rc == 0, err[-3000:]


def params_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 2 micro-batches per update: the same global batch as 2 processes x 1."""
    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker

    out = tmp_path_factory.mktemp("ref")
    args = dist_worker.argparse.Namespace(steps=6, ckpt_every=2, parallel="none", accum=2, timeout=60.0,
                                          out=str(out / "run"))
    trainer = dist_worker.make_trainer(args)
    trainer.fit()
    return {"params": dist_worker.full_params(trainer), "losses": [r["loss"] for r in trainer.history["train"]]}


def test_ddp_on_two_processes_trains_exactly_what_one_process_does(tmp_path, reference):
    rc, err, _ = launch(2, "--parallel", "ddp", "--out", str(tmp_path / "run"), "--result", str(tmp_path / "r.pt"),
                        torchrun=True)
    check(rc, err)
    got = params_of(tmp_path / "r.pt")
    assert max_diff(got["params"], reference["params"]) < 1e-7
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-6)  # the global batch's loss, logged once
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6  # rank 0 alone writes metrics


def test_fsdp_on_two_processes_matches_one_process(tmp_path, reference):
    rc, err, _ = launch(2, "--parallel", "fsdp", "--out", str(tmp_path / "run"), "--result", str(tmp_path / "r.pt"))
    check(rc, err)
    got = params_of(tmp_path / "r.pt")
    assert max_diff(got["params"], reference["params"]) < FSDP_TOL
    newest = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    manifest = ckpt.verify_checkpoint(newest)
    assert manifest["kind"] == "sharded" and manifest["world"] == 2
    assert sum(name.endswith(".distcp") for name in manifest["files"]) == 2  # one file of slices per process


def test_a_killed_process_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path, reference):
    """Rank 1 is SIGKILLed after update 3; torchrun restarts both from the step-2 checkpoint."""
    rc, err, _ = launch(2, "--parallel", "ddp", "--out", str(tmp_path / "run"), "--result", str(tmp_path / "r.pt"),
                        "--kill-rank", "1", "--kill-at", "3", torchrun=True, restarts=1)
    check(rc, err)
    got = params_of(tmp_path / "r.pt")
    assert got["step"] == 6 and len(got["losses"]) == 4  # the restart trained updates 3..6 again
    assert max_diff(got["params"], reference["params"]) < 1e-7  # same data order, same moments, same result
    steps = [int(line.split(",")[0].split(":")[1]) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost update's line was rewritten, not duplicated


@pytest.mark.parametrize("scenario", ["mismatch", "dead-peer"])
def test_a_broken_collective_is_an_error_within_the_timeout_not_a_hang(tmp_path, scenario):
    rc, err, seconds = launch(2, "--scenario", scenario, "--out", str(tmp_path / "run"), "--timeout", "5")
    assert rc != 0, err[-2000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    if scenario == "mismatch":
        assert "collective failed after" in err
    else:
        assert "Connection" in err or "closed" in err or "timed out" in err.lower(), err[-2000:]


def test_kill_during_a_sharded_save_keeps_the_previous_checkpoint_which_resumes_on_one_process(tmp_path, reference):
    run = tmp_path / "run"
    rc, err, _ = launch(2, "--parallel", "fsdp", "--out", str(run), "--kill-in-save", "4")
    assert rc != 0  # rank 0 died inside the save of step 4
    root = run / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert any(p.name.startswith(ckpt.TMP_PREFIX) for p in root.iterdir())  # the half-written save, never renamed
    # Resume on ONE process (2 micro-batches: the same global batch) from the 2-process checkpoint.
    rc, err, _ = launch(1, "--parallel", "fsdp", "--accum", "2", "--out", str(run), "--result", str(tmp_path / "r.pt"))
    check(rc, err)
    got = params_of(tmp_path / "r.pt")
    assert got["step"] == 6 and max_diff(got["params"], reference["params"]) < FSDP_TOL
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in root.iterdir())  # cleaned on the next start

    # The sharded checkpoint reads back whole for sampling, and exports to the one-file form.
    newest = ckpt.list_checkpoints(root)[-1][1]
    whole = ckpt.read_checkpoint(newest)
    assert whole.sharded and max_diff(whole.tensors, reference["params"]) < FSDP_TOL
    out = ckpt.export_checkpoint(newest)
    full = ckpt.read_checkpoint(out)
    assert not full.sharded and (out / ckpt.MODEL_FILE).is_file()
    assert max_diff(full.tensors, whole.tensors) == 0.0 and full.state["step"] == 6
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        ckpt.export_checkpoint(newest)


def test_a_checkpoint_written_by_one_process_resumes_on_two(tmp_path, reference):
    run = tmp_path / "run"
    rc, err, _ = launch(1, "--parallel", "fsdp", "--accum", "2", "--stop-at", "4", "--out", str(run))
    check(rc, err)
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1][1])["world"] == 1
    rc, err, _ = launch(2, "--parallel", "fsdp", "--out", str(run), "--result", str(tmp_path / "r.pt"))
    check(rc, err)
    got = params_of(tmp_path / "r.pt")
    assert got["step"] == 6 and max_diff(got["params"], reference["params"]) < FSDP_TOL
