"""Where a run computes and how it is seeded: the device, the precision, every random generator, the fused optimizer.

    device = pick_device("auto")            # cuda, else mps, else cpu; a named device that is absent is refused
    precision = resolve_precision("auto", device)   # bf16 autocast on CUDA, fp32 elsewhere
    seed_everything(0)                      # python, numpy and torch (every GPU) from one seed
    state = capture_rng_state(); ...; restore_rng_state(state)   # what a checkpoint saves for an exact resume

`rng_isolated()` runs a block (an evaluation, a log of samples) without moving the training's
random streams, so evaluating more or less often never changes the run. `use_fused` says where
AdamW's fused kernel serves every parameter (CPU or one CUDA device; not FSDP's sharded ones).
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import ConfigError


def pick_device(pref: str = "auto", key: str = "train.device") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else must name an available device. A CUDA
    device gets TF32 for its fp32 matmuls (`fast_fp32_matmuls`).

    Example: pick_device() -> device(type='cpu') on a laptop without a GPU
    """
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if pref == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
        fast_fp32_matmuls(dev)
        return dev
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise ConfigError(f"{key}={pref!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if (dev.type == "cuda" and not torch.cuda.is_available()) or (dev.type == "mps" and not mps_ok):
        raise ConfigError(f"{key}={pref!r} is not available on this machine; use {key}=auto")
    fast_fp32_matmuls(dev)
    return dev


def resolve_precision(pref: str, device: torch.device) -> str:
    """train.precision -> "bf16", "fp16" or "fp32". auto: bf16 autocast on CUDA (its tensor cores), fp32 elsewhere
    (CPU bf16 matmuls are slower than fp32 on most CPUs). Example: resolve_precision("auto", cpu) -> "fp32"
    """
    if pref == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return pref


def fast_fp32_matmuls(device: torch.device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (torch's "high" precision: 10
    mantissa bits in the products, fp32 sums), as nanoGPT does; bf16 autocast work is unaffected. The
    fp32 paths on a GPU (the dVAE's fp32 parts, the likelihood, an fp32 run) get several times the
    throughput on Ampere and later. Left alone elsewhere. Returns whether it was set.
    Example: fast_fp32_matmuls(torch.device("cpu")) -> False"""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global RNG and torch (all devices).

    Example: seed_everything(0); a = torch.rand(1); seed_everything(0); torch.rand(1) == a -> True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only takes seeds in [0, 2**32)
    torch.manual_seed(seed)


@contextmanager
def rng_isolated(seed: int):
    """Run a block with every RNG seeded to `seed`, then put all RNG states back as they were.

    Evaluation and the start of each data epoch run inside this, so turning eval on or off, or
    fast-forwarding data on resume, never shifts the random numbers the training updates see.
    Example: with rng_isolated(0): x = torch.rand(1)  # same x every time; outside RNG untouched
    """
    saved = capture_rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng_state(saved)


def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states in a form `torch.load(weights_only=True)` accepts.

    numpy's state holds an ndarray, which weights_only refuses; we store it as an int64 tensor.
    Example: capture_rng_state().keys() -> dict_keys(["python", "numpy", "torch"]) (+ "cuda" on GPUs)
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`.

    Example: s = capture_rng_state(); a = torch.rand(1); restore_rng_state(s); torch.rand(1) == a -> True
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # a run resumed on fewer GPUs restores the devices it has
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def use_fused(params, cfg) -> bool | None:
    """True where the fused AdamW serves every parameter: plain tensors (fsdp's sharded ones are left to the
    default), floating point, all on the CPU or all on one CUDA device. None: let torch pick (foreach)."""
    kinds = {p.device.type for p in params}
    ok = cfg.parallel != "fsdp" and len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point()
                                                                                            for p in params)
    return True if ok else None


def set_fused(optimizer: torch.optim.Optimizer, fused: bool | None) -> None:
    """After load_state_dict: the fused flag the checkpoint carried is replaced by this run's choice."""
    for group in optimizer.param_groups:
        group["fused"] = fused
        if fused:
            group["foreach"] = None  # fused and foreach are exclusive
