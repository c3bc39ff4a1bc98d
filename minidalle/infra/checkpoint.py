"""Checkpoints you can trust: one atomic, checksummed folder per step, loadable without pickle.

Layout, one folder per saved step under `{out_dir}/checkpoints/`:

    step_0000500/
        model.safetensors   the weights (safetensors: raw tensors, no code; tied weights stored once)
        config.json         the run config, so the folder alone says how to rebuild the model
        state.pt            step, optimizer moments, RNG states -- plain tensors/numbers/lists only,
                            so it loads with torch.load(weights_only=True)
        manifest.json       sha256 + size of the three files above; written LAST

An FSDP run, whose parameters are sliced across processes, writes a *sharded* checkpoint
instead: `sharded/` (torch.distributed.checkpoint, through sharded.py: one file per process plus `.metadata`) holds
the weights, the AdamW moments and the EMA; `config.json`, `state.pt` (step, every rank's RNG)
and `manifest.json` (checksums of every file, `"kind": "sharded"`) sit beside it as usual, and the
same write-then-rename rule makes it atomic. It resumes on any number of processes (the loader
re-slices the tensors) and reads back as full tensors for sampling; `export_checkpoint` turns it
into the single-file form above. One caveat: PyTorch's distributed-checkpoint reader unpickles the
`.metadata` index, so the never-unpickle rule below holds for full checkpoints only. That is why a
sharded checkpoint is read only with `trust_sharded=True` (`--trust-sharded`; `sharded_refusal`),
but by an fsdp run resuming its own folder: resume sharded checkpoints your own runs wrote, and share
the exported form.

Why each rule (the DESIGN.md checkpoint convention):
- Atomic. Everything is written into `.tmp-step_0000500-<pid>/` beside the final folder, fsynced,
  then renamed. A rename inside one directory is atomic on POSIX, so a folder called `step_*` is
  either complete or absent. A crash leaves only a `.tmp-*` folder, removed on the next start.
  tests/test_checkpoint.py proves it the hard way: a subprocess wraps this module's writers (in
  that process only) so that it SIGKILLs itself after each file and after the rename, and nothing
  is ever lost. The library itself carries no crash hooks.
- Manifest last. A folder copied half-way or written by an older tool has no manifest and is
  refused; the checksums catch truncation, bit rot and hand edits.
- Never unpickle. `torch.save` is pickle, and unpickling can run arbitrary code. We check the
  checksums first and then load with `weights_only=True`, which rebuilds only tensors and plain
  containers. That is why the numpy RNG state is stored as a tensor, not as an ndarray.
- Keep at least two. The previous checkpoint is deleted only after the new one is complete, so
  a crash at any instant leaves one good checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model

from ..errors import CheckpointError, ConfigError, first_line
from .files import LOCK_FILE, RunLock, fsync_dir, pid_alive  # noqa: F401 -- the lock is part of this module's API
from .files import file_digest, fsync_file, write_synced
from . import sharded


MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
PAYLOAD = (MODEL_FILE, CONFIG_FILE, STATE_FILE)  # what the manifest must vouch for
SHARDED_DIR = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint folder
SHARDED_PAYLOAD = (CONFIG_FILE, STATE_FILE, f"{SHARDED_DIR}/.metadata")
FORMAT = 1  # bump when the layout changes, so old readers refuse new folders clearly

_STEP_DIR = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    """Example: 500 -> "step_0000500" (zero-padded so names sort like numbers)."""
    return f"step_{step:07d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """The `step_*` folders in `root`, oldest first; valid or not, temp folders excluded.

    Example: root with step_0000002/, step_0000004/, .tmp-step_0000006-99/ -> [(2, ...), (4, ...)]
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


# --- saving ----------------------------------------------------------------------------------------

