"""Counting the points where Python waits for the accelerator (host syncs).

On a GPU, reading a number out of a tensor (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`),
an op whose output size depends on the data (`nonzero`, `masked_select`, `unique`) or a copy from the
device to the host makes the CPU wait until every queued kernel has run. A training step with eight of
them runs the GPU in eight bursts with idle gaps between; the loop is written to need one per update.

    with count_host_syncs() as syncs:
        trainer.fit()
    syncs.total, syncs.by_kind          # e.g. 20, {"read a number": 20}
    syncs.by_place                      # where in the package each came from: {"train.py:_read": 20}

The count works on the CPU too: it watches the ops and calls that would wait on a GPU (a dispatch
mode sees every `_local_scalar_dense` and data-dependent op; `tolist` and `numpy` are wrapped, since
on a CPU tensor they read memory without an op). So a test on a laptop checks the GPU loop's syncs.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that need a value on the host: the scalar read every .item()/float()/int()/bool() ends in,
# and the ops whose output shape is the data's.
_READS = {"_local_scalar_dense": "read a number"}
_DATA_SHAPED = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "nonzero_static"}


_PACKAGE = Path(__file__).resolve().parents[1]  # minidalle/
_HERE = Path(__file__).resolve()


def _place() -> str:
    """The innermost caller inside the package, as "file.py:function" (else "outside minidalle")."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path != _HERE and _PACKAGE in path.parents:
            return f"{path.relative_to(_PACKAGE).as_posix()}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "outside minidalle"


class _Watch(TorchDispatchMode):
    def __init__(self, found: "HostSyncs"):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _READS:
            self.found.add(_READS[name])
        elif name in _DATA_SHAPED:
            self.found.add(f"data-shaped op ({name})")
        elif name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs or {}):
            self.found.add("copy to the host")
        return func(*args, **(kwargs or {}))


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator to the CPU (not a CPU -> CPU copy, not a non-blocking one)."""
    if kwargs.get("non_blocking"):
        return False
    name = func.overloadpacket.__name__
    if name == "_to_copy":
        src, dst = args[0], kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst is not None \
            and torch.device(dst).type == "cpu"
    dst, src = args[0], args[1] if len(args) > 1 else None
    return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst.device.type == "cpu"


class HostSyncs:
    """What `count_host_syncs` counted: `total`, `by_kind` (a Counter of what caused each) and `by_place`
    (a Counter of the package function each came from)."""

    def __init__(self):
        self.by_kind: Counter = Counter()
        self.by_place: Counter = Counter()

    def add(self, kind: str) -> None:
        self.by_kind[kind] += 1
        self.by_place[_place()] += 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __repr__(self) -> str:
        return f"HostSyncs(total={self.total}, by_kind={dict(self.by_kind)}, by_place={dict(self.by_place)})"


@contextmanager
def count_host_syncs():
    """Count, inside the block, every call that would make the host wait for a GPU (see the module doc).

    Example: with count_host_syncs() as s: torch.ones(3).sum().item()   -> s.total == 1
    """
    found = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrapped(name):
        def call(self, *args, **kwargs):
            found.add(f"read numbers ({name})")
            with torch.utils._python_dispatch._disable_current_modes():  # its own ops are not counted again
                return originals[name](self, *args, **kwargs)
        return call

    for name in originals:
        setattr(torch.Tensor, name, wrapped(name))
    try:
        with _Watch(found):
            yield found
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
