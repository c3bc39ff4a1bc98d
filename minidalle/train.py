"""One generic training loop. It knows nothing about DALL·E: minGPT's `Trainer` is the model.

Each update does, in order:

    batch = the next batch         a `batch_at(i)` callable, or any re-iterable (list, DataLoader)
    lr    = lr_at(step, cfg)       linear warm-up, then cosine down to cfg.min_lr (a pure function)
    loss  = loss_fn(model, batch)  a scalar tensor, or (loss, {"name": number, ...}) to log extras
                                   (floats or 0-d tensors, read with the loss in one host sync)
    loss.backward(); clip the global grad norm to cfg.grad_clip; AdamW step
    ema   = decay * ema + (1 - decay) * weights   only when cfg.ema_decay > 0 (saved with the state;
                                                   one _foreach_lerp_ over every tensor)

The update reads numbers back from the device once: the loss, its extras (0-d tensors) and the grad
norm come back together (`_read`), since on a GPU every read makes the host wait for all queued
work. On CUDA the next `batch_at` batch is built in a thread while this one trains, in pinned memory
for a non-blocking copy (`prefetch`), and fp32 matmuls use TF32 (`fast_fp32_matmuls`).

The loss runs under bf16 autocast when cfg.precision resolves to bf16 (auto: CUDA only), or under
fp16 autocast with a gradient scaler (precision=fp16: an update whose gradients overflow is
skipped and counted, and the scale lowered, as torch.amp does; that is how fp16 finds its scale).
Otherwise a non-finite loss or gradient norm stops the run before the optimizer touches the weights
(cfg.nonfinite=stop), or skips that update and counts it (skip).

Under torchrun with cfg.parallel = ddp or fsdp (scale/distributed.py) every process runs this same
loop on its own share of each batch: with cfg.grad_accum = A micro-batches per update and W
processes, update s reads micro-batches j = ((s - 1) A + m) W + rank for m < A, so the global
batch (batch_size x A x W samples) and the data order are the same for any W and A with the
same product -- one process with A = 2 trains exactly what two processes with A = 1 do. Rank 0
alone writes metrics, the progress bar and the shared checkpoint files; a stop requested on any
process is agreed by all before the next update.

and then, each on its own schedule: a JSON line in `{out_dir}/metrics.jsonl` (every cfg.log_every
updates and the last), an evaluation (every cfg.eval_every; needs eval_data), a checkpoint (every
cfg.ckpt_every, at the end, and when a callback calls `trainer.request_stop()`).
Hooks (`trainer.add_callback("on_eval", fn)`) let a notebook plot or stop without editing the loop.

`step` always means "updates completed so far": step 500's metrics line, lr_at(500, cfg) and the
folder `checkpoints/step_0000500/` all describe the 500th update. Batches are indexed from 0, so
update `step` consumes batch_at(step - 1).

Resuming is exact: a run stopped at step k and resumed reproduces the uninterrupted run's losses
bit for bit (same device and library versions), because the checkpoint holds the optimizer moments
and every RNG state, and the data restarts at batch k. A `batch_at` callable restarts instantly; an
iterable is rebuilt and its first k batches are drawn and thrown away, which costs data-loading time
and is exact when each epoch depends only on the RNG state at its start (true for DataLoader and
for lists): every epoch starts from the pinned seed `cfg.seed + epoch`. Resuming with a changed
config (say a larger train.max_steps, to train longer) is allowed but warns, listing every changed
key: the LR schedule is computed from the config, so the rest of the run follows the new values.
(Exact means without PowerSGD, whose error-feedback memory lives in the communication hook and
is not saved.) A resume on another number of processes continues the weights, moments and data
exactly; the random streams restart, and if grad_accum x processes changed, so does the global batch,
with the data continuing from the first sample not yet trained on. The resume half of the Trainer
(finding, checking and loading the checkpoint, the data order, the metrics log) is in
infra/resume.py; seeding and devices in infra/devices.py.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .infra import checkpoint as ckpt
from .scale import distributed
from .config import TrainConfig, check_section, smoke_mode
from .errors import ConfigError, DataError, MinidalleError
from .infra.devices import (capture_rng_state, fast_fp32_matmuls, pick_device, resolve_precision, restore_rng_state,
                            rng_isolated, seed_everything, use_fused)
from .infra.resume import _RANK_SEED, Resuming, _BatchStream, _config_dict, _open_metrics, _splits_itself, _write_line

EVENTS = ("on_fit_start", "on_before_optimizer_step", "on_step_end", "on_eval", "on_checkpoint", "on_fit_end")
_RESERVED = {"step", "split", "loss", "lr", "grad_norm", "step_ms"}  # keys a loss_fn extra may not use


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for update `step` (1-based): linear warm-up to cfg.lr, cosine decay to cfg.min_lr.

    Warm-up matters because Adam's second-moment estimate is poor for the first updates, so full-size
    steps early can blow the weights up; the cosine tail lets the model settle into a minimum.
    Example: lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110:
             step 5 -> 5e-4, step 10 -> 1e-3, step 60 -> 5.5e-4 (half-way), step 110 -> 1e-4
    """
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; biases, norm gains and other 1-D params are not decayed.

    Decay pulls weights toward 0; for a LayerNorm gain or a bias that is just a wrong prior, so
    (like GPT-2 and nanoGPT) we split by dimension. `parameters()` already lists a tied weight once.
    Example: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)) -> groups with 1 tensor (decay), 3 (no decay)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused=True (nanoGPT's GPU speed-up) runs the whole update in one kernel per dtype: on a CPU it cut the
    # toy's optimizer step 3.6x (3.2 -> 0.9 ms). The flag is saved in the optimizer state, so a resume sets it
    # again for the device it runs on (use_fused).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=use_fused(params, cfg))


class Trainer(Resuming):
    """Trains `model` by minimising `loss_fn(model, batch)`; see the module docstring for the loop.

    Args:
        model: any nn.Module; moved to the device picked from cfg.device, and wrapped (ddp) or
            sharded in place (fsdp) as cfg.parallel says: `trainer.model` is what the loss sees,
            `trainer.module` the model itself. Under fsdp a model built on the meta device is
            materialised slice by slice (it needs `init_parameter`, see distributed.materialize).
        cfg: the TrainConfig of this stage (a run's `cfg.train`, `cfg.dvae_train` or `cfg.clip_train`).
        train_data: `batch_at(i) -> batch` (exact, instant resume) or a re-iterable of batches.
        loss_fn: `loss_fn(model, batch) -> loss` or `-> (loss, {name: float})`; loss a 0-d tensor.
        eval_data: like train_data; evaluation uses its first cfg.eval_batches batches every time.
        config: what to store as `config.json` in each checkpoint: the whole run's config (anything
            with `to_dict()`) or a JSON-able dict; default {section: cfg}.
        progress: show a tqdm bar with the live loss.
        out_flag: the command-line setting that chose cfg.out_dir, named in messages about the folder
            (default `--<section>.out_dir`; `demo` passes `--out`).
        section: which section of the run's config cfg is, so messages name the key the user types
            (`--dvae_train.out_dir`, not `train.out_dir`); default "train".
        log: where the line saying how many CPU threads a fit runs on goes (`_pick_threads`).
        prefetch: build the next `batch_at` batch in a thread while this one trains (default: on CUDA,
            where the device computes while the host renders; on a CPU the thread would take the
            cores the update uses). On CUDA each batch is also pinned there and copied non-blocking.
    Example: Trainer(model, TrainConfig(max_steps=100), batch_at, loss_fn).fit()
             -> {"train": [100 dicts like {"step": 1, "loss": 5.4, "lr": ...}], "eval": [...]}
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, train_data, loss_fn: Callable,
                 eval_data=None, config=None, progress: bool = True, out_flag: str | None = None,
                 section: str = "train", log: Callable[[str], None] = print, prefetch: bool | None = None):
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"Trainer takes the TrainConfig of one stage (a run's cfg.train, cfg.dvae_train or "
                              f"cfg.clip_train, with section= naming it), not a {type(cfg).__name__}; pass the whole "
                              f"run's config as config= to save it in each checkpoint")
        self.section = section
        check_section(cfg, section)
        self.out_flag = out_flag or f"--{section}.out_dir"
        self.cfg, self.config = cfg, _config_dict(cfg, section, config)
        device = pick_device(cfg.device, f"{self.section}.device")
        self.precision = resolve_precision(cfg.precision, device)
        fast_fp32_matmuls(device)
        # The process group (if any) and this rank's device; then the model is wrapped or sharded, and
        # only then is the optimizer built, so under FSDP it holds the sharded parameters.
        self.dist = distributed.setup(cfg.parallel, device, cfg.dist_timeout, self.section)
        self.device, self.module = self.dist.device, model
        self.model = distributed.wrap(model, self.dist, self.precision, cfg.activation_checkpointing,
                                      cfg.powersgd_rank, self.section)
        self.optimizer = configure_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.skipped = 0  # updates skipped: non-finite (nonfinite=skip) or an fp16 overflow
        # EMA of the weights (paper stage 2: decay 0.99), kept in fp32 beside the model and saved in the
        # training state, so a resume continues it exactly. None when train.ema_decay = 0.
        self.ema = ({k: v.detach().float().clone() for k, v in self.module.state_dict().items()
                     if v.is_floating_point()} if cfg.ema_decay > 0 else None)
        progress = progress and self.dist.main  # one bar, on rank 0
        self.train_data, self.loss_fn, self.eval_data, self.progress = train_data, loss_fn, eval_data, progress
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.callbacks: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self.step, self.loss, self.last_eval, self.last_checkpoint = 0, float("nan"), None, None
        self.history: dict[str, list[dict]] = {"train": [], "eval": []}
        self._stop, self._data_offset = False, 0
        self.started_at = 0  # the step the last fit() began at (> 0: it continued a checkpoint)
        # train_seconds: the earlier fits' time (from the checkpoint resumed), this fit's start and length
        self.seconds_before, self._fit_t0, self._fit_seconds = 0.0, None, 0.0
        self._trust_sharded = False
        self.log, self.threads = log, None  # threads: what _pick_threads chose at the start of the last fit
        self.prefetch = self.device.type == "cuda" if prefetch is None else bool(prefetch)
        self._pin = self.device.type == "cuda"  # pinned host memory: the copy to the GPU overlaps compute
        if cfg.eval_every and eval_data is None:
            warnings.warn(f"{self.section}.eval_every={cfg.eval_every} but no eval_data was given; evaluation is skipped",
                          stacklevel=2)

    def add_callback(self, event: str, fn: Callable[["Trainer"], Any]) -> None:
        """Call `fn(trainer)` at `event` (one of EVENTS); read trainer.step, .loss, .history, .last_eval."""
        if event not in EVENTS:
            raise MinidalleError(f"unknown callback event {event!r}; choose one of {', '.join(EVENTS)}")
        self.callbacks[event].append(fn)

    def request_stop(self) -> None:
        """Finish the current update, save a checkpoint and return from fit (e.g. from a callback)."""
        self._stop = True

    def fit(self, resume: bool | str | os.PathLike = False, start_over: bool = False,
            trust_sharded: bool = False) -> dict[str, list[dict]]:
        """Train up to cfg.max_steps and return this call's history {"train": [...], "eval": [...]}.

        resume=False starts fresh (and refuses an out_dir that already holds checkpoints);
        resume=True continues from the newest checkpoint in out_dir that reads back completely
        (newer damaged ones are skipped with a warning each; with no checkpoints at all it starts
        fresh, so one command serves the first start and every restart; when checkpoints exist but
        none can be read it refuses, naming each one and why, and changes nothing);
        resume=<folder> continues from that checkpoint and raises CheckpointError if it is damaged.
        start_over=True moves the folder's checkpoints and metrics.jsonl into `set-aside-<time>/`
        inside out_dir (nothing is deleted) and starts from step 0.
        Resuming with a config that differs from the checkpoint's config.json warns, naming each
        changed key (e.g. `train.max_steps: 100 -> 200`), and then trains with the new values.
        The out_dir is locked for the whole call (checkpoint.RunLock): a second trainer is refused.
        A sharded checkpoint (written under fsdp) is resumed only by an fsdp run, which writes no other
        kind, or with trust_sharded=True: its index is a pickle (checkpoint.sharded_refusal).
        """
        if start_over and resume not in (False, True, None):
            raise ConfigError(f"resume={resume!r} names a checkpoint to continue, start_over=True sets the run "
                              "aside: choose one")
        # Rank 0 alone holds the lock; if it cannot, every process stops (none waits at a collective).
        lock, err = ckpt.RunLock(self.out_dir, self.out_flag), None
        if self.dist.main:
            try:
                lock.acquire()
            except Exception as e:  # noqa: BLE001 -- a refusal, or an OSError: either way every rank stops
                err = e
        if distributed.agree_any(err is not None, self.dist):
            raise err or MinidalleError(f"rank 0 could not lock {self.out_dir}; its message says why")
        self._trust_sharded = trust_sharded
        try:
            return self._fit(resume, start_over)
        finally:
            if self._fit_t0 is not None:  # train_seconds stops with the fit
                self._fit_seconds, self._fit_t0 = time.perf_counter() - self._fit_t0, None
            if self.dist.main:
                lock.release()

    def _fit(self, resume, start_over: bool) -> dict[str, list[dict]]:
        cfg, ctx = self.cfg, self.dist
        seed_everything(cfg.seed + _RANK_SEED * ctx.rank)
        start = self._agreed_resume_point(resume, start_over)
        if ctx.main:  # only now, with the run's checkpoints accounted for, remove what dead savers left
            ckpt.clean_stale_temp(self.ckpt_root)
        self.step, rng = 0, None
        if start is not None:
            # Compare configs before loading the weights: if a changed model size makes the load
            # fail, the warning has already said which setting changed.
            if ctx.main:
                self._warn_if_config_changed(start)
            self._load(start)
            self.step, rng = start.step, self._rank_rng(start)
            self.loss, self.last_checkpoint = float(start.state.get("loss", math.nan)), start.path
            self.skipped = int(start.state.get("skipped", 0))
        self.started_at = self.step
        before = start.state.get("train_seconds", 0.0) if start is not None else 0.0
        self.seconds_before = float(before) if isinstance(before, (int, float)) and math.isfinite(before) else 0.0
        self._fit_t0 = time.perf_counter()
        # fast-forwards an iterable to this rank's next micro-batch
        per_update = cfg.grad_accum * ctx.world  # micro-batches in one global batch
        done = int(start.state.get("micro_batches", start.step * per_update)) if start is not None else 0
        split = _splits_itself(self.train_data)
        self._data_offset = 0 if split else done - self.step * per_update  # nonzero: the global batch changed
        if self._data_offset and ctx.main:
            warnings.warn(f"the global batch changes from {done // max(self.step, 1) * cfg.batch_size} to "
                          f"{per_update * cfg.batch_size} samples ({cfg.grad_accum} micro-batches x {ctx.world} "
                          f"processes x {cfg.batch_size}); the data continues from micro-batch {done}", stacklevel=3)
        stream = _BatchStream(self.train_data, cfg.seed, start=self.step * cfg.grad_accum, rank=ctx.rank,
                              world=ctx.world, split_by_rank=split, offset=self._data_offset, prefetch=self.prefetch,
                              prepare=_pinned if self._pin else None)
        if rng is not None:
            restore_rng_state(rng)  # after the fast-forward, which must not disturb it
        self.history, self._stop = {"train": [], "eval": []}, False
        self.model.train()
        self.threads = self._pick_threads(ctx)
        metrics = _open_metrics(self.out_dir / "metrics.jsonl", keep_upto=self.step) if ctx.main else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            self._fire("on_fit_start")
            while self.step < cfg.max_steps and not self._stop:
                record = self._update(stream, self.step + 1)
                self.step, self.loss = record["step"], record["loss"]
                self.history["train"].append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                self._after_update(record, metrics)
        finally:
            bar.close()
            stream.close()
            if metrics is not None:
                metrics.close()
        self._fire("on_fit_end")
        return self.history

    def _update(self, stream: "_BatchStream", step: int) -> dict:
        """One optimizer update from cfg.grad_accum micro-batches; returns its metrics record.
        `step` is the number it will complete."""
        t0, cfg, accum = time.perf_counter(), self.cfg, self.cfg.grad_accum
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:  # the schedule is a pure function: no scheduler state
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)  # None, not 0: saves memory, and skips unused params
        losses, sums = [], {}
        for m in range(accum):
            batch = _to_device(stream.next(), self.device, non_blocking=self._pin)
            with self._grad_sync(m == accum - 1):  # gradients cross processes once per update, not per micro-batch
                with self.autocast():
                    out = self.loss_fn(self.model, batch)
                loss, extras = _unpack_loss(out, f"step {step}", self.section, need_grad=True)
                # Backward even when the loss is not finite: under ddp every process must join the
                # gradient all-reduce, and the agreement below throws the result away.
                loss = loss / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(loss.detach())
            for k, v in extras.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        names = sorted(sums)
        if self.scaler is not None:  # fp16: the loss is read before unscaling (one more host sync per update)
            value = self._read([sum(losses)])[0]
            if not math.isfinite(value):
                return self._nonfinite(step, lr, value, t0, f"loss is {value} (not finite)", "loss_fn")
            self.scaler.unscale_(self.optimizer)  # true gradients, so clipping and the logged norm mean what they say
        # clip_grad_norm_ returns the norm *before* clipping, the number worth logging: a spike there
        # warns of divergence before the loss shows it. With clipping off we pass inf, which only measures.
        # The norm is global (ddp: gradients already averaged; fsdp: a collective), so every process agrees.
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # The one host sync of an update: the loss, the norm and the extras read together (on a GPU each
        # read waits for every queued kernel; eight separate reads left the GPU idle between them). The
        # whole global batch's numbers, the same on every process: a NaN anywhere is a NaN everywhere,
        # so every process takes the decisions below together.
        value, grad_norm, *rest = self._read([sum(losses), norm, *[sums[k] for k in names]])
        sums = dict(zip(names, rest))
        if not math.isfinite(value):
            return self._nonfinite(step, lr, value, t0, f"loss is {value} (not finite)", "loss_fn")
        if not math.isfinite(grad_norm):
            if self.scaler is not None:  # an fp16 overflow: the scaler skips the step and halves its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.skipped += 1
                return self._record(step, lr, value, grad_norm, sums, t0)
            return self._nonfinite(step, lr, value, t0, f"gradient norm is {grad_norm} (loss {value:.4g})",
                                   "a log(0) / division by 0 in loss_fn")
        self._fire("on_before_optimizer_step")  # grads are final here: clipped, not yet applied
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self._update_ema()
        return self._record(step, lr, value, grad_norm, sums, t0)

    def _read(self, values: list) -> list[float]:
        """Numbers (0-d tensors or floats) as floats in one host sync, each the mean over the processes."""
        tensors = [_local(v).detach().double().reshape(()) if torch.is_tensor(v)
                   else torch.tensor(float(v), dtype=torch.float64) for v in values]
        return distributed.mean_all(torch.stack([t.to(self.device) for t in tensors]), self.dist).tolist()

    def _record(self, step: int, lr: float, value: float, grad_norm: float, extras: dict, t0: float) -> dict:
        rec = {"step": step, "split": "train", "loss": value, "lr": lr, "grad_norm": grad_norm, **extras}
        if self.skipped:
            rec["skipped"] = self.skipped
        if self.scaler is not None:
            rec["loss_scale"] = self.scaler.get_scale()
        return {**rec, "step_ms": round(1000 * (time.perf_counter() - t0), 3)}

    def _nonfinite(self, step: int, lr: float, value: float, t0: float, what: str, where: str) -> dict:
        """A non-finite loss or gradient, agreed by every process: stop (default) or skip and count."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.nonfinite == "stop":
            raise MinidalleError(f"step {step}: {what}; the weights were not updated. Lower {self.section}.lr, check "
                                 f"the batch for NaNs or look for {where}; or pass --{self.section}.nonfinite=skip "
                                 "to skip such updates and count them")
        self.skipped += 1
        return self._record(step, lr, value, math.nan, {}, t0)

    def _grad_sync(self, last: bool):
        """ddp / fsdp: all-reduce gradients only on an update's last micro-batch (the others accumulate)."""
        if self.dist.parallel == "ddp" and not last:
            return self.model.no_sync()
        if self.dist.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def autocast(self):
        """bf16 (or fp16) autocast when train.precision resolves to it (bf16: CUDA by default), else a no-op."""
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision in ("bf16", "fp16"))

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = d * ema + (1 - d) * weights, for every tensor in one foreach call (lerp towards the weights)."""
        state = self.module.state_dict()
        names = [k for k in self.ema if k in state]
        values = [state[k].detach() for k in names]
        torch._foreach_lerp_([self.ema[k] for k in names], [v if v.dtype == torch.float32 else v.float()
                                                             for v in values], 1 - self.cfg.ema_decay)

    def _after_update(self, record: dict, metrics) -> None:
        """Logging, evaluation and checkpointing, each on its own schedule."""
        cfg, step = self.cfg, self.step
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            _write_line(metrics, record)
        self._fire("on_step_end")
        if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_data is not None:
            self.history["eval"].append(self.evaluate())
            _write_line(metrics, self.last_eval)
            self._fire("on_eval")
        self._stop = distributed.agree_any(self._stop, self.dist)  # one process's stop is everyone's
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last or self._stop:
            self.save_checkpoint()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean of loss_fn (and its extras) over the first cfg.eval_batches eval batches, in eval mode.

        Example: trainer.evaluate() -> {"step": 250, "split": "eval", "loss": 1.93}
        """
        if self.eval_data is None:
            raise MinidalleError("evaluate() needs eval data: pass eval_data=... to Trainer")
        was_training, sums, n = self.model.training, {}, 0
        self.model.eval()  # dropout off: eval loss measures the model, not the noise
        try:
            with rng_isolated(self.cfg.seed):  # same batches every eval, and training RNG untouched
                batches = (self.eval_data(i) for i in range(self.cfg.eval_batches)) if callable(self.eval_data) \
                    else itertools.islice(self.eval_data, self.cfg.eval_batches)
                for batch in batches:
                    with self.autocast():
                        out = self.loss_fn(self.model, _to_device(batch, self.device))
                    loss, extras = _unpack_loss(out, f"eval at step {self.step}", self.section, need_grad=False)
                    names = sorted(extras)
                    value, *rest = self._read([loss, *[extras[k] for k in names]])  # one sync per eval batch
                    if not math.isfinite(value):
                        raise MinidalleError(f"eval at step {self.step}: loss is {value} (not finite); nothing was "
                                             f"updated. Lower {self.section}.lr, check the batch for NaNs, or look "
                                             "for log(0) in loss_fn")
                    for k, v in {"loss": value, **dict(zip(names, rest))}.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
        finally:
            self.model.train(was_training)
        if n == 0:
            raise DataError(f"eval_data yielded no batches; give it at least one ({self.section}.eval_batches of them)")
        self.last_eval = {"step": self.step, "split": "eval", **{k: v / n for k, v in sums.items()}}
        return self.last_eval

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_{step:07d}/ (model, config, optimizer + RNG state, manifest) atomically.

        Every process calls this together. ddp: rank 0 writes the usual folder (the copies are equal);
        fsdp: each process writes its slices into one sharded folder (checkpoint.save_sharded).
        """
        rngs = distributed.gather(capture_rng_state(), self.dist)
        state = {"step": self.step, "rng": rngs[0], "rng_ranks": rngs, "world": self.dist.world,
                 "micro_batches": self._data_offset + self.step * self.cfg.grad_accum * self.dist.world,
                 "loss": self.loss, "skipped": self.skipped,  # loss: so a finished run, resumed, says where it ended
                 "train_seconds": self.train_seconds}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.dist.parallel == "fsdp":
            self.last_checkpoint = ckpt.save_sharded(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                                     self.config, self.dist, self.cfg.keep_last, ema=self.ema)
        else:
            err = None
            if self.dist.main:
                state["optimizer"] = self.optimizer.state_dict()
                if self.ema is not None:
                    state["ema"] = {k: v.cpu() for k, v in self.ema.items()}
                try:
                    ckpt.save_checkpoint(self.ckpt_root, self.step, self.module, state, self.config, self.cfg.keep_last)
                except Exception as e:  # noqa: BLE001 -- a full disk on rank 0 stops every rank, none waits
                    err = e
            if distributed.agree_any(err is not None, self.dist):  # nobody runs ahead of a save that failed
                raise err or MinidalleError(f"rank 0 could not save step {self.step}; its message says why")
            self.last_checkpoint = self.ckpt_root / ckpt.step_dir_name(self.step)
        self._fire("on_checkpoint")
        return self.last_checkpoint

    def _pick_threads(self, ctx) -> dict | None:
        """On a CPU, set torch's thread count for this fit and say so: cfg.threads when set, else what
        infra.machine.choose_threads measures now (one thread when others load the machine). Left alone
        on a GPU, under the smoke switch (seconds of work), and where OMP_NUM_THREADS says (torchrun sets it)."""
        if self.device.type != "cpu":
            return None
        if self.cfg.threads > 0:
            n = self.cfg.threads
            torch.set_num_threads(n)
            info = {"threads": n, "line": f"{n} CPU thread{'s' if n > 1 else ''} ({self.section}.threads)"}
        elif smoke_mode() or os.environ.get("OMP_NUM_THREADS"):
            return None
        else:
            from .infra.machine import choose_threads

            info = choose_threads()
        if ctx.main:
            self.log(f"[{self.section}] {info['line']}")
        return info


    @property
    def train_seconds(self) -> float:
        """Seconds spent in fit() on this run so far, the earlier fits it resumed from included (their
        checkpoint records them), so an interrupted run still reports its whole training time."""
        running = time.perf_counter() - self._fit_t0 if self._fit_t0 is not None else self._fit_seconds
        return self.seconds_before + running

    def _fire(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP norm arrives as a replicated DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _unpack_loss(out, where: str, section: str, need_grad: bool) -> tuple[torch.Tensor, dict]:
    """Check what loss_fn returned; give (loss tensor, extras) or a clear error. Reads no number from
    the device: the extras stay 0-d tensors (or floats), read with the loss in the update's one sync.

    Example: (tensor(0.5, grad_fn=...), {"acc": tensor(0.9)}) -> (tensor(0.5, ...), {"acc": tensor(0.9)})
    """
    loss, extras = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not isinstance(loss, torch.Tensor):
        raise MinidalleError(f"{where}: loss_fn returned {type(loss).__name__}; return a scalar tensor, "
                             "or (loss, {name: number})")
    if loss.ndim != 0:
        raise MinidalleError(f"{where}: loss_fn returned a tensor of shape {tuple(loss.shape)}; the loss must be "
                             "a scalar (0-d) tensor -- reduce it, e.g. with .mean()")
    if need_grad and not loss.requires_grad:
        raise MinidalleError(f"{where}: the loss does not require grad; was it computed under torch.no_grad() "
                             "or detached?")
    if not isinstance(extras, dict) or _RESERVED & set(extras) or not all(
            isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1) for v in extras.values()):
        raise MinidalleError(f"{where}: loss_fn's extras must be a dict of name -> number (a float or a 0-d tensor) "
                             f"whose names avoid {sorted(_RESERVED)}; got {extras!r}")
    return loss, {str(k): (v.detach() if torch.is_tensor(v) else float(v)) for k, v in extras.items()}


def _to_device(batch, device: torch.device, non_blocking: bool = False):
    """Move every tensor inside a batch (tensor, tuple, list or dict, nested) to `device`. non_blocking:
    the copy from pinned host memory overlaps the GPU's work (the host does not wait for it)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _pinned(batch):
    """The batch's CPU tensors in pinned (page-locked) memory, which a GPU copies from asynchronously."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pinned(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    return batch