def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, state: dict, config: dict,
                    keep_last: int = 2) -> Path:
    """Write `root/step_{step:07d}/` atomically, then prune to the newest `keep_last` checkpoints.

    `state` must hold only what `torch.load(weights_only=True)` can rebuild (tensors, numbers,
    strings, None, lists/tuples/dicts of those); anything else is refused *before* writing.
    On disk, in order: model, config, state, manifest into `.tmp-step_.../`, rename to `step_.../`,
    prune. A crash after any of these leaves the previous checkpoint complete and loadable.
    Example: save_checkpoint("runs/x/checkpoints", 500, model, {"step": 500}, cfg) -> Path(".../step_0000500")
    """
    if keep_last < 2:
        raise ConfigError(f"keep_last={keep_last}: keep at least 2 checkpoints, so a crash while "
                          "writing the newest one still leaves a good one behind")
    _check_plain(state, "state")
    config_text = _json_text(config, CONFIG_FILE)  # refuse a bad config before touching the disk
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_folder(tmp, step, model, state, config_text)
    except BaseException:  # disk full, Ctrl-C, ...: leave nothing half-written (SIGKILL: next start cleans)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (after resuming from an older one): move the old one aside
        _remove_dir(final)
    os.rename(tmp, final)
    fsync_dir(root)  # make the rename itself durable
    prune_checkpoints(root, keep_last, newest=step)
    return final


def _write_folder(tmp: Path, step: int, model: torch.nn.Module, state: dict, config_text: str) -> None:
    """Write the three payload files, then the manifest that vouches for them, each fsynced.

    Every file goes through `save_model`, `_write_text` or `torch.save`, looked up in this module:
    the crash test in tests/test_checkpoint.py wraps exactly those to die after the n-th file.
    """
    # save_model (not save_file) because safetensors refuses tensors that share memory, such as a
    # token embedding tied to the output head; save_model stores one copy and apply_weights fills the other names.
    if isinstance(model, dict):  # full tensors already in hand (an exported sharded checkpoint)
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / MODEL_FILE))
    else:
        save_model(model, str(tmp / MODEL_FILE))
    fsync_file(tmp / MODEL_FILE)
    write_synced(tmp / CONFIG_FILE, config_text)
    torch.save(state, tmp / STATE_FILE)
    fsync_file(tmp / STATE_FILE)
    files = {name: file_digest(tmp / name) for name in PAYLOAD}
    manifest = {"format": FORMAT, "step": step, "files": files}
    write_synced(tmp / MANIFEST_FILE, _json_text(manifest, MANIFEST_FILE))  # last: "everything above is done"
    fsync_dir(tmp)


def prune_checkpoints(root: str | Path, keep_last: int, newest: int | None = None) -> list[Path]:
    """Delete checkpoints older than the `keep_last` newest complete ones at or below step `newest`.

    Folders newer than `newest` (left over from a run that was resumed from an older point) are
    not touched; training overwrites them when it reaches their step.
    Example: steps 2, 4, 6, 8 with keep_last=2, newest=8 -> removes step 2 and step 4
    """
    ckpts = [(s, p) for s, p in list_checkpoints(root) if newest is None or s <= newest]
    # "Complete" here means "has a manifest" -- cheap; hashing every kept folder on every save
    # would cost a full read of all checkpoints. Loading still verifies the hashes.
    complete = [s for s, p in ckpts if (p / MANIFEST_FILE).is_file()]
    if len(complete) <= keep_last:
        return []
    cutoff = complete[-keep_last]
    removed = [p for s, p in ckpts if s < cutoff]
    for p in removed:
        _remove_dir(p)
    return removed


