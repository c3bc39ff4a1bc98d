"""FSDP's weights on disk (torch.distributed.checkpoint): every process writes and reads only its own slices.

    write_slices(folder, model, optimizer, ema)             # all processes together: a file each + .metadata
    has_ema = load_slices(folder, model, optimizer, ema)    # fill a live model and optimizer, sharded or not
    keys = slice_keys(folder)                               # what the index holds, no tensor read
    whole = read_whole(folder)                              # {"model": {...}, "ema": {...}} whole, on the CPU

checkpoint.py keeps such a folder as `sharded/` inside a checkpoint, beside its config, state and
manifest. The index (`.metadata`) is a pickle: checkpoint.py reads one only when told to trust it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, first_line


def write_slices(folder: Path, model: torch.nn.Module, optimizer, ema: dict | None = None) -> None:
    """Every process writes its slices of the weights, the optimizer moments and the EMA into `folder`."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload = {"model": model_sd, "optimizer": optim_sd, **({"ema": ema} if ema is not None else {})}
    dcp_save(payload, checkpoint_id=str(folder))


def load_slices(folder: Path, model: torch.nn.Module, optimizer, ema: dict | None = None) -> bool:
    """Fill a live model and optimizer from `folder`, each process reading the pieces of its own
    slices; returns whether an EMA was loaded into `ema`."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = slice_keys(folder)
    has_ema = ema is not None and any(k.startswith("ema.") for k in saved)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload = {"model": model_sd, "optimizer": optim_sd, **({"ema": ema} if has_ema else {})}
    try:
        dcp_load(payload, checkpoint_id=str(folder))
    except _dcp_errors() as e:  # evaluated only when something was raised
        raise CheckpointError(f"{folder} does not fit this model and optimizer ({type(e).__name__}: {first_line(e)}); "
                              "was it saved from a different architecture or config?") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return has_ema


def _dcp_errors() -> tuple:
    # DCP wraps a failure in CheckpointException, a BaseException: `except Exception` would miss it.
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def slice_keys(folder: Path) -> dict:
    """The flattened keys ("model.blocks.0.qkv.weight", "optimizer.state...", "ema...") a sharded
    checkpoint holds, with their storage metadata (shape, dtype), from its index alone."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return dict(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    except _dcp_errors() as e:  # evaluated only when something was raised
        raise CheckpointError(f"{Path(folder) / '.metadata'} cannot be read ({type(e).__name__}: "
                              f"{first_line(e)})") from None


def read_whole(folder: Path) -> dict:
    """A sharded checkpoint's weights and EMA, whole, on the CPU, with no process group (for sampling
    and export); the optimizer moments, twice the weights' size, are not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in slice_keys(folder).items()
              if k.startswith(("model.", "ema.")) and isinstance(m, TensorStorageMetadata)}
    try:
        dcp_load(wanted, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except _dcp_errors() as e:  # evaluated only when something was raised
        raise CheckpointError(f"{folder} cannot be read back ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    out: dict = {}
    for key, t in wanted.items():
        part, name = key.split(".", 1)
        out.setdefault(part, {})[name] = t
    return out
