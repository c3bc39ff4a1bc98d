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
import warnings
from pathlib import Path

import pytest
import torch

from minidalle.infra import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # dist_worker
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
    rc, err, seconds = launch(2, "--scenario", scenario, "--out", str(tmp_path / "run"), "--timeout", "3")
    assert rc != 0, err[-2000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    if scenario == "mismatch":
        assert "collective failed after" in err
    else:
        assert "Connection" in err or "closed" in err or "timed out" in err.lower(), err[-2000:]


def test_kill_during_a_sharded_save_keeps_the_previous_checkpoint_which_resumes_on_one_process(tmp_path, reference):
    run = tmp_path / "run"
    rc, err, _ = launch(2, "--parallel", "fsdp", "--out", str(run), "--kill-in-save", "4", "--timeout", "10")
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

    # The sharded checkpoint reads back whole for sampling (only when trusted: its index is a pickle),
    # and exports to the one-file form.
    newest = ckpt.list_checkpoints(root)[-1][1]
    with pytest.raises(ckpt.CheckpointError, match="--trust-sharded"):
        ckpt.read_checkpoint(newest)
    whole = ckpt.read_checkpoint(newest, trust_sharded=True)
    assert whole.sharded and max_diff(whole.tensors, reference["params"]) < FSDP_TOL
    out = ckpt.export_checkpoint(newest, trust_sharded=True)
    full = ckpt.read_checkpoint(out)
    assert not full.sharded and (out / ckpt.MODEL_FILE).is_file()
    assert max_diff(full.tensors, whole.tensors) == 0.0 and full.state["step"] == 6
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        ckpt.export_checkpoint(newest, trust_sharded=True)


def test_a_checkpoint_written_by_one_process_resumes_on_two(tmp_path, reference):
    run = tmp_path / "run"
    rc, err, _ = launch(1, "--parallel", "fsdp", "--accum", "2", "--stop-at", "4", "--out", str(run))
    check(rc, err)
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1][1])["world"] == 1
    rc, err, _ = launch(2, "--parallel", "fsdp", "--out", str(run), "--result", str(tmp_path / "r.pt"))
    check(rc, err)
    got = params_of(tmp_path / "r.pt")
    assert got["step"] == 6 and max_diff(got["params"], reference["params"]) < FSDP_TOL


def test_train_commands_run_under_torchrun_and_the_sharded_transformer_samples(tmp_path):
    """The documented launch, `torchrun -m minidalle train transformer --train.parallel=fsdp` (the model
    built on the meta device, the tokenizers prepared by rank 0 first: the BPE is trained there); the
    sharded checkpoint then loads whole in this one process. (The stage-1 tokenizer is trained here, in
    this process: the same Trainer under ddp is what the other launches test.)"""
    from minidalle.cli.main import main
    from minidalle.stages.transformer import load_transformer

    flags = [f"--dvae_train.out_dir={tmp_path}/dvae", f"--text.out_dir={tmp_path}/bpe", f"--train.out_dir={tmp_path}/tr"]
    assert main(["train", "dvae", "--preset", "smoke", "--json", *flags]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minidalle",
           "train", "transformer", "--preset", "smoke", "--train.parallel=fsdp", *flags]
    p = subprocess.run(cmd, env={**_env(), "MINIDALLE_SMOKE": "1"}, capture_output=True, text=True, timeout=LIMIT,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("[train transformer] step 20") == 1  # rank 0 alone prints
    assert p.stdout.count("training it first") == 1  # the missing BPE, trained once, by rank 0
    newest = ckpt.list_checkpoints(tmp_path / "tr" / "checkpoints")[-1][1]
    assert ckpt.verify_checkpoint(newest)["kind"] == "sharded"
    model, cfg, _ = load_transformer(newest, trust_sharded=True)
    assert sum(p.numel() for p in model.parameters()) > 0 and all(torch.isfinite(p).all() for p in model.parameters())


# --- in this process: the pieces, without launching anything ---------------------------------------

def test_rank_r_reads_every_world_th_batch_and_a_self_splitting_dataset_whole():
    from minidalle.infra.resume import _BatchStream

    assert [_BatchStream(lambda i: i, 0, start=0, rank=1, world=2).next() for _ in range(1)] == [1]
    s = _BatchStream(lambda i: i, 0, start=3, rank=1, world=2)
    assert [s.next(), s.next()] == [7, 9]
    it = _BatchStream(list(range(10)), 0, start=1, rank=0, world=3)  # a shared list: every 3rd from rank 0
    assert [it.next(), it.next()] == [3, 6]
    own = _BatchStream(list(range(4)), 0, start=0, rank=1, world=2, split_by_rank=True)
    assert [own.next() for _ in range(5)] == [0, 1, 2, 3, 0]  # its own share, epoch after epoch


def test_parallel_none_under_a_multi_process_launch_is_refused(monkeypatch):
    from minidalle.scale import distributed
    from minidalle.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.parallel=ddp"):
        distributed.setup("none", torch.device("cpu"))


def test_fp16_with_fsdp_is_refused_before_any_process_group_starts(tmp_path):
    import dist_worker
    from minidalle.config import TrainConfig
    from minidalle.errors import ConfigError
    from minidalle.train import Trainer

    cfg = TrainConfig(max_steps=2, device="cpu", precision="fp16", parallel="fsdp", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="use bf16"):
        Trainer(dist_worker.Net(), cfg, dist_worker.batch_at, dist_worker.loss_fn, progress=False)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_loss_stops_or_is_skipped_and_counted(tmp_path, policy):
    import dist_worker
    from minidalle.config import TrainConfig
    from minidalle.errors import MinidalleError
    from minidalle.train import Trainer

    def loss_fn(model, batch):  # update 2's loss is NaN
        loss = dist_worker.loss_fn(model, batch)
        return loss * float("nan") if batch[0][0, 0].item() == dist_worker.batch_at(1)[0][0, 0].item() else loss

    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=4, device="cpu", precision="fp32", nonfinite=policy, warmup_steps=0, ckpt_every=0,
                      eval_every=0, log_every=1, out_dir=str(tmp_path))
    trainer = Trainer(dist_worker.Net(), cfg, dist_worker.batch_at, loss_fn, progress=False)
    if policy == "stop":
        with pytest.raises(MinidalleError, match="step 2: loss is nan.*nonfinite=skip"):
            trainer.fit()
        return
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    trainer.add_callback("on_step_end", lambda t: t.step == 1 and before.update(
        {k: v.clone() for k, v in t.module.state_dict().items()}))
    after2 = {}
    trainer.add_callback("on_step_end", lambda t: t.step == 2 and after2.update(
        {k: v.clone() for k, v in t.module.state_dict().items()}))
    trainer.fit()
    assert trainer.step == 4 and trainer.skipped == 1
    assert all(torch.equal(before[k], after2[k]) for k in before)  # the NaN update changed nothing
    assert trainer.history["train"][-1]["skipped"] == 1