def clean_stale_temp(root: str | Path) -> list[Path]:
    """Remove `.tmp-*` folders left by a crashed save (skipping any whose writer is still alive).

    Example: root with .tmp-step_0000004-4242/ (pid 4242 dead) -> [Path(".../.tmp-step_0000004-4242")]
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # another live process is writing here right now; not ours to delete
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# --- verifying and loading -------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def verify_checkpoint(path: str | Path) -> dict:
    """Check the manifest, sizes and sha256 of every file; return the manifest or raise CheckpointError.

    The manifest itself is checked field by field (a hand-edited or damaged one is refused with a
    message, never a TypeError), and its step must match the folder's name.
    Example: verify_checkpoint("runs/x/checkpoints/step_0000500") -> {"format": 1, "step": 500, "files": {...}}
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing: the checkpoint was never finished (a crash while "
                              "saving?) or was copied incompletely; use an older checkpoint")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{mpath} is not a valid manifest ({type(e).__name__}: {e}); the folder is damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mpath} is not a valid manifest (no 'files' table); the folder is damaged")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} has format {manifest.get('format')!r}, this minidalle reads "
                              f"format {FORMAT}; it was written by a different version")
    step, named = manifest.get("step"), _STEP_DIR.match(path.name)
    if not isinstance(step, int) or isinstance(step, bool) or (named and int(named.group(1)) != step):
        raise CheckpointError(f"{mpath} says step {step!r}, but the folder is {path.name}; the folder is damaged")
    files, kind = manifest["files"], manifest.get("kind", "full")
    if kind not in ("full", "sharded"):
        raise CheckpointError(f"{mpath} says kind {kind!r}; a checkpoint is 'full' or 'sharded'")
    names = PAYLOAD if kind == "full" else sorted(set(SHARDED_PAYLOAD) | set(files))
    for name in names:
        if not isinstance(name, str) or name.startswith(("/", "\\")) or ".." in Path(name).parts:
            raise CheckpointError(f"{mpath} lists {name!r}, which is not a file inside the folder; the folder is damaged")
        want = files.get(name)
        if want is None:
            raise CheckpointError(f"{mpath} does not list {name}; the folder is damaged")
        if not (isinstance(want, dict) and isinstance(want.get("sha256"), str) and _SHA256.match(want["sha256"])
                and isinstance(want.get("bytes"), int) and not isinstance(want["bytes"], bool)):
            raise CheckpointError(f"{mpath}: the entry for {name} is not a checksum and a size ({want!r}); "
                                  "the folder is damaged")
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing (the manifest lists it)")
        size = fpath.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{fpath} is truncated or altered: {size} bytes on disk, "
                                  f"{want['bytes']} when saved")
        if file_digest(fpath)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{fpath} fails its checksum (sha256 mismatch): the file changed after "
                                  "saving (disk error or tampering); it will not be loaded")
    return manifest


def read_config(path: str | Path, verify: bool = True) -> dict:
    """The run config stored in a checkpoint folder.

    Example: read_config(".../step_0000500")["train"]["lr"] -> 0.0003
    """
    if verify:
        verify_checkpoint(path)
    cpath = Path(path) / CONFIG_FILE
    try:
        config = json.loads(cpath.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cpath} cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cpath} holds a {type(config).__name__}, not a config mapping")
    return config


STAGE_NAMES = {"transformer": "a transformer", "reranker": "a reranker (CLIP)", "dvae": "an image tokenizer (dVAE)"}


def stage_of(config: dict) -> str:
    """Which stage wrote a checkpoint, from its config.json: "transformer" (it records the dVAE and BPE it
    was trained with), "reranker" (a BPE only) or "dvae" (no tokenizers: the image tokenizer, or a run
    of the generic Trainer). Example: stage_of(read_config(".../clip/checkpoints/step_0000020")) -> "reranker"
    """
    ids = config.get("tokenizers") if isinstance(config, dict) else None
    if not isinstance(ids, dict):
        return "dvae"
    return "transformer" if "dvae" in ids else "reranker"


def wrong_stage(path: str | Path, found: str, wanted: str) -> CheckpointError:
    """The error for a checkpoint of another stage than a loader reads, naming the command that reads it.

    Example: wrong_stage(p, "reranker", "transformer") -> CheckpointError("p is a reranker (CLIP) checkpoint, not
             a transformer one; `python -m minidalle eval clip --checkpoint p` reads it")
    """
    readers = {"transformer": "eval transformer --checkpoint", "reranker": "eval clip --checkpoint"}
    why = " (its config.json records no tokenizers)" if found == "dvae" else ""
    hint = f"; `python -m minidalle {readers[found]} {path}` reads it" if found in readers else ""
    return CheckpointError(f"{path} is {STAGE_NAMES[found]} checkpoint{why}, not {STAGE_NAMES[wanted]} one{hint}")


@dataclass
class Loaded:
    """Everything one checkpoint folder holds, read back and checked, before any of it is applied."""

    path: Path
    step: int
    tensors: dict  # name -> tensor, as safetensors stored them (a tied tensor once)
    state: dict  # what torch.load(weights_only=True) rebuilt from state.pt
    config: dict  # config.json
    sharded: bool = False  # written by an FSDP run: weights and optimizer live in `sharded/`


