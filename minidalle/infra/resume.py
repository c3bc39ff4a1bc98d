"""What makes a run stop and start again exactly: finding and loading the checkpoint to continue, the data order, the metrics log.

    class Trainer(Resuming): ...                  # train.py: fit() calls _agreed_resume_point and _load
    stream = _BatchStream(batch_at, seed=0, start=5)   # the micro-batches from number 5 on, as a fresh run reads them
    rows = read_metrics(out_dir / "metrics.jsonl")     # every logged step, a torn last line forgiven

A resume is exact: the weights, the optimizer's moments, the EMA, the loss scale, every RNG stream
and the place in the data come back from the checkpoint, so the resumed run takes the same updates
an uninterrupted one would. Resuming with changed settings warns, naming each changed key; a
checkpoint that does not fit the model is refused before anything changes; `start_over` moves the
old run's checkpoints and metrics into `set-aside-<time>/` (nothing is deleted). Under torchrun,
rank 0 decides and the others follow, so no process waits at a collective another has left.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import CheckpointError, ConfigError, DataError
from ..scale import distributed
from . import checkpoint as ckpt
from .devices import rng_isolated, seed_everything, set_fused, use_fused
from .files import set_aside_folder

_END = object()  # sentinel for "iterator exhausted"
_RANK_SEED = 1_000_003  # rank r's RNG stream starts at seed + r * this (rank 0: exactly the seed)


class Resuming:
    """The resume half of Trainer (a mixin: it reads the trainer's cfg, dist, model, optimizer, ema, out_dir)."""

    def _agreed_resume_point(self, resume, start_over: bool) -> ckpt.Loaded | None:
        """`_resume_point` on rank 0 (which may warn, refuse or set the run aside), then the same
        checkpoint read on every other process; an error on rank 0 stops them all."""
        if not self.dist.active or self.dist.world == 1:
            return self._resume_point(resume, start_over)
        start, err = None, None
        if self.dist.main:
            try:
                start = self._resume_point(resume, start_over)
            except Exception as e:  # noqa: BLE001 -- rank 0's reason is the others' reason to stop
                err = e
        chosen = distributed.broadcast(("error", str(err)) if err else ("ok", start and str(start.path)), self.dist)
        if err is not None:
            raise err
        if chosen[0] == "error":
            raise CheckpointError(f"rank 0 could not resume: {chosen[1]}")
        if self.dist.main or chosen[1] is None:
            return start
        loaded = ckpt.read_checkpoint(chosen[1], full_weights=False, verify=False)  # rank 0 checked every file
        _check_state(loaded)
        return loaded

    def _load(self, start: ckpt.Loaded) -> None:
        """Put a checkpoint's weights, optimizer moments, EMA and loss scale into this run."""
        if start.sharded:  # any number of processes, sharded or not: each reads its own slices
            if self.dist.parallel != "fsdp" and not self._trust_sharded:
                raise ckpt.UntrustedCheckpoint(
                    f"{start.path} is a sharded (FSDP) checkpoint and this run is not fsdp: resuming it means "
                    f"unpickling its {ckpt.SHARDED_DIR}/.metadata, and a pickle can run any code. If your own run "
                    f"wrote it, pass --trust-sharded (trust_sharded=True), or resume it with "
                    f"--{self.section}.parallel=fsdp under torchrun; else start over (--start-over)")
            try:
                has_ema = ckpt.load_sharded(start.path, self.model, self.optimizer, self.ema)
            except CheckpointError as e:
                raise CheckpointError(f"{e}{self._changed_since(start)}") from None
            if not has_ema and self.ema is not None:
                self._load_ema(start)  # EMA just switched on: it starts from the loaded weights
        else:
            if self.dist.parallel == "fsdp":
                raise CheckpointError(f"{start.path} is a full checkpoint (written by a ddp or single-process run); "
                                      f"an fsdp run resumes from the sharded checkpoints it writes. Resume it with "
                                      f"--{self.section}.parallel=ddp, or start over")
            # Names and shapes first (a changed architecture, named as such), then the optimizer, whose
            # load checks the parameter counts before changing anything, then the copy: a checkpoint
            # that does not fit leaves the model and optimizer exactly as they were.
            problems = ckpt.weight_problems(self.module, start.tensors)
            if problems:
                raise CheckpointError(f"{start.path} holds the weights of another architecture than this model "
                                      f"({'; '.join(problems)}){self._changed_since(start)}. Resume with the "
                                      f"settings it was saved with, or start over with --start-over (start_over=True)")
            try:
                self.optimizer.load_state_dict(start.state["optimizer"])
                set_fused(self.optimizer, use_fused([p for g in self.optimizer.param_groups for p in g["params"]],
                                                    self.cfg))
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{start.path / ckpt.STATE_FILE}: its optimizer state does not fit this "
                                      f"model's parameters ({e})") from None
            ckpt.apply_weights(self.module, start.tensors, start.path / ckpt.MODEL_FILE)
            if self.ema is not None:
                self._load_ema(start)
        if self.scaler is not None and isinstance(start.state.get("scaler"), dict):
            self.scaler.load_state_dict(start.state["scaler"])

    def _changed_since(self, start: ckpt.Loaded) -> str:
        """"; settings changed since it was saved: model.n_layer: 2 -> 4, ..." ("" when none did)."""
        changes = [c for c in _config_changes(start.config, self.config) if not c.split(":")[0].endswith("out_dir")]
        return f"; settings changed since it was saved: {', '.join(changes[:6])}" if changes else ""

    def _rank_rng(self, start: ckpt.Loaded) -> dict | None:
        """This process's saved RNG state; None (fresh per-rank seeds) when the world size changed."""
        ranks = start.state.get("rng_ranks")
        if isinstance(ranks, list) and len(ranks) == self.dist.world:
            return ranks[self.dist.rank]
        saved_world = len(ranks) if isinstance(ranks, list) else 1
        if saved_world == self.dist.world == 1:
            return start.state["rng"]
        if self.dist.main:
            warnings.warn(f"{start.path.name} was saved by {saved_world} processes and resumes on {self.dist.world}: "
                          "weights, optimizer moments and the data continue exactly; the random streams (dropout) "
                          "start afresh", stacklevel=4)
        seed_everything(self.cfg.seed + _RANK_SEED * self.dist.rank + start.step)
        return None

    def _resume_point(self, resume, start_over: bool) -> ckpt.Loaded | None:
        """The checkpoint fit() starts from, read back and checked (None = from scratch); see fit()."""
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if start_over:
            self._set_aside()
            return None
        if resume is False or resume is None:
            if existing:
                raise CheckpointError(f"{self.ckpt_root} already holds checkpoints ({existing[-1][1].name}, ...); "
                                      f"continue that run with --resume (resume=True in Python), start over with "
                                      f"--start-over (start_over=True), or choose another folder ({self.out_flag})")
            return None
        if resume is True:
            loaded, rejected = ckpt.find_resumable(self.ckpt_root, check=_check_state, full_weights=False)
            if loaded is None and rejected:
                why = "; ".join(f"{p.name}: {reason.replace(str(p) + os.sep, '')}" for p, reason in rejected)
                raise CheckpointError(f"cannot resume: none of the {len(rejected)} checkpoints in {self.ckpt_root} "
                                      f"can be read ({why}). Nothing was changed. Start over with --start-over "
                                      f"(start_over=True), which moves them into {self.out_dir}/set-aside-<time>/")
            for p, reason in rejected:
                ckpt.warn_skipped(p, reason, stacklevel=4)
            return loaded
        loaded = ckpt.read_checkpoint(resume, full_weights=False)  # an explicitly named checkpoint must be intact
        _check_state(loaded)
        newer = [p.name for s, p in existing if s > loaded.step]
        if newer:
            warnings.warn(f"resuming from step {loaded.step} while newer checkpoints exist "
                          f"({', '.join(newer)}); they are overwritten as training reaches their steps", stacklevel=4)
        return loaded

    def _set_aside(self) -> Path | None:
        """Move this run's checkpoints and metrics into out_dir/set-aside-<time>/ (start_over=True)."""
        parts = [p for p in (self.ckpt_root, self.out_dir / "metrics.jsonl") if p.exists()]
        if not parts:
            return None
        aside = set_aside_folder(self.out_dir)  # two restarts in one second get two folders
        for part in parts:
            os.rename(part, aside / part.name)
        ckpt.fsync_dir(self.out_dir)  # the moves survive a power cut
        warnings.warn(f"starting over: the previous run's {' and '.join(p.name for p in parts)} moved to {aside}",
                      stacklevel=5)
        return aside

    def _warn_if_config_changed(self, start: ckpt.Loaded) -> None:
        """Warn, listing each key, when this run's config differs from the one saved at `start`.

        The LR schedule is a pure function of the config, so a changed train.max_steps or
        train.warmup_steps silently bends the rest of the curve. A warning, not an error: resuming
        with a larger max_steps to train longer is a normal thing to do.
        """
        changes = _config_changes(start.config, self.config)
        if changes:
            warnings.warn(f"resuming from {start.path.name} with a config that differs from the one it was saved "
                          "with; the resumed run uses the new values:\n  " + "\n  ".join(changes), stacklevel=4)

    def _load_ema(self, start: ckpt.Loaded) -> None:
        """Continue the saved EMA; a checkpoint saved without one (EMA just switched on) starts it from its weights."""
        saved = start.state.get("ema")
        if not isinstance(saved, dict) or set(saved) != set(self.ema):
            warnings.warn(f"{start.path.name} holds no EMA of these weights; the EMA starts from them now", stacklevel=5)
            saved = {k: v for k, v in self.module.state_dict().items() if k in self.ema}
        for k, v in saved.items():
            self.ema[k].copy_(v.float())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Parse `metrics.jsonl` (or the one inside a run folder) into a list of dicts.

    Example: read_metrics("runs/smoke")[0] -> {"step": 1, "split": "train", "loss": 5.41, ...}
    """
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:  # only the very last line can be torn (by a crash mid-write)
                raise DataError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
    return out


class _BatchStream:
    """Hands out one process's training micro-batches in order, and can start again at any of them.

    `start` counts this process's micro-batches already consumed. With `world` processes, process
    `rank` reads global batch j = offset + k * world + rank for its k-th micro-batch (offset: nonzero
    only after a resume that changed grad_accum x world): `batch_at(j)` directly,
    or, from an iterable every process walks identically, every world-th batch. An iterable that
    already gives each process its own share (`split_by_rank`: the folder and tar datasets split their
    files by rank) is read whole; its ranks may hold unequal numbers of batches, and each simply
    starts its next epoch sooner: every process still makes exactly max_steps updates, so none waits.
    Example: _BatchStream(lambda i: i, seed=0, start=5).next() -> 5
             _BatchStream(lambda i: i, seed=0, start=5, rank=1, world=2).next() -> 11
    """

    def __init__(self, data, seed: int, start: int = 0, rank: int = 0, world: int = 1, split_by_rank: bool = False,
                 offset: int = 0, prefetch: bool = False, prepare=None):
        self.data, self.seed, self.epoch, self._it, self.offset = data, seed, -1, None, offset
        self.rank, self.world = (0, 1) if split_by_rank else (rank, world)
        self.k = start if callable(data) else 0  # this process's micro-batches handed out
        self._drawn = 0  # iterables: batches drawn from the shared stream
        self.prepare = prepare or (lambda batch: batch)  # e.g. pin the batch's memory, for a non-blocking copy
        # prefetch: a `batch_at` callable (a pure function of the index) builds the next batch in a
        # thread while the device computes this one; an iterable is read in order on this thread (its
        # epochs start under pinned RNG states, and a DataLoader has workers of its own)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="minidalle-batches") if prefetch and callable(data) \
            else None
        self._ahead: tuple[int, Future] | None = None
        while self.k < start:  # an iterable cannot jump: draw the consumed batches and drop them
            self.next()

    def next(self):
        j = self.offset + self.k * self.world + self.rank
        if self._pool is not None:
            ahead, self._ahead = self._ahead, None
            batch = ahead[1].result() if ahead is not None and ahead[0] == j else self._build(j)
            self._ahead = (j + self.world, self._pool.submit(self._build, j + self.world))
        elif callable(self.data):
            batch = self._build(j)
        else:
            while True:
                batch = self._draw()
                self._drawn += 1
                if self._drawn - 1 == j:
                    break
            batch = self.prepare(batch)
        self.k += 1
        return batch

    def _build(self, j: int):
        return self.prepare(self.data(j))

    def close(self) -> None:
        """Stop the prefetch thread (the batch it was building is dropped)."""
        if self._pool is not None:
            if self._ahead is not None:
                self._ahead[1].cancel()
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, None

    def _draw(self):
        batch = _END if self._it is None else next(self._it, _END)
        if batch is _END:
            self._it = self._new_epoch()
            batch = next(self._it)
        return batch

    def _new_epoch(self):
        """A fresh iterator whose shuffle depends only on seed + epoch (not on where training is)."""
        self.epoch += 1
        # Draw the first batch inside the pinned RNG too: a DataLoader picks its shuffle order on the
        # first next(), not in iter(), so pinning only iter() left resumed runs with another order.
        set_epoch(self.data, self.epoch)
        with rng_isolated(self.seed + self.epoch):
            it = iter(self.data)
            first = next(it, _END)
        if first is _END:
            raise DataError(f"train_data yielded no batches in epoch {self.epoch}; pass a re-iterable "
                            "(list, DataLoader) or a batch_at(i) callable, not a one-shot generator")
        return itertools.chain([first], it)


def _check_state(loaded: ckpt.Loaded) -> None:
    """Refuse a checkpoint whose state.pt lacks what an exact resume needs (a CheckpointError, so
    a resume falls back to an older checkpoint rather than stopping)."""
    state, where = loaded.state, loaded.path / ckpt.STATE_FILE
    problems = []
    if state.get("step") != loaded.step:
        problems.append(f"step {state.get('step')!r} (the manifest says {loaded.step})")
    opt = state.get("optimizer")
    if not loaded.sharded and not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
                                   and isinstance(opt.get("param_groups"), list)):
        problems.append("no optimizer state")  # (a sharded checkpoint keeps it in sharded/)
    rng = state.get("rng")
    if not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng)):
        problems.append("no RNG states")
    if problems:
        raise CheckpointError(f"{where} is not a training state: {', '.join(problems)}")


def _splits_itself(data) -> bool:
    """True when the data (or a DataLoader's dataset) deals itself out by rank (`splits_by_rank`)."""
    return any(getattr(part, "splits_by_rank", False) for part in (data, getattr(data, "dataset", None)))


def set_epoch(data, epoch: int) -> None:
    """Tell the data which epoch starts, wherever it listens: the data itself, a DataLoader's
    dataset (the folder and tar datasets reshuffle by seed and epoch) or its sampler (a
    DistributedSampler). Without this every epoch of those datasets had the same order.

    Example: set_epoch(DataLoader(FolderDataset(...)), 3) -> dataset.epoch == 3
    """
    seen = []
    for part in (data, getattr(data, "dataset", None), getattr(data, "sampler", None)):
        fn = getattr(part, "set_epoch", None)
        if callable(fn) and not any(part is s for s in seen):
            fn(epoch)
            seen.append(part)


def _config_dict(cfg, section: str, config) -> dict:
    """What goes into each checkpoint's config.json: the whole run's config (anything with
    `to_dict()`, such as a Config), a JSON-able dict, or by default {section: these settings}."""
    if config is None:
        return {section: dataclasses.asdict(cfg)}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config must be a Config or a JSON-serialisable dict ({e})") from None
    return dict(config)


def _config_changes(old: dict, new: dict) -> list[str]:
    """Every setting that differs between two nested config dicts, as "dotted.key: old -> new" lines.

    Both sides go through JSON first, so a tuple in a live config equals the list it was saved as.
    Example: {"train": {"max_steps": 100, "lr": 0.1}}, {"train": {"max_steps": 200, "lr": 0.1}}
             -> ["train.max_steps: 100 -> 200"]
    """
    old, new = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))

    def show(d: dict, key: str) -> str:  # a key only one side has: a field added or removed since
        return repr(d[key]) if key in d else "(absent)"

    return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(old.keys() | new.keys())
            if k not in old or k not in new or old[k] != new[k]]


def _flatten(d: dict, prefix: str = "") -> dict:
    """Example: {"train": {"lr": 0.1}, "seed": 0} -> {"train.lr": 0.1, "seed": 0}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _open_metrics(path: Path, keep_upto: int):
    """Open metrics.jsonl for appending, first dropping lines past `keep_upto` (logged after the
    checkpoint we resume from, so they will be logged again) -- the file then reads as one clean run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_upto] if keep_upto else []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one, never half
    return open(path, "a")


def _write_line(f, record: dict) -> None:
    if f is None:  # not rank 0
        return
    f.write(json.dumps(record) + "\n")
    f.flush()  # one line per flush: `tail -f` and a crashed run both see every finished step
