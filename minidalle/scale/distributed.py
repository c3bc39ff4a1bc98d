"""Many processes, one loop: what `train.parallel` = ddp or fsdp adds to the Trainer.

Launch any `train` command with torchrun; each process trains one share of every batch:

    torchrun --standalone --nproc_per_node=8 -m minidalle train transformer --preset small --train.parallel=fsdp

- **ddp** (DistributedDataParallel) keeps a whole copy of the model on every GPU and averages the
  gradients during backward. For models that fit one GPU: the toy and `small` presets.
- **fsdp** (FSDP2, `fully_shard`) cuts every parameter, its gradient and its AdamW moments into
  one slice per process; a block's full weights exist only while that block runs (all-gathered,
  then freed). Memory per GPU falls ~1/N: the only way the `paper` preset's 12B parameters can
  train on 16-80 GB cards. Unsharded, under bf16 autocast over fp32 weights, each GPU would hold
  252 GiB of weights, gradients, AdamW moments and EMA (22 bytes a parameter), 268 GiB with one
  sample's activations: `scale/plan.py`'s DDP row.
  Under bf16 the policy is the paper's: 16-bit parameters for compute, gradients reduced in fp32.

Everything here is PyTorch's own engine (torch.distributed, DDP, FSDP2, DCP); the Trainer stays
generic and this module knows nothing about DALL·E. The rules every process must follow so no
process ever waits for a collective the others will not make:

- every process runs the same updates, evaluations and saves, in the same order;
- a decision one process makes alone (stop, skip a non-finite update) is first agreed with
  `agree_any`, so they all take it together;
- a collective that cannot complete (a dead peer, a mismatched call) fails after
  `train.dist_timeout` seconds instead of hanging: on gloo (CPU) it raises, which the command line
  turns into one error line; on NCCL its watchdog aborts the process, and torchrun reports it.

Example: ctx = setup("ddp", torch.device("cpu"), timeout_s=60)  # under torchrun: rank, world from its env
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, MinidalleError


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world` processes and the device it trains on."""

    parallel: str  # none | ddp | fsdp
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 alone writes metrics, progress bars and the files every rank shares."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is up (ddp or fsdp, even with one process)."""
        return self.parallel != "none"


def launched_world() -> int:
    """How many processes torchrun started (1 when run plainly). Example: plain python -> 1"""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def setup(parallel: str, device: torch.device, timeout_s: float = 600.0, key: str = "train") -> Context:
    """Join (or start) the process group for `parallel` and pick this rank's device.

    Under torchrun the rank, world size and rendezvous come from its environment. Run plainly,
    ddp or fsdp form a group of one (a free local port), so FSDP with world size 1 works in a
    notebook. `parallel="none"` under a multi-process launch is refused: every process would train
    its own copy and they would overwrite each other's checkpoints.
    Example: setup("none", torch.device("cpu")) -> Context(parallel="none", rank=0, world=1, ...)
    """
    world = launched_world()
    if parallel == "none":
        if world > 1:
            raise ConfigError(f"torchrun started {world} processes but {key}.parallel=none, so each would train "
                              f"its own copy; pass --{key}.parallel=ddp (a copy per GPU) or --{key}.parallel=fsdp "
                              "(sharded parameters)")
        return Context("none", device=device)
    if not dist.is_available():
        raise ConfigError(f"{key}.parallel={parallel} needs torch.distributed, which this PyTorch build lacks")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} on this node has no GPU of its own ({torch.cuda.device_count()} "
                              "visible); start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"{key}.parallel={parallel} runs on CUDA (nccl) or CPU (gloo), not {device.type}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout, **_attempt_store(timeout))
        else:  # a plain process: a group of one on a free local port
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    _JOINED.append(True)
    return Context(parallel, dist.get_rank(), dist.get_world_size(), local_rank, device)