def test_fp16_uses_a_loss_scaler_that_resumes_with_the_run(tmp_path):
    import dist_worker
    from minidalle.config import TrainConfig
    from minidalle.train import Trainer

    def run(steps, resume):
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=steps, device="cpu", precision="fp16", warmup_steps=0, ckpt_every=2,
                          eval_every=0, log_every=1, out_dir=str(tmp_path))
        t = Trainer(dist_worker.Net(), cfg, dist_worker.batch_at, dist_worker.loss_fn, progress=False)
        t.fit(resume=resume)
        return t

    t = run(4, False)
    scale = t.scaler.get_scale()
    assert t.history["train"][-1]["loss_scale"] == scale and 0 < scale < 2.0 ** 16  # it overflowed and backed off
    assert t.skipped >= 1 and ckpt.read_checkpoint(t.last_checkpoint).state["scaler"]["scale"] == scale
    t2 = run(6, True)  # continues with the saved scale, not a fresh 2**16
    assert t2.history["train"][0]["step"] == 5 and t2.history["train"][0]["loss_scale"] == scale


def test_uneven_folder_shards_do_not_make_a_rank_wait(tmp_path):
    """5 files for 2 ranks: rank 0 reads 3 a pass, rank 1 reads 2, so rank 1 starts more epochs;
    both make every update and the run ends (a rank waiting at a collective would hit the timeout)."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}\n")
    rc, err, seconds = launch(2, "--parallel", "ddp", "--folder", str(data), "--steps", "7", "--out",
                              str(tmp_path / "run"), "--timeout", "20")
    check(rc, err)
    assert "rank 0: 7 updates, in epoch 2" in err and "rank 1: 7 updates, in epoch 3" in err, err[-2000:]


def test_fsdp_refuses_a_model_with_a_0d_parameter_and_names_the_fix():
    from minidalle.scale import distributed
    from minidalle.clip import CLIP
    from minidalle.config import get_config
    from minidalle.errors import ConfigError

    ctx = distributed.Context("fsdp")  # refused before any process group is needed
    with pytest.raises(ConfigError, match="0-d parameter log_scale of CLIP.*clip_train.parallel=ddp"):
        distributed.wrap(CLIP.from_config(get_config("smoke")), ctx, "fp32", key="clip_train")


def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    rc, err, _ = launch(2, "--parallel", "ddp", "--nan-rank", "1", "--nan-at", "3", "--out", str(tmp_path / "run"),
                        "--result", str(tmp_path / "r.pt"), "--timeout", "20")
    check(rc, err)
    r0, r1 = (params_of(tmp_path / f"r.pt.rank{r}") for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1 and r0["step"] == r1["step"] == 6
    assert r0["losses"][2] != r0["losses"][2]  # NaN: the global batch's loss, rank 1's share included
    assert max_diff(r0["params"], r1["params"]) == 0.0  # the copies never diverged


def test_resuming_with_another_global_batch_continues_from_the_first_unseen_sample(tmp_path):
    """2 updates of 1 micro-batch, then resumed with 2 micro-batches an update: update 3 reads
    micro-batches 2 and 3 (not 4 and 5, which 3 x 2 would say), and the checkpoint counts them."""
    from minidalle.config import TrainConfig
    from minidalle.train import Trainer

    seen = []

    def loss_fn(model, batch):
        seen.append(int(batch[0, 0]))
        return model(batch).pow(2).mean()

    def run(steps, accum, resume):
        cfg = TrainConfig(max_steps=steps, batch_size=1, grad_accum=accum, device="cpu", precision="fp32",
                          warmup_steps=0, ckpt_every=1, eval_every=0, out_dir=str(tmp_path))
        t = Trainer(torch.nn.Linear(1, 1), cfg, lambda i: torch.tensor([[float(i)]]), loss_fn, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(resume=resume)
        return t, [str(w.message) for w in caught]

    run(2, 1, False)
    t, said = run(4, 2, True)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert any("global batch changes from 1 to 2 samples" in m for m in said), said
    assert ckpt.read_checkpoint(t.last_checkpoint).state["micro_batches"] == 6
