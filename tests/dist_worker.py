"""One process of a distributed test, launched by torchrun from tests/test_distributed.py.

It trains a tiny residual MLP with the project's Trainer (gloo on CPU) and, on rank 0, writes
the final parameters (full tensors) to --result. Faults are injected here, in the test's own
process, never in the library:
  --kill-rank R --kill-at S   on the first attempt, rank R SIGKILLs itself after update S
  --stop-at S                 stop after update S (a checkpoint is saved), to resume elsewhere
  --kill-in-save S            rank 0 SIGKILLs itself inside the save at step S, after every shard
                              is written and before the manifest (a sharded save half done)
  --scenario mismatch         the ranks call different collectives: must fail within the timeout
  --scenario dead-peer        rank 1 leaves after update 2: rank 0's next collective must fail
  --nan-rank R --nan-at S     rank R's loss is NaN at update S (nonfinite=skip): every rank must skip it
                              (each rank then writes its own --result, suffixed .rank<r>)
  --folder DIR                train on a folder dataset (images + captions) that deals its files out
                              by rank, unevenly when the file count is odd
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from minidalle.infra import checkpoint as ckpt
from minidalle.scale import distributed
from minidalle.config import TrainConfig
from minidalle.train import Trainer


class Net(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.head(x)


def batch_at(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(4, 8, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def folder_batches(path: str):
    """A DataLoader over a folder dataset: each rank reads its own files (one image per batch)."""
    from minidalle.realdata.folders import FolderDataset

    ds = FolderDataset(path, 8, min_files=1)
    return torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=lambda items: torch.stack([im for im, _ in items]))


def folder_loss(model, images):
    x = images.float().flatten(1)[:, :8] / 255.0
    return F.mse_loss(model(x), x.sum(1, keepdim=True).sin())


def make_trainer(args) -> Trainer:
    torch.manual_seed(0)  # the same initial weights in every process (and in the test's reference run)
    cfg = TrainConfig(max_steps=args.steps, batch_size=4, lr=3e-2, min_lr=3e-3, warmup_steps=2, grad_clip=1.0,
                      eval_every=0, ckpt_every=args.ckpt_every, log_every=1, seed=7, device="cpu",
                      precision="fp32", parallel=args.parallel, grad_accum=args.accum, dist_timeout=args.timeout,
                      nonfinite="skip" if getattr(args, "nan_at", None) else "stop", out_dir=args.out)
    if getattr(args, "folder", None):
        return Trainer(Net(), cfg, folder_batches(args.folder), folder_loss, progress=False)
    return Trainer(Net(), cfg, batch_at, loss_fn, progress=False)


def full_params(trainer: Trainer) -> dict:
    if trainer.dist.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--result", default=None)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--kill-in-save", type=int, default=None)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--scenario", default="train")
    p.add_argument("--folder", default=None)
    p.add_argument("--nan-rank", type=int, default=None)
    p.add_argument("--nan-at", type=int, default=None)
    args = p.parse_args()
    # A worker stuck anywhere (not only in a collective, which dist_timeout bounds) prints where, then exits.
    faulthandler.dump_traceback_later(args.timeout + 30, exit=True)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    if args.scenario == "mismatch":
        ctx = distributed.setup("ddp", torch.device("cpu"), timeout_s=args.timeout)
        t0 = time.perf_counter()
        try:
            if ctx.rank == 0:
                torch.distributed.all_reduce(torch.ones(3))
            else:
                torch.distributed.barrier()
                torch.distributed.broadcast(torch.ones(5), src=1)
        except RuntimeError as e:
            print(f"rank {ctx.rank}: collective failed after {time.perf_counter() - t0:.1f} s: "
                  f"{type(e).__name__}", file=sys.stderr, flush=True)
            return 3
        return 0

    trainer = make_trainer(args)
    rank = trainer.dist.rank
    if args.nan_at is not None and rank == args.nan_rank:
        plain = trainer.loss_fn
        trainer.loss_fn = lambda model, batch: plain(model, batch) * (float("nan") if trainer.step + 1 == args.nan_at
                                                                       else 1.0)
    if args.scenario == "dead-peer" and rank == 1:
        trainer.add_callback("on_step_end", lambda t: t.step == 2 and os._exit(0))
    if args.kill_at is not None and rank == args.kill_rank and first_attempt:
        trainer.add_callback("on_step_end", lambda t: t.step == args.kill_at and os.kill(os.getpid(), signal.SIGKILL))
    if args.stop_at is not None:
        trainer.add_callback("on_step_end", lambda t: t.step == args.stop_at and t.request_stop())
    if args.kill_in_save is not None and rank == 0 and first_attempt:
        real = ckpt.write_synced

        def dying_write(path, text):  # the sharded save's manifest: every shard is already on disk
            if path.name == ckpt.MANIFEST_FILE and f"step_{args.kill_in_save:07d}" in str(path.parent):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, text)

        ckpt.write_synced = dying_write
    trainer.fit(resume=True)
    if args.folder:
        print(f"rank {rank}: {trainer.step} updates, in epoch {trainer.train_data.dataset.epoch}", file=sys.stderr, flush=True)
    params = full_params(trainer)
    result = {"params": params, "step": trainer.step, "losses": [r["loss"] for r in trainer.history["train"]],
              "skipped": trainer.skipped}
    if args.result and args.nan_at is not None:
        torch.save(result, f"{args.result}.rank{rank}")
    elif rank == 0 and args.result:
        torch.save(result, args.result)
    return 0


if __name__ == "__main__":
    code = main()
    distributed.exit_now_if_distributed(code)  # as `python -m minidalle` does: no interpreter teardown
    sys.exit(code)
