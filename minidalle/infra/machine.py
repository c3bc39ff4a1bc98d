"""The machine a figure was measured on, and how many CPU threads train fastest on it right now.

    m = machine()                          # {"utc": ..., "python": "3.11.9", "torch": "2.13.0", "cpus": 2, "gpu": None, ...}
    print(describe_machine(m), utc_now())  # what report.md and the benchmark summaries are stamped with
    info = choose_threads()                # times the toy layer's matmuls at 1 thread and at every CPU

On a shared machine more threads can be slower (another job holds a core): `choose_threads` keeps
the extra threads only if they make the probe at least THREADS_GAIN faster, and Trainer.fit calls
it on every CPU run unless `train.threads` fixes the count.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch

from ..config import smoke_mode


# --- the machine ----------------------------------------------------------------------------------------
def machine() -> dict:
    """Where the figures were measured, without the hostname.

    Example: machine() -> {"utc": "2025-05-01 12:00 UTC", "platform": "Linux-6.1-x86_64-with-glibc2.36",
                           "python": "3.11.9", "torch": "2.13.0", "cpus": 2, "torch_threads": 2, "gpu": None, ...}
    """
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"utc": utc_now(), "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "smoke_caps": smoke_mode()}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else every CPU)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


# The probe's matmul: the size of a toy layer's (3,072 rows, a batch of 32 sequences of 96; d_model 128 -> 512).
PROBE_SHAPE = (3072, 128, 512)
THREADS_GAIN = 1.2  # more threads only when they make the probe's matmuls at least this much faster


def matmul_gflops(threads: int | None = None, seconds: float = 0.2, device: str | torch.device = "cpu") -> float:
    """The fp32 matmul rate (GFLOP/s) at `threads` torch threads (None: as set now), over about `seconds`,
    of the CPU or of `device` (a GPU: its threads do not matter; TF32 off, so fp32 it is).

    Leaves the thread count as it found it. Example: matmul_gflops(1) -> 31.5 on one core of a laptop
    """
    m, k, n = PROBE_SHAPE
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(device), torch.randn(k, n, generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(threads or before)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b  # warm-up: the thread pool starts, the buffers are allocated
        sync()
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            for _ in range(1 if device.type == "cpu" else 20):
                a @ b
                calls += 1
            sync()
    finally:
        torch.set_num_threads(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9


def choose_threads(seconds: float = 0.2) -> dict:
    """Measure the matmul rate at 1 thread and at every CPU (and half of them, past 2), alternating, and
    set torch to the count that is fastest by at least THREADS_GAIN over fewer threads; then say why.

    On a machine others are using, OpenMP threads wait on each other at every barrier: with another job
    on 2 cores, a toy update took 12x as long at 2 threads as at 1. A probe of a few hundred ms sees
    that and picks 1; on a quiet machine it picks them all.
    Example: choose_threads() -> {"threads": 2, "gflops": 61.0, "by_threads": {1: 32.0, 2: 61.0}, "cpus": 2,
                                  "line": "2 CPU threads of 2 (matmul 61 GFLOP/s; 1 thread: 32)"}
    """
    cpus = available_cpus()
    counts = sorted({1, max(1, cpus // 2), cpus}) if cpus > 2 else sorted({1, cpus})
    rates: dict[int, list[float]] = {c: [] for c in counts}
    for order in (counts, counts[::-1]):  # each count measured twice, on both sides of the others
        for c in order:
            rates[c].append(matmul_gflops(c, seconds / 2))
    by = {c: max(r) for c, r in rates.items()}
    best = 1
    for c in counts[1:]:
        if by[c] >= THREADS_GAIN * by[best]:
            best = c
    torch.set_num_threads(best)
    others = "; ".join(f"{c} thread{'s' if c > 1 else ''}: {by[c]:.0f}" for c in counts if c != best)
    line = (f"{best} CPU thread{'s' if best > 1 else ''} of {cpus} (matmul {by[best]:.0f} GFLOP/s"
            + (f"; {others}" if others else "") + ")")
    return {"threads": best, "gflops": round(by[best], 1), "by_threads": {c: round(v, 1) for c, v in by.items()},
            "cpus": cpus, "line": line}


def utc_now() -> str:
    """Now, in UTC, to the minute. Example: utc_now() -> "2025-05-01 12:00 UTC" """
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def describe_machine(m: dict) -> str:
    """machine() in one line.

    Example: describe_machine(m) -> "Linux-6.1-x86_64, Python 3.11.9, torch 2.13.0, 2 CPUs (2 torch threads), no GPU"
    """
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    smoke = ", smoke caps on" if m.get("smoke_caps") else ""
    threads = f"{m['torch_threads']} torch thread" + ("s" if m["torch_threads"] != 1 else "")
    return f"{m['platform']}, Python {m['python']}, torch {m['torch']}, {m['cpus']} CPUs ({threads}), {gpu}{smoke}"