def weights_id(path: str | Path, verify: bool = True) -> str:
    """A checksum naming a checkpoint's weights (a tokenizer's identity in cache keys): the sha256 of
    model.safetensors, or for a sharded checkpoint one sha256 over its slice files' checksums.
    verify=False reads it from the manifest alone (to find a candidate; load it verified).

    Example: weights_id(".../step_0000500") -> "3f9a..."
    """
    if verify:
        files = verify_checkpoint(path)["files"]
    else:
        try:
            files = json.loads((Path(path) / MANIFEST_FILE).read_bytes().decode("utf-8"))["files"]
            files = {k: {"sha256": str(v["sha256"])} for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{Path(path) / MANIFEST_FILE} cannot be read ({type(e).__name__})") from None
    if MODEL_FILE in files:
        return files[MODEL_FILE]["sha256"]
    shards = sorted((k, v["sha256"]) for k, v in files.items() if k.startswith(f"{SHARDED_DIR}/"))
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


class UntrustedCheckpoint(CheckpointError):
    """A sharded checkpoint a reader was not told to trust (reading it would unpickle its index)."""


def sharded_refusal(path: str | Path) -> CheckpointError:
    """The error for a sharded checkpoint that a reader was not told to trust: what it would run, what to do.

    Example: sharded_refusal("runs/x/checkpoints/step_0000500") -> CheckpointError("... --trust-sharded ...")
    """
    return UntrustedCheckpoint(
        f"{path} is a sharded (FSDP) checkpoint: reading it means unpickling its {SHARDED_DIR}/.metadata (PyTorch's "
        f"distributed-checkpoint index), and a pickle can run any code, which the checksums cannot prevent (whoever "
        f"wrote the folder wrote the manifest too). If your own run wrote it, export it once with `python -m "
        f"minidalle export {path} --trust-sharded` and use the exported folder (safetensors only), or pass "
        f"--trust-sharded (trust_sharded=True in Python)")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", full_weights: bool = True,
                    verify: bool = True, trust_sharded: bool = False) -> Loaded:
    """Verify a checkpoint and read all of it back; raise CheckpointError if any part cannot be read.

    A file can match its manifest and still be unreadable: the manifest was rewritten by hand, or
    the file was damaged before the checksums were taken. Reading everything *first*, and only then
    touching a model or optimizer, is what lets a resume fall back to an older checkpoint instead of
    stopping half-way with a model that holds some new and some old weights.
    A sharded checkpoint's weights are read only with trust_sharded=True (its index is a pickle:
    `sharded_refusal`); full_weights=False reads just its config and state, which are pickle-free.
    Example: read_checkpoint(".../step_0000500").state["step"] -> 500
    """
    path = Path(path)
    # verify=False: another process already checked these very files (a resume's rank 0)
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST_FILE).read_text())
    config = read_config(path, verify=False)
    if manifest.get("kind") == "sharded":
        if full_weights and not trust_sharded:
            raise sharded_refusal(path)
        state = _load_state(path, map_location)
        tensors = {}
        if full_weights:  # the sampler's view: every tensor whole (resuming re-slices instead: load_sharded)
            payload = sharded.read_whole(path / SHARDED_DIR)
            tensors = payload.get("model", {})
            if "ema" in payload:
                state["ema"] = payload["ema"]
        return Loaded(path, manifest["step"], tensors, state, config, sharded=True)
    try:
        tensors = load_file(str(path / MODEL_FILE), device=str(map_location))
    except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, ...: all mean "not readable"
        raise CheckpointError(f"{path / MODEL_FILE} cannot be read as safetensors ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    return Loaded(path, manifest["step"], tensors, _load_state(path, map_location), config)


def _load_state(path: Path, map_location) -> dict:
    try:
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- UnpicklingError, EOFError, RuntimeError, ... all mean the same here
        raise CheckpointError(f"{path / STATE_FILE} cannot be loaded with weights_only=True ({type(e).__name__}: "
                              f"{first_line(e)}); refusing to unpickle it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} holds a {type(state).__name__}, not a state mapping")
    return state


# --- sharded checkpoints (FSDP) ------------------------------------------------------------------

def save_sharded(root: str | Path, step: int, model: torch.nn.Module, optimizer, state: dict, config: dict,
                 ctx, keep_last: int = 2, ema: dict | None = None) -> Path:
    """Every process writes its slices into `.tmp-step_.../sharded/`; then rank 0 alone adds the
    config, state and manifest, renames the folder into place and prunes, as `save_checkpoint` does.

    A process killed at any point leaves no `step_*` folder, so the previous checkpoint stays the
    newest; a later start removes the temp folder. Every process must call this together.
    Example: save_sharded(root, 500, fsdp_model, optimizer, {"step": 500, ...}, cfg, ctx)
    """
    from ..scale import distributed

    if keep_last < 2:
        raise ConfigError(f"keep_last={keep_last}: keep at least 2 checkpoints")
    _check_plain(state, "state")
    config_text = _json_text(config, CONFIG_FILE)
    root, final, tmp = Path(root), Path(root) / step_dir_name(step), None
    if ctx.main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp = Path(distributed.broadcast(str(tmp), ctx))
    sharded.write_slices(tmp / SHARDED_DIR, model, optimizer, ema)
    distributed.barrier(ctx)  # every slice is on disk before rank 0 vouches for them
    if ctx.main:
        write_synced(tmp / CONFIG_FILE, config_text)
        torch.save(state, tmp / STATE_FILE)
        fsync_file(tmp / STATE_FILE)
        for f in (tmp / SHARDED_DIR).iterdir():
            fsync_file(f)
        fsync_dir(tmp / SHARDED_DIR)
        files = {str(f.relative_to(tmp)): file_digest(f)
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {"format": FORMAT, "step": step, "kind": "sharded", "world": ctx.world, "files": files}
        write_synced(tmp / MANIFEST_FILE, _json_text(manifest, MANIFEST_FILE))
        fsync_dir(tmp)
        if final.exists():
            _remove_dir(final)
        os.rename(tmp, final)
        fsync_dir(root)
        prune_checkpoints(root, keep_last, newest=step)
    distributed.barrier(ctx)
    return final


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer, ema: dict | None = None) -> bool:
    """Fill a live model and optimizer (sharded over any number of processes, or not at all) from the
    sharded checkpoint folder `path`: each process reads just the pieces of its own slices. Returns
    whether an EMA was loaded into `ema` (False when the run saved none: the caller starts it from the weights).

    Example: load_sharded(".../step_0000500", fsdp_model, optimizer) -> False
    """
    return sharded.load_slices(Path(path) / SHARDED_DIR, model, optimizer, ema)


def export_checkpoint(path: str | Path, out: str | Path | None = None, trust_sharded: bool = False) -> Path:
    """Write a sharded checkpoint as one full checkpoint folder (model.safetensors, config, state with
    the step, loss and EMA; no optimizer), the form every loader reads. Default: `<path>-full`.
    Reading the sharded one unpickles its index, so it needs trust_sharded=True (`sharded_refusal`).

    Example: export_checkpoint("runs/x/transformer/checkpoints/step_0000500", trust_sharded=True)
             -> Path(".../step_0000500-full")
    """
    src = Path(path)
    out = Path(out) if out is not None else src.with_name(src.name + "-full")
    if verify_checkpoint(src).get("kind", "full") != "sharded":
        raise CheckpointError(f"{src} is already a full checkpoint (model.safetensors); load it directly")
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or pass another --out")
    loaded = read_checkpoint(src, trust_sharded=trust_sharded)
    state = {k: loaded.state[k] for k in ("step", "loss", "ema") if k in loaded.state}
    state["exported_from"] = str(src)
    _check_plain(state, "state")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
    tmp.mkdir()
    try:
        _write_folder(tmp, loaded.step, loaded.tensors, state, _json_text(loaded.config, CONFIG_FILE))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)
    fsync_dir(out.parent)
    return out