def _attempt_store(timeout: datetime.timedelta) -> dict:
    """After a torchrun restart (--max-restarts), a key space of this attempt's own in torchrun's store.

    The restarted processes meet in the same store as the dead ones; gloo then read the addresses
    the previous attempt had published and failed to connect ("Connection refused"). Prefixing the
    keys with the attempt number gives every attempt a clean slate.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or "MASTER_ADDR" not in os.environ:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"minidalle-attempt-{attempt}", store), "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one (each then all-gathers alone): `model.blocks` when the
    model has a list of blocks (the transformer, the reranker's text tower), else its children.

    Example: shard_units(DALLE(...)) -> the model's n_layer Blocks
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
        return list(blocks)
    return [m for m in model.children() if any(True for _ in m.parameters())]


def checkpoint_activations(units: list[torch.nn.Module]) -> None:
    """Recompute each unit's activations during backward instead of keeping them (activation
    checkpointing): memory for activations falls from all layers' to one layer's plus each layer's
    input, for about a third more compute. Names in the state dict stay as they were.

    Example: checkpoint_activations(list(model.blocks))
    """
    from torch.utils.checkpoint import checkpoint

    for unit in units:
        if getattr(unit, "_plain_forward", None) is None:
            unit._plain_forward = unit.forward
            unit.forward = functools.partial(checkpoint, unit._plain_forward, use_reentrant=False)


def wrap(model: torch.nn.Module, ctx: Context, precision: str, activation_checkpointing: bool = False,
         powersgd_rank: int = 0, key: str = "train") -> torch.nn.Module:
    """Make `model` data-parallel as ctx.parallel says; build the optimizer *after* this (under FSDP
    the parameters become sharded DTensors, and the optimizer must hold those).

    A model built on the meta device (no memory) is materialised here, each process allocating only
    its own shards; see `materialize`. Example: model = wrap(model, ctx, "bf16")
    """
    units = shard_units(model)
    if activation_checkpointing:
        checkpoint_activations(units)
    if ctx.parallel == "none":
        if is_meta(model):
            raise ConfigError(f"a model built on the meta device has no weights to train; use --{key}.parallel=fsdp, "
                              "which materialises one shard per process")
        return model.to(ctx.device)
    if ctx.parallel == "ddp":
        if is_meta(model):
            raise ConfigError(f"ddp keeps a whole copy per process; a meta-device model needs --{key}.parallel=fsdp")
        model = model.to(ctx.device)
        ddp = _DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if powersgd_rank:
            add_powersgd(ddp, powersgd_rank)
        return ddp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:  # FSDP2 cuts every parameter along dim 0; a 0-d one has none
        raise ConfigError(f"fsdp cannot shard the 0-d parameter{'s' if len(scalars) > 1 else ''} "
                          f"{', '.join(scalars[:3])} of {type(model).__name__}; a model this small fits one GPU: "
                          f"use --{key}.parallel=ddp")

    # The paper's recipe: 16-bit weights for compute, gradients averaged in fp32 so small
    # contributions from many processes are not rounded away.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    meta = is_meta(model)
    if not meta:
        model = model.to(ctx.device)
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if meta:
        materialize(model, ctx.device)
    return model


class _DDP(DistributedDataParallel):
    """DDP that also answers for its module's attributes (`model.cfg`, `model.caption_dropout`),
    so a loss_fn written for the plain model works unchanged. Calls to the model itself go
    through DDP's forward, which is what arms the gradient all-reduce."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give a sharded meta-device model real weights, one parameter at a time, identical for any
    number of processes: each full tensor is drawn on the CPU by the model's `init_parameter(name,
    tensor, generator)` from a generator seeded by the parameter's name, and each process keeps
    only its slice. Peak host memory is one parameter, not the model (a few hundred MB for the
    12B config's largest matrix). Random initialisation of sharded tensors by each process on its
    own would give another model for every world size (and on CPU, copies of one slice).

    Example: materialize(fully_sharded_meta_dalle, torch.device("cuda", 0))
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    init = getattr(model, "init_parameter", None)
    if init is None:
        raise ConfigError(f"{type(model).__name__} was built on the meta device but has no init_parameter(name, "
                          "tensor, generator) to give it weights; build it on a real device instead")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # to_empty would leave them uninitialised, and they have no init rule here
        raise ConfigError(f"{type(model).__name__} has buffers ({', '.join(buffers[:3])}) that a meta-device build "
                          "cannot fill; build it on a real device instead")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = torch.empty(p.shape, dtype=torch.float32)
            init(name, full, torch.Generator().manual_seed(_name_seed(name)))
            value = full.to(device=device, dtype=p.dtype)
            if isinstance(p, DTensor):  # every process computed the same full tensor: keep its slice, no traffic
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)


def _name_seed(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


def agree_any(flag: bool, ctx: Context) -> bool:
    """True on every process if it is True on any: how one process's stop or skip becomes everyone's.

    Example: agree_any(loss_is_nan, ctx) -> the same answer on every rank
    """
    if not ctx.active or ctx.world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextmanager
def main_first(ctx: Context, what: str, wait_s: float = 86_400.0):
    """Run a block on rank 0 first (train a tokenizer, write a cache), then on the others, which
    find its results on disk; if rank 0 fails, the others stop with its message instead of waiting.

    The others wait in a group of their own whose timeout is `wait_s` (a day), not train.dist_timeout:
    rank 0 may legitimately spend an hour encoding a dataset.
    Example: with main_first(ctx, "preparing the tokenizers"): dvae, tok, ids = prepare_tokenizers(cfg)
    """
    if not ctx.active or ctx.world == 1:
        yield
        return
    group = _patient_group(wait_s)

    def tell(msg):
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    if ctx.main:
        try:
            yield
        except BaseException as e:
            tell(("error", f"{type(e).__name__}: {e}"))
            raise
        tell(("ok", ""))
    else:
        status, message = tell(None)
        if status == "error":
            raise MinidalleError(f"rank 0 failed while {what}: {message}")
        yield


_PATIENT: dict = {}


def _patient_group(wait_s: float):
    """A gloo group over every process with a long timeout, made once (every process reaches the
    first main_first together, as new_group requires)."""
    if wait_s not in _PATIENT:
        _PATIENT[wait_s] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
    return _PATIENT[wait_s]


def mean_all(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of each number of a 1-d tensor over all processes (a NaN anywhere gives NaN everywhere):
    the loss the whole global batch had, logged the same on every rank. Example: mean_all(torch.stack([loss]), ctx)"""
    if not ctx.active or ctx.world == 1:
        return values
    t = values.to(ctx.device, torch.float64)
    dist.all_reduce(t)
    return t / ctx.world


def gather(obj, ctx: Context) -> list:
    """Every process's `obj`, in rank order, on every process (e.g. each rank's RNG state for a save)."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, ctx: Context):
    """Rank 0's `obj` on every process (e.g. which checkpoint to resume, chosen once)."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, e.g. in a notebook before starting another. Drop every model and
    Trainer of the group first (`del trainer`): a DDP or FSDP model freed after its group is gone
    can hang its process. A command run by `python -m minidalle` need not call this (see
    exit_now_if_distributed)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # models kept only by reference cycles go now, while the group still exists
        _PATIENT.clear()
        dist.destroy_process_group()


_JOINED = []  # set when this process formed or joined a process group (see exit_now_if_distributed)


def exit_now_if_distributed(code: int) -> None:
    """End a process that has been in a process group with os._exit, after flushing its output.

    Measured here (gloo, torch 2.13): about one torchrun worker in six that had finished and left its
    group cleanly then hung for good in the interpreter's own teardown, with no Python frame left,
    as PyTorch's background threads and the interpreter raced over the GIL. A job whose worker never
    exits never ends, so a process that was in a group skips that teardown; its files are already
    written and closed (checkpoints are fsynced before their rename). Plain processes exit normally.
    Example: exit_now_if_distributed(main())  # in `python -m minidalle`, after the command returned
    """
    if not _JOINED:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# --- PowerSGD: the paper's gradient compression between machines ---------------------------------

def powersgd_compression(shape: tuple[int, int], rank: int) -> float:
    """Fraction of traffic saved by sending a rank-r PowerSGD factorisation of an m x n gradient:
    two factors P (m x r) and Q (n x r) instead of the matrix, so r (m + n) numbers instead of m n.

    The paper compressed the 12B model's gradients between machines at rank 896 and reports about
    86% less traffic. Example: powersgd_compression((3968, 15872), 896) -> 0.718 (one MLP matrix)
    """
    m, n = shape
    if rank < 1 or m < 1 or n < 1:
        raise ConfigError(f"PowerSGD needs a positive rank and shape, got rank={rank}, shape={shape}")
    return 1.0 - min(1.0, rank * (m + n) / (m * n))


def model_compression(model: torch.nn.Module, rank: int) -> float:
    """The traffic PowerSGD saves over a whole model: matrices are factorised (when that is
    smaller), vectors are sent as they are. Example: model_compression(paper-sized DALLE on meta, 896)"""
    sent = total = 0
    for p in model.parameters():
        numel = p.numel()
        total += numel
        if p.dim() >= 2:
            m, n = p.shape[0], numel // p.shape[0]
            sent += min(numel, rank * (m + n))
        else:
            sent += numel
    return 1.0 - sent / max(total, 1)


def add_powersgd(ddp: torch.nn.Module, rank: int, start_iter: int = 2) -> None:
    """Register PyTorch's PowerSGD communication hook on a DDP model (error feedback on; the
    first `start_iter` updates go uncompressed, as PowerSGD's authors advise)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start_iter,
                               use_error_feedback=True, warm_start=True)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