def weight_problems(model: torch.nn.Module, tensors: dict) -> list[str]:
    """How checkpoint tensors fail to fit `model` (missing and unexpected names, wrong shapes); [] when they fit.

    Tied names stored once (see apply_weights) are not missing. Nothing is copied.
    Example: a 2-layer checkpoint, a 4-layer model -> ["missing blocks.2.attn.qkv.weight, ..."]
    """
    own = model.state_dict()
    stored_ptrs = {own[k].data_ptr() for k in tensors if k in own}
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(k for k in set(own) - set(tensors) if own[k].data_ptr() not in stored_ptrs)
    wrong = [f"{k}: {tuple(tensors[k].shape)} stored, {tuple(own[k].shape)} here"
             for k in tensors if k in own and tensors[k].shape != own[k].shape]
    problems = [f"missing {', '.join(missing[:4])}" if missing else "",
                f"unexpected {', '.join(unexpected[:4])}" if unexpected else "", "; ".join(wrong[:4])]
    return [p for p in problems if p]


def apply_weights(model: torch.nn.Module, tensors: dict, where: str | Path) -> None:
    """Copy checkpoint tensors into `model`, strictly: every key and shape must match, or nothing is copied.

    `save_model` stored each tied tensor once (say a token embedding shared with the output head);
    its other names are filled by the copy into the shared storage.
    Example: apply_weights(model, read_checkpoint(p).tensors, p)
    """
    problems = weight_problems(model, tensors)
    if problems:
        raise CheckpointError(f"{where} does not fit this model ({'; '.join(problems)}); was it "
                              "saved from a different architecture or config?")
    model.load_state_dict(tensors, strict=False)  # strict=False only for the tied names checked above


def load_checkpoint(path: str | Path, model: torch.nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Verify a checkpoint, load its weights into `model` (if given); return (state, config).

    Example: state, config = load_checkpoint(".../step_0000500", model); state["step"] -> 500
    """
    loaded = read_checkpoint(path, map_location)
    if model is not None:
        apply_weights(model, loaded.tensors, Path(path) / MODEL_FILE)
    return loaded.state, loaded.config


def find_resumable(root: str | Path, map_location: str | torch.device = "cpu",
                   check=None, full_weights: bool = True) -> tuple[Loaded | None, list[tuple[Path, str]]]:
    """The newest checkpoint in `root` that reads back completely, and each newer one rejected, with why.

    `check(loaded)` may raise CheckpointError to reject a checkpoint for what it holds (the trainer
    checks that the state has a step, optimizer moments and RNG states).
    Example: step_0000004 (tampered), step_0000002 (fine)
             -> (Loaded(step=2, ...), [(Path(".../step_0000004"), "... fails its checksum ...")])
    """
    rejected = []
    for _, p in reversed(list_checkpoints(root)):
        try:
            loaded = read_checkpoint(p, map_location, full_weights=full_weights)
            if check is not None:
                check(loaded)
            return loaded, rejected
        except CheckpointError as e:
            rejected.append((p, str(e)))
    return None, rejected


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint in `root` that reads back completely, warning about each newer one skipped.

    Example: step_0000004 (tampered), step_0000002 (fine) -> warns about step_0000004, returns .../step_0000002
    """
    loaded, rejected = find_resumable(root, full_weights=False)  # a path is wanted, not the weights
    for p, why in rejected:
        warn_skipped(p, why, stacklevel=3)
    return None if loaded is None else loaded.path


_SKIPPED: set[tuple[str, str]] = set()  # (checkpoint, why) already warned about


def warn_skipped(path: Path, why: str, stacklevel: int = 2) -> None:
    """Warn that an invalid checkpoint is skipped, once per process and checkpoint: a command (the demo)
    may look in one folder several times, and one line says it."""
    if (str(path), why) not in _SKIPPED:
        _SKIPPED.add((str(path), why))
        warnings.warn(f"skipping invalid checkpoint {path.name}: {why}", stacklevel=stacklevel + 1)


# --- one writer per run folder: files.RunLock (imported above) ----------------------------------------



# --- small helpers ------------------------------------------------------------------------------------

def _check_plain(obj, where: str) -> None:
    """Refuse anything `torch.load(weights_only=True)` could not rebuild, naming where it sits.

    Example: {"rng": np.zeros(3)} -> CheckpointError("state['rng'] is a numpy.ndarray ...")
    """
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which "
                          "torch.load(weights_only=True) refuses; store it as a tensor, list or number")


def _json_text(obj, name: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot write {name}: it is not JSON-serialisable ({e})") from None


def _remove_dir(path: Path) -> None:
    """Rename to a temp name first, so a crash half-way through rmtree never leaves a damaged `step_*`."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
