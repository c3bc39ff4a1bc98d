"""`python -m minidalle check-gpu`: what this project does on a GPU, measured in one command of under 8 minutes.

    python -m minidalle check-gpu                              # runs/check-gpu/report.md and report.json
    python -m minidalle check-gpu --budget-s 300 --out DIR     # a shorter budget, another folder
    python -m minidalle check-gpu --dry-run --out DIR          # every phase on the CPU at smoke sizes (CI)

Everything else in the project was measured on CPUs; these are the figures a GPU changes, and the
properties (exact resume, one host sync per update) that only a GPU can break. The phases, in the
order they run:

- versions: python, torch, CUDA and cuDNN, the device, its compute capability and memory, and
  whether FlexAttention imports: what every other figure depends on.
- train_step: one transformer update (forward, backward, AdamW) under bf16 autocast at the paper's
  sequence (256 text tokens, a 32x32 image grid), with FlexAttention against SDPA + boolean mask:
  ms per update, tokens/s, and MFU = model.flops_per_token x tokens/s / the card's dense bf16 peak
  (PEAK_BF16; null for a card not in it). The model is small (FULL.model: 4 layers of width 512), so
  an update takes milliseconds and the phase's time goes to compiling FlexAttention.
- resume: the toy transformer trained N updates straight, and k updates, stopped, then resumed to
  N in a fresh Trainer: whether every loss (and the final weights) match bit for bit on this device,
  and the first update that differs. On a CPU the tests check it; atomics and compiled kernels are
  what could break it on a GPU.
- sampler: `sampling.sample` images per second at B = 1, 8, 64 on the (untrained: speed does not
  depend on training) toy model, eager and compiled (the static decode step, a CUDA graph under
  mode="reduce-overhead"); for the compiled runs torch._dynamo's counters, reset before each
  batch size: cudagraph_skips (a skipped graph runs ~40 launches a step), unique graphs, frames,
  graph breaks, and the frames compiled while timing (a recompile there is a bug).
- attention: FlexAttention against SDPA + boolean mask at 256 + 32x32 tokens, forward only
  (bench/attention.py's own `_gpu_ratios`, judged against its targets) and forward + backward
  (the training cost), per mask kind.
- host_syncs: `infra.syncs.count_host_syncs` around a few Trainer updates after a warm-up: syncs
  per update by kind and by place (the loop is written to need one).
- demo: `python -m minidalle demo --preset toy --device cuda`: its wall minutes and its quality
  figures per split, read from the report.json it writes. It runs last, so it gets the time the
  others left.

Each phase runs in its own process, `python -m minidalle.bench.gpu_check --phase NAME`, with its own
time limit: its share (SHARES) of the budget left when it starts, so time a phase leaves unused goes
to the later ones. A phase writes its figures to a result file as it measures them; one that
crashes is recorded as "failed" with its error in one line (a measurement inside it that raises
costs only itself: the phase goes on, and is "failed" at the end with the rest of its figures),
one over its limit is killed (with every process it started) and recorded as "timed out" with what
it had measured, and the next phase runs either way. report.json and report.md are rewritten after
every phase, and each phase's output is kept as phase-NAME.log beside them.

The folder (`--out`, default runs/check-gpu) is a files.OwnedFolder: new, empty, or one check-gpu
wrote, and refused before anything is written otherwise. The phases' scratch work (the demo's run,
the resume checkpoints) lives in its hidden staging folder and is removed at the end; the demo's
samples.png and report.md are kept as demo-samples.png and demo-report.md.

`--dry-run` runs the same phases on the CPU at smoke sizes (DRY: tiny models, B = 1 and 2 with one
compile, at B = 1, the demo with --preset smoke), in under a minute, so CI runs every code path;
MFU is null there (no known peak for a CPU) and the report says it is a dry run. On the CPU
FlexAttention has no backward, so train_step and the forward + backward comparison use SDPA for
both sides and say why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import TransformerConfig
from ..errors import ConfigError, MinidalleError
from ..infra.files import OwnedFolder, check_out_folder, strict_json, write_atomic
from ..infra.machine import utc_now
from ..model import Layout
from .suite import fmt_value, one_line

DEFAULT_OUT = "runs/check-gpu"
DEFAULT_BUDGET_S = 480.0

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, by a pattern of the
# device name (first match wins). A card not here gets MFU null, never a guessed peak.
PEAK_BF16 = (
    (r"H100.*PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200", 989e12),  # H200 and GH200
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
)


def peak_bf16(device_name: str | None) -> tuple[float | None, str | None]:
    """The dense bf16 peak of a device, and the pattern of PEAK_BF16 that matched it.

    Example: peak_bf16("NVIDIA H100 PCIe") -> (7.56e14, "H100.*PCIe"); peak_bf16("cpu") -> (None, None)
    """
    for pattern, peak in PEAK_BF16:
        if device_name and re.search(pattern, device_name, re.IGNORECASE):
            return peak, pattern
    return None, None


@dataclass(frozen=True)
class Sizes:
    """What every phase runs at: FULL on a GPU, DRY (--dry-run) on the CPU in seconds."""

    device: str  # where every phase runs
    preset: str  # the demo's --preset; its transformer is the resume, host_syncs and sampler model
    model: TransformerConfig  # train_step's model
    layout: Layout  # train_step's and attention's sequence
    batch: int  # train_step's sequences per update
    warmup: int  # train_step's untimed updates (the compiles happen here)
    timed: int  # train_step's timed updates
    resume_steps: tuple[int, int]  # resume: (N, k): N updates straight against k, stop, resume to N
    sync_steps: tuple[int, int]  # host_syncs: (warm-up updates, counted updates)
    sampler_batches: tuple[int, ...]  # images sampled per call
    compiled_batches: tuple[int, ...]  # those also timed compiled (on the CPU a compile takes 5-20 s)
    sampler_repeats: int  # timed calls per measurement (after one warm-up call)
    heads: int  # attention's heads (of 64)
    repeats: int  # attention's interleaved repeats (bench/tools.py)


# FULL's train_step model: d_model 512 and the paper's kernel, over the paper's sequence and vocabularies.
FULL = Sizes(device="cuda", preset="toy",
             model=TransformerConfig(n_layer=4, n_head=8, head_dim=64, conv_kernel=11),
             layout=Layout(text_len=256, text_vocab=16384, grid=32, image_vocab=8192),
             batch=8, warmup=3, timed=10, resume_steps=(12, 5), sync_steps=(2, 10), sampler_batches=(1, 8, 64),
             compiled_batches=(1, 8, 64), sampler_repeats=3, heads=16, repeats=7)
DRY = Sizes(device="cpu", preset="smoke",
            model=TransformerConfig(n_layer=3, n_head=2, head_dim=16, conv_kernel=3),  # row, column, conv
            layout=Layout(text_len=16, text_vocab=64, grid=4, image_vocab=64),
            batch=2, warmup=1, timed=2, resume_steps=(6, 3), sync_steps=(1, 3), sampler_batches=(1, 2),
            compiled_batches=(1,), sampler_repeats=1, heads=2, repeats=3)


def random_batch(layout: Layout, B: int, seed: int):
    """Valid random (text ids (B, T), image codes (B, N)) on the CPU, the same for a seed.

    Example: random_batch(DRY.layout, 2, 0) -> (long (2, 16), long (2, 16))
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, layout.text_classes, (B, layout.text_len), generator=g)  # (B, T)
    image = torch.randint(0, layout.image_vocab, (B, layout.image_len), generator=g)  # (B, N)
    return text, image


class Figures(dict):
    """One phase's figures. `save()` writes them to the phase's result file as they are measured (status
    "running"), so a phase killed at its limit still leaves them; the last save gives the final status."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def save(self, status: str = "running", **extra) -> None:
        write_atomic(self.path, json.dumps(strict_json({**self, **extra, "status": status}), default=str) + "\n")


def attempt(res: Figures, into: dict, key: str, measure, *args):
    """into[key] = measure(*args), then save the figures. When it raises, into[key] is its error in one line
    (and res["errors"] lists it) and the phase goes on to its next measurement; it is recorded as failed
    at the end, with everything it did measure. Returns the figures, or None after an error.

    Example: attempt(res, res, "sdpa", _time_updates, "sdpa", sizes, device, None) -> {"ms_per_step": 2.8, ...}
    """
    try:
        into[key] = measure(*args)
    except Exception as e:  # noqa: BLE001 -- recorded; the traceback goes to the phase's log
        traceback.print_exc()
        into[key] = {"error": one_line(e)}
        res.setdefault("errors", []).append(f"{key}: {one_line(e)}")
    res.save()
    return None if isinstance(into[key], dict) and "error" in into[key] else into[key]


def _sync(device) -> None:
    """Wait for the GPU (no-op on the CPU): every timing is taken between two of these."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- the phases (each runs in its own process) ---------------------------------------------------------
def phase_versions(sizes: Sizes, work: Path, res: Figures) -> None:
    """The software and the device every other figure depends on."""
    import platform

    import torch

    from ..attention import flex_available
    from ..infra.machine import machine

    ok, why = flex_available()
    res.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               flex_attention=ok, flex_attention_note=why, machine=machine())
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        res.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    else:
        res.update(device="cpu", compute_capability=None, gpu_memory_gib=None, gpus=0)
    peak, pattern = peak_bf16(res["device"])
    res.update(peak_bf16_flops=peak, peak_matched=pattern)


def _train_update(model, opt, batch, device) -> "torch.Tensor":
    """One update of train_step: forward and loss under bf16 autocast, backward, AdamW. Returns the loss."""
    import torch

    from ..model import dalle_loss

    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = dalle_loss(model, batch)
    loss.backward()
    opt.step()
    return loss.detach()


def _time_updates(impl: str, sizes: Sizes, device, peak: float | None) -> dict:
    """train_step for one attention impl: a fresh model, warm-up updates, then timed ones."""
    import torch

    from ..config import TrainConfig
    from ..model import DALLE, flops_per_token
    from ..train import configure_optimizer

    torch.manual_seed(0)
    model = DALLE(replace(sizes.model, attn_impl=impl), sizes.layout).to(device).train()
    opt = configure_optimizer(model, TrainConfig(lr=1e-4))
    batch = [t.to(device) for t in random_batch(sizes.layout, sizes.batch, 0)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(sizes.warmup):
        _train_update(model, opt, batch, device)
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(sizes.timed):
        loss = _train_update(model, opt, batch, device)
    _sync(device)
    seconds = (time.perf_counter() - t0) / sizes.timed
    tokens_per_s = sizes.batch * sizes.layout.length / seconds
    flops = flops_per_token(sizes.model, sizes.layout)["total"]
    return {"attn_used": model.attn_impl, "attn_reason": model.attn_reason, "ms_per_step": round(1e3 * seconds, 3),
            "tokens_per_s": round(tokens_per_s), "mfu": None if peak is None else round(flops * tokens_per_s / peak, 4),
            "warmup_s": round(warm_s, 2), "last_loss": float(loss),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def phase_train_step(sizes: Sizes, work: Path, res: Figures) -> None:
    """Update throughput and MFU under bf16 autocast, FlexAttention against SDPA + boolean mask."""
    import torch

    from ..infra.devices import pick_device
    from ..model import flops_per_token

    device = pick_device(sizes.device, "check-gpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, _ = peak_bf16(name)
    cfg, lay = sizes.model, sizes.layout
    fpt = flops_per_token(cfg, lay)
    res.update(device=name, peak_bf16_flops=peak, precision="bf16 autocast", batch=sizes.batch,
               tokens_per_step=sizes.batch * lay.length, warmup_steps=sizes.warmup, timed_steps=sizes.timed,
               model={"n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
                      "d_model": cfg.n_head * cfg.head_dim, "conv_kernel": cfg.conv_kernel, "text_len": lay.text_len,
                      "grid": lay.grid, "text_vocab": lay.text_vocab, "image_vocab": lay.image_vocab,
                      "sequence": lay.length},
               flops_per_token={k: (round(v, 4) if k == "mask_density" else float(v)) for k, v in fpt.items()})
    done = {}
    for impl in ("flex", "sdpa"):
        done[impl] = attempt(res, res, impl, _time_updates, impl, sizes, device, peak)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if done["flex"] and done["sdpa"]:
        res["flex_speedup"] = round(done["sdpa"]["ms_per_step"] / done["flex"]["ms_per_step"], 3)


def _small_trainer(sizes: Sizes, out: Path, steps: int, seed: int = 0):
    """A Trainer of the preset's transformer (dropout on, so every update draws random numbers) on random
    batches, writing into `out`."""
    import torch

    from ..config import TrainConfig, get_config
    from ..model import DALLE, Layout, dalle_loss
    from ..train import Trainer

    cfg = get_config(sizes.preset)
    layout = Layout.from_config(cfg)
    torch.manual_seed(seed)
    model = DALLE(replace(cfg.model, dropout=0.1, caption_dropout=0.1), layout)
    train = TrainConfig(max_steps=steps, warmup_steps=2, eval_every=0, ckpt_every=0, log_every=1, device=sizes.device,
                        threads=1 if sizes.device == "cpu" else 0, out_dir=str(out))
    return Trainer(model, train, lambda i: random_batch(layout, 8, i), dalle_loss, progress=False,
                   log=lambda line: print(line, flush=True))


def phase_resume(sizes: Sizes, work: Path, res: Figures) -> None:
    """N updates straight against k, a stop, and a resume to N in a fresh Trainer: the same losses, bit for bit?"""
    import torch

    n, k = sizes.resume_steps
    straight = _small_trainer(sizes, work / "resume-straight", n)
    straight.fit()
    first = _small_trainer(sizes, work / "resume-split", n)
    first.add_callback("on_step_end", lambda t: t.step == k and t.request_stop())
    first.fit()
    second = _small_trainer(sizes, work / "resume-split", n, seed=99)  # other initial weights: the checkpoint's win
    second.fit(resume=True)
    a = [r["loss"] for r in straight.history["train"]]
    b = [r["loss"] for r in first.history["train"] + second.history["train"]]
    steps = [r["step"] for r in first.history["train"] + second.history["train"]]
    differ = [s for s, x, y in zip(steps, a, b) if x != y]
    weights = straight.module.state_dict(), second.module.state_dict()
    res.update(device=str(straight.device), precision=straight.precision, attn_used=straight.module.attn_impl,
               steps=n, stopped_at=k, resumed_from=second.started_at, losses_straight=a, losses_resumed=b,
               bit_exact=a == b and len(a) == n, first_differing_step=differ[0] if differ else None,
               max_abs_loss_difference=max(abs(x - y) for x, y in zip(a, b)),
               weights_bit_exact=all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0]))


def phase_host_syncs(sizes: Sizes, work: Path, res: Figures) -> None:
    """Host syncs per Trainer update (after warm-up updates), by kind and by place."""
    from contextlib import ExitStack

    from ..infra.syncs import count_host_syncs

    warm, counted = sizes.sync_steps
    trainer = _small_trainer(sizes, work / "host-syncs", warm + counted + 1)
    stack, found = ExitStack(), {}

    def window(t) -> None:  # on_step_end: count from the end of update `warm` to the end of update warm + counted
        if t.step == warm:
            found["syncs"] = stack.enter_context(count_host_syncs())
        elif t.step == warm + counted:
            stack.close()

    trainer.add_callback("on_step_end", window)
    try:
        trainer.fit()
    finally:
        stack.close()
    syncs = found["syncs"]
    res.update(device=str(trainer.device), precision=trainer.precision, attn_used=trainer.module.attn_impl,
               updates=counted, total=syncs.total, per_update=round(syncs.total / counted, 3),
               by_kind_per_update={kind: round(n / counted, 3) for kind, n in syncs.by_kind.most_common()},
               by_place={place: n for place, n in syncs.by_place.most_common()})


def _timed_calls(run, device, repeats: int) -> tuple[float, float | None]:
    """Seconds of a first call of `run()` (allocations, a compile) and the median of `repeats` calls after it.

    Example: _timed_calls(lambda: sample(model, text), cuda, 3) -> (4.1, 0.052)
    """
    times = []
    for _ in range(1 + repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], (statistics.median(times[1:]) if repeats else None)


def _images_per_s(run, B: int, repeats: int, device) -> dict:
    """Images per second of `run()` (B images a call): one warm-up call, then the median of `repeats` timed ones."""
    first, seconds = _timed_calls(run, device, repeats)
    return {"images_per_s": round(B / seconds, 2), "seconds_per_call": round(seconds, 4),
            "first_call_s": round(first, 2)}


def _dynamo_counters() -> dict:
    """The torch._dynamo counters check-gpu reports (counted since the last counters.clear())."""
    from torch._dynamo.utils import counters

    return {"cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "unique_graphs": counters["stats"]["unique_graphs"],
            "frames_total": counters["frames"]["total"], "frames_ok": counters["frames"]["ok"],
            "graph_breaks": sum(counters["graph_break"].values())}


def _compiled_rate(model, text, sizes: Sizes, device) -> dict:
    """sample(compile=True) at one batch size, compiled from scratch (dynamo reset, counters cleared)."""
    import torch
    from torch._dynamo.utils import counters

    from ..sampling import release_caches, sample

    torch._dynamo.reset()
    counters.clear()
    release_caches(model)  # the caches and the compiled step: this batch size compiles from scratch

    def run():
        return sample(model, text, 1.0, compile=True)

    first, _ = _timed_calls(run, device, 0)  # the compile, and one call
    compiled = _dynamo_counters()
    # timed after one more untimed call; a frame compiled from here on is a recompile (a guard that failed)
    _, seconds = _timed_calls(run, device, sizes.sampler_repeats)
    after = _dynamo_counters()
    release_caches(model)
    return {"images_per_s": round(text.shape[0] / seconds, 2), "seconds_per_call": round(seconds, 4),
            "first_call_s": round(first, 2), **after,
            "frames_while_timed": after["frames_total"] - compiled["frames_total"]}


def phase_sampler(sizes: Sizes, work: Path, res: Figures) -> None:
    """Cached sampling, images per second at each batch size, eager and compiled, with dynamo's counters."""
    import warnings

    import torch

    from ..config import get_config
    from ..infra.devices import pick_device, resolve_precision
    from ..model import DALLE
    from ..sampling import sample

    warnings.filterwarnings("ignore", message="sample\\(compile=True\\) on the CPU")  # measured on purpose
    device = pick_device(sizes.device, "check-gpu")
    torch.manual_seed(0)
    model = DALLE.from_config(get_config(sizes.preset)).to(device).eval()
    lay = model.layout
    res.update(model=f"{sizes.preset} transformer (untrained)", params=sum(p.numel() for p in model.parameters()),
               codes_per_image=lay.image_len, precision=resolve_precision("auto", device),
               compile_mode="reduce-overhead (CUDA graphs)" if device.type == "cuda" else "default (inductor, CPU)",
               repeats=sizes.sampler_repeats, batches={})
    for B in sizes.sampler_batches:
        text = torch.randint(0, lay.text_vocab, (B, lay.text_len), generator=torch.Generator().manual_seed(B))  # (B, T)
        entry = res["batches"][str(B)] = {}
        eager = attempt(res, entry, "eager", _images_per_s, lambda: sample(model, text, 1.0), B, sizes.sampler_repeats,
                        device)
        if B not in sizes.compiled_batches:
            entry["compiled"] = {"skipped": "not compiled at this B in the dry run (one compile keeps it short)"}
            continue
        compiled = attempt(res, entry, "compiled", _compiled_rate, model, text, sizes, device)
        if eager and compiled:
            entry["compiled_speedup"] = round(compiled["images_per_s"] / eager["images_per_s"], 3)
            res.save()


def _fwd_bwd(T: int, G: int, heads: int, device, dtype, repeats: int, compile_flex: bool) -> dict:
    """Forward + backward of FlexAttention against SDPA + boolean mask, row and transposed column, on the
    random q, k, v of bench/attention.py. Where flex cannot train (no CPU backward) only SDPA is timed."""
    import torch

    from ..attention import MaskBank, attend, choose_impl
    from .attention import _kernel, _qkv
    from .tools import MAX_CALLS, MIN_SAMPLE_S, calls_for, interleaved, per_call, rounded

    L = T + G * G
    bank = MaskBank(T, G, _kernel(G), compile_flex=compile_flex)
    q, k, v = _qkv(heads, L, device, dtype, grad=True)
    chosen, why = choose_impl("flex", device, training=True, seq_len=L)  # what a model training here would run
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    out: dict = {"flex_trains": chosen == "flex", "flex_note": why}
    for kind, name in (("row", "row"), ("column", "colT")):
        def step(impl, kind=kind):
            def run():
                for t in (q, k, v):
                    t.grad = None
                attend(q, k, v, kind, bank, impl).float().sum().backward()
            return run

        if chosen != "flex":
            calls = calls_for(per_call(step("sdpa"), 1, sync), MIN_SAMPLE_S, MAX_CALLS)  # a first call sizes it
            out[name] = {"sdpa_mask_ms": rounded(1e3 * per_call(step("sdpa"), calls, sync))}
            continue
        t0 = time.perf_counter()
        step("flex")()  # the compile of forward and backward
        if sync:
            sync()
        compile_s = time.perf_counter() - t0
        if bank.flex_failed:
            return {**out, "flex_trains": False, "flex_note": f"unavailable: {bank.flex_failed}"}
        grad_flex = q.grad.float().clone()
        step("sdpa")()
        diff = float((grad_flex - q.grad.float()).abs().max())
        m = interleaved(step("sdpa"), step("flex"), repeats, sync=sync)  # SDPA time / flex time: a speedup
        out[f"fwd_bwd_flex_{name}_speedup_{G}"] = rounded(m["ratio"])
        out[name] = {"sdpa_mask_ms": rounded(1e3 * m["a_s"]), "flex_ms": rounded(1e3 * m["b_s"]),
                     "ratio_range": [rounded(m["lo"]), rounded(m["hi"])], "first_flex_call_s": round(compile_s, 2),
                     "grad_q_max_abs_diff": rounded(diff)}
    return out


def phase_attention(sizes: Sizes, work: Path, res: Figures) -> None:
    """FlexAttention against SDPA + boolean mask at the train_step sequence: forward, then forward + backward."""
    import torch
    from tqdm.auto import tqdm

    from ..attention import flex_available
    from .attention import TARGETS, _flex_ratios, _gpu_ratios
    from .tools import judge_targets

    T, G = sizes.layout.text_len, sizes.layout.grid
    device = torch.device(sizes.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res.update(text_len=T, grid=G, length=T + G * G, heads=sizes.heads, head_dim=64, dtype=str(dtype).split(".")[-1],
               repeats=sizes.repeats, ratio_method="median of per-repeat ratios, A and B back to back (bench/tools.py)")
    ok, why = flex_available()
    if not ok:
        raise MinidalleError(why)
    with tqdm(disable=True) as bar:  # the bench's functions report progress to a bar: none here
        if device.type == "cuda":  # bench attention's GPU comparison, as it is (forward, no grad)
            fwd = attempt(res, res, "forward", _gpu_ratios, T, G, sizes.repeats, True, bar)
        else:  # its CPU comparison: flex against dense causal and against SDPA + mask
            fwd = attempt(res, res, "forward", _flex_ratios, T, G, sizes.heads, sizes.repeats, True, bar)
    if fwd:
        res["forward_targets"] = {k: t for k, t in judge_targets(fwd, TARGETS).items() if t["value"] is not None}
    attempt(res, res, "forward_backward", _fwd_bwd, T, G, sizes.heads, device, dtype, sizes.repeats, True)


def phase_demo(sizes: Sizes, work: Path, res: Figures) -> None:
    """The toy demo on the device: its wall minutes, and its quality figures per split from its report.json."""
    out = work / "demo"
    cmd = [sys.executable, "-m", "minidalle", "demo", "--preset", sizes.preset, "--device", sizes.device,
           "--out", str(out), "--json"]
    res["command"] = " ".join(["python"] + cmd[1:-1])
    res.save()
    t0 = time.perf_counter()
    done = subprocess.run(cmd)  # its output (errors, the JSON line) goes to this phase's log
    res["wall_minutes"] = round((time.perf_counter() - t0) / 60, 2)
    if done.returncode != 0:
        raise MinidalleError(f"`{res['command']}` exited with status {done.returncode} (its error is in the log)")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    res.update(demo_figures(report), files={"demo-samples.png": str(out / "samples.png"),
                                            "demo-report.md": str(out / "report.md")})


def demo_figures(report: dict) -> dict:
    """The figures check-gpu quotes from a demo's report.json, split as the report splits them: per split
    (val, heldout) every number whose key starts with the split's name, the minutes, each stage's seconds.

    Example: demo_figures({"val_all_single": 0.6, "heldout_all_single": 0.4, "minutes": 2.1, ...})
             -> {"splits": {"val": {"all_single": 0.6}, "heldout": {"all_single": 0.4}}, "minutes": 2.1, ...}
    """
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    splits = {split: {key[len(split) + 1:]: value for key, value in report.items()
                      if key.startswith(f"{split}_") and number(value)} for split in ("val", "heldout")}
    return {"splits": splits, "n_prompts": report.get("n_prompts"), "candidates": report.get("candidates"),
            "minutes": report.get("minutes"), "this_run_minutes": report.get("this_run_minutes"),
            "sampling_seconds": report.get("sampling_seconds"), "device": report.get("device"),
            "machine_gflops": report.get("machine_gflops"),
            "stage_seconds": {name: s.get("seconds") for name, s in report.get("stages", {}).items()}}


# Run order, and each phase's share of the budget left when it starts. The demo runs last: it is the
# longest and least predictable, and gets whatever the others left.
PHASES = {"versions": phase_versions, "train_step": phase_train_step, "resume": phase_resume,
          "sampler": phase_sampler, "attention": phase_attention, "host_syncs": phase_host_syncs, "demo": phase_demo}
SHARES = {"versions": 0.03, "train_step": 0.15, "resume": 0.10, "sampler": 0.20, "attention": 0.12,
          "host_syncs": 0.06, "demo": 0.34}


def _child(argv: list[str]) -> int:
    """`python -m minidalle.bench.gpu_check --phase NAME ...`: run one phase, write its result file."""
    p = argparse.ArgumentParser(prog="python -m minidalle.bench.gpu_check",
                                description="one phase of `python -m minidalle check-gpu` (which runs these)")
    p.add_argument("--phase", choices=list(PHASES), required=True)
    p.add_argument("--result", required=True, help="the JSON file the phase's figures are written to")
    p.add_argument("--work", required=True, help="a folder for the phase's scratch files")
    p.add_argument("--dry-run", action="store_true", dest="dry_run")
    args = p.parse_args(argv)
    res = Figures(Path(args.result))
    try:
        PHASES[args.phase](DRY if args.dry_run else FULL, Path(args.work), res)
    except Exception as e:  # noqa: BLE001 -- recorded in one line; the traceback goes to the phase's log
        traceback.print_exc()
        res.save("failed", error=one_line(e))
        return 1
    errors = res.get("errors", [])
    if errors:  # some measurements raised (attempt): the others are kept
        more = f" (and {len(errors) - 1} more: see the figures)" if len(errors) > 1 else ""
        res.save("failed", error=errors[0] + more)
        return 1
    res.save("ok")
    return 0


# --- the runner (the parent process) -------------------------------------------------------------------
def phase_limit(name: str, remaining_s: float, todo: list[str]) -> float:
    """A phase's time limit: its share of the budget left, over the shares of the phases still to run.

    Example: phase_limit("demo", 200.0, ["host_syncs", "demo"]) -> 200 * 0.34 / 0.40 = 170.0
    """
    return max(0.5, remaining_s * SHARES[name] / sum(SHARES[n] for n in todo))


def _child_env() -> dict:
    """The phases' environment: this one, with this minidalle first on the path and output unbuffered."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def _end_group(proc: subprocess.Popen) -> None:
    """Kill the process group the phase leads: the phase, and every process it started (compile workers,
    the demo), whether it finished or not."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_phase(name: str, limit_s: float, dry_run: bool, work: Path) -> dict:
    """Run one phase in its own process group, within `limit_s` seconds; its entry for the report.

    Example: run_phase("versions", 14.0, True, work) -> {"status": "ok", "seconds": 2.9, "torch": "2.13.0", ...}
    """
    result, log = work / f"{name}.json", work / f"phase-{name}.log"
    cmd = [sys.executable, "-m", "minidalle.bench.gpu_check", "--phase", name, "--result", str(result),
           "--work", str(work)] + (["--dry-run"] if dry_run else [])
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _end_group(proc)
    seconds = round(time.perf_counter() - t0, 1)
    figures = _read_json(result) or {}
    entry = {**{k: v for k, v in figures.items() if k not in ("status", "error")}, "seconds": seconds,
             "limit_s": round(limit_s, 1), "log": log.name}
    if rc is None:
        kept = "; the figures below are those it had measured" if figures else ""
        return {"status": "timed out", "error": f"still running after its limit of {limit_s:.1f} s, killed{kept}",
                **entry}
    if rc == 0 and figures.get("status") == "ok":
        return {"status": "ok", **entry}
    return {"status": "failed", "error": figures.get("error") or _last_line(log) or f"exit status {rc}", **entry}


def _read_json(path: Path) -> dict | None:
    """A phase's result file, or None when it wrote none (killed before, or crashed outright)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_line(log: Path) -> str:
    """The last non-empty line of a phase's log (a crash's error line), cut to 300 characters."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line[:300] for line in reversed(lines) if line), "")


def refuse_without_cuda() -> None:
    """A real check needs a CUDA device: refuse in one line (exit 2), saying what runs without one."""
    import torch

    if torch.cuda.is_available():
        return
    why = f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else \
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no device (CUDA_VISIBLE_DEVICES=" \
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}; is the driver loaded?)"
    raise ConfigError(f"check-gpu: no CUDA device is visible ({why}); `python -m minidalle check-gpu --dry-run` "
                      "runs every phase on the CPU at smoke sizes")


def check_gpu(out: str | Path = DEFAULT_OUT, dry_run: bool = False, budget_s: float = DEFAULT_BUDGET_S,
              phases: list[str] | None = None, limits: dict[str, float] | None = None, say=None) -> dict:
    """Run the phases (all, in PHASES order, or those named) one process each, rewriting OUT/report.json and
    OUT/report.md after each. limits: seconds for named phases instead of their share (tests time one out).
    Returns the report. Refused before anything is written: no CUDA without dry_run, a folder not ours.

    Example: check_gpu("runs/x", dry_run=True)["phases"]["train_step"]["flex"]["tokens_per_s"] -> 20413
    """
    say = say or (lambda line: print(line, flush=True))
    names = list(phases or PHASES)
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        raise ConfigError(f"check-gpu: unknown phases {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if not budget_s > 0:
        raise ConfigError(f"check-gpu: --budget-s {budget_s} is not a number of seconds > 0")
    if not dry_run:
        refuse_without_cuda()
    folder = OwnedFolder(check_out_folder(out, "--out"), "check-gpu", "--out", index="report.json").check()
    work = folder.stage / "work"  # the phases' scratch: removed with the staging folder at the end
    report = new_report(folder.path, dry_run, budget_s, names)
    try:
        work.mkdir()
        replaced = publish(folder, report)
        if replaced:
            say(f"[check-gpu] replacing the {replaced} files an earlier check-gpu wrote in {folder.path}")
        t_start = time.perf_counter()
        for i, name in enumerate(names, 1):
            left = budget_s - (time.perf_counter() - t_start)
            limit = (limits or {}).get(name) or phase_limit(name, left, names[i - 1:])
            say(f"[check-gpu] {i}/{len(names)} {name} ... (limit {limit:.0f} s)")
            report["phases"][name] = {"status": "running"}
            entry = run_phase(name, limit, dry_run, work)
            keep = {entry["log"]: work / entry["log"], **{n: Path(p) for n, p in entry.pop("files", {}).items()}}
            entry["files"] = sorted(n for n, p in keep.items() if p.is_file())
            report["phases"][name] = entry
            publish(folder, report, {n: keep[n] for n in entry["files"]})
            how = entry["status"] if entry["status"] == "ok" else f"{entry['status'].upper()} ({entry['error']})"
            say(f"[check-gpu] {i}/{len(names)} {name} {how} in {entry['seconds']:.1f} s")
        report.update(complete=True, finished_utc=utc_now())
        publish(folder, report, final=True)
    except BaseException:  # Ctrl-C: what was measured is already in the folder; say where it stopped
        for n, e in report["phases"].items():
            if e["status"] == "running":
                report["phases"][n] = {"status": "interrupted"}
        if folder.stage is not None:
            try:
                publish(folder, report, final=True)
            except Exception:  # noqa: BLE001 -- the first error is the one to show
                pass
        raise
    finally:
        folder.abandon()
    say(f"[check-gpu] wrote {folder.path / 'report.md'} and {folder.path / 'report.json'}")
    return report


def new_report(out: Path, dry_run: bool, budget_s: float, names: list[str]) -> dict:
    """The report before any phase has run: each pending."""
    command = f"python -m minidalle check-gpu --out {out} --budget-s {budget_s:g}" + (" --dry-run" if dry_run else "")
    return {"title": "minidalle check-gpu", "dry_run": dry_run, "command": command, "budget_s": budget_s,
            "started_utc": utc_now(), "finished_utc": None, "complete": False,
            "sizes": "DRY (CPU, smoke sizes)" if dry_run else "FULL",
            "phases": {n: {"status": "pending"} for n in names}}


def publish(folder: OwnedFolder, report: dict, files: dict[str, Path] | None = None, final: bool = False) -> int:
    """report.json, report.md and `files` (name -> the file to keep under it: a phase's log, the demo's
    samples) into the folder, replacing their earlier versions. Returns how many files of an earlier
    check-gpu the first call replaced (they go then: a second check-gpu keeps nothing of the first)."""
    for name, path in (files or {}).items():
        folder.write(name, path.read_bytes())
    folder.write("report.json", json.dumps(strict_json(report), indent=1, default=str,
                                           allow_nan=False) + "\n")
    folder.write("report.md", to_markdown(report))
    return folder.commit(final=final)


# --- report.md ------------------------------------------------------------------------------------------
def to_markdown(r: dict) -> str:
    """The report as markdown: what ran, each phase's status, then a section per phase."""
    lines = [f"# minidalle check-gpu, {r['started_utc']}", ""]
    if r["dry_run"]:
        lines += ["**Dry run**: every phase on the CPU at smoke sizes (tiny models, the sampler at B = 1 and 2 with "
                  "one compile, the smoke demo). It checks the code paths; none of its figures says anything about "
                  "a GPU.", ""]
    if not r["complete"]:
        lines += ["**Partial report**: written while running; phases still pending are marked so.", ""]
    lines += ["| phase | status | seconds | limit (s) |", "|---|---|---:|---:|"]
    for name, e in r["phases"].items():
        status = e["status"] if e["status"] == "ok" else f"**{e['status']}**"
        lines.append(f"| {name} | {status} | {_seconds(e.get('seconds'))} | {_seconds(e.get('limit_s'))} |")
    for name, e in r["phases"].items():
        if e["status"] in ("pending", "running", "interrupted"):
            continue
        lines += ["", f"## {name}", ""]
        if e["status"] != "ok":
            lines += [f"**{e['status']}**: `{e.get('error')}` (output: `{e.get('log')}`)", ""]
        try:
            lines += SECTIONS[name](e) if (e["status"] == "ok" or _has_figures(e)) else []
        except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a phase cut short: its figures as they are
            figures = json.dumps(strict_json(_figures_only(e)), indent=1, sort_keys=True, default=str)
            lines += ["```json", figures, "```"]
    lines += ["", f"Made by `{r['command']}`" + (f", finished {r['finished_utc']}." if r["finished_utc"] else "."), ""]
    return "\n".join(lines)


_BOOKKEEPING = ("status", "error", "seconds", "limit_s", "log", "files")  # every entry's, not a phase's figures


def _seconds(x) -> str:
    """Example: _seconds(2.04) -> "2.0"; _seconds(None) -> "—" """
    return "—" if x is None else f"{x:.1f}"


def _figures_only(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in _BOOKKEEPING}


def _has_figures(e: dict) -> bool:
    return bool(_figures_only(e))


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    """A markdown table. Example: _table(("a", "b"), [(1, 2.5)]) -> ["| a | b |", "|---|---|", "| 1 | 2.500 |"]"""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(fmt_value(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]


def _md_versions(e: dict) -> list[str]:
    keys = ("device", "compute_capability", "gpu_memory_gib", "gpus", "python", "torch", "cuda", "cudnn",
            "flex_attention", "peak_bf16_flops")
    rows = [(k, "—" if e.get(k) is None else str(e[k]) if k != "peak_bf16_flops" else f"{e[k]:.3g}") for k in keys]
    note = [] if e["flex_attention"] else ["", f"FlexAttention: {e['flex_attention_note']}"]
    return _table(("", ""), rows) + note


def _md_train_step(e: dict) -> list[str]:
    m, f = e["model"], e["flops_per_token"]
    head = [f"{m['n_layer']} layers, d_model {m['d_model']} ({m['n_head']} heads of {m['head_dim']}), {m['text_len']} "
            f"text tokens + a {m['grid']}x{m['grid']} grid ({m['sequence']} tokens), batch {e['batch']}, "
            f"{e['precision']}; {e['timed_steps']} timed updates after {e['warmup_steps']}; "
            f"{f['total']:.3g} training FLOPs per token (mask density {f['mask_density']}); peak "
            + (f"{e['peak_bf16_flops']:.3g} FLOP/s" if e["peak_bf16_flops"] else "unknown here (MFU null)"), ""]
    rows = [(impl, e[impl]["attn_used"], e[impl]["ms_per_step"], e[impl]["tokens_per_s"], e[impl]["mfu"],
             e[impl]["warmup_s"], e[impl]["max_memory_gib"]) for impl in ("flex", "sdpa") if impl in e]
    table = _table(("asked", "ran", "ms / update", "tokens / s", "MFU", "warm-up s", "peak GiB"), rows)
    notes = [f"- {impl}: {e[impl]['attn_reason']}" for impl in ("flex", "sdpa") if impl in e]
    return head + table + [""] + notes


def _md_resume(e: dict) -> list[str]:
    verdict = "**bit for bit**" if e["bit_exact"] else f"**differs**, first at update {e['first_differing_step']}"
    return [f"{e['steps']} updates straight against {e['stopped_at']}, stopped, resumed (from step "
            f"{e['resumed_from']}) to {e['steps']} on {e['device']} ({e['precision']}, attention {e['attn_used']}): "
            f"losses {verdict} (largest difference {e['max_abs_loss_difference']:.3g}); final weights "
            + ("equal bit for bit." if e["weights_bit_exact"] else "**differ**.")]


def _md_sampler(e: dict) -> list[str]:
    rows = []
    for B, b in e["batches"].items():
        c = b.get("compiled", {})
        rows.append((B, b["eager"]["images_per_s"], c.get("images_per_s"), b.get("compiled_speedup"),
                     c.get("first_call_s"), c.get("cudagraph_skips"), c.get("unique_graphs"), c.get("frames_total"),
                     c.get("graph_breaks"), c.get("frames_while_timed")))
    skipped = [B for B, b in e["batches"].items() if "skipped" in b.get("compiled", {})]
    calls = f"{e['repeats']} timed call" + ("s" if e["repeats"] != 1 else "")
    return [f"{e['model']}, {e['params']:,} parameters, {e['codes_per_image']} codes per image, {e['precision']}; "
            f"compiled: {e['compile_mode']}; median of {calls} after a warm-up call"
            + (f"; not compiled at B = {', '.join(skipped)} (dry run: one compile)." if skipped else "."), ""] + \
        _table(("B", "eager img/s", "compiled img/s", "speedup", "compile + 1st call s", "cudagraph skips",
                "unique graphs", "frames", "graph breaks", "frames while timed"), rows)


def _md_attention(e: dict) -> list[str]:
    fwd, fb = e["forward"], e.get("forward_backward", {})
    lines = [f"{e['text_len']} text tokens + {e['grid']}x{e['grid']} grid ({e['length']} tokens), {e['heads']} heads "
             f"of 64, {e['dtype']}; {e['ratio_method']}.", ""]
    lines += ["Forward (bench attention's own comparison):", ""]
    lines += _table(("figure", "value", "target", "met"),
                    [(k, v, e["forward_targets"].get(k, {}).get("target", ""),
                      str(e["forward_targets"].get(k, {}).get("met", ""))) for k, v in fwd.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)])
    if fb:
        lines += ["", "Forward + backward (SDPA + mask time / flex time):" if fb["flex_trains"]
                  else f"Forward + backward: {fb['flex_note']}; SDPA + mask alone:", ""]
        rows = [(name, fb[name].get("sdpa_mask_ms"), fb[name].get("flex_ms"),
                 fb.get(f"fwd_bwd_flex_{name}_speedup_{e['grid']}"), fb[name].get("grad_q_max_abs_diff"))
                for name in ("row", "colT") if name in fb]
        lines += _table(("mask", "SDPA + mask ms", "flex ms", "speedup", "largest dq difference"), rows)
    return lines


def _md_host_syncs(e: dict) -> list[str]:
    rows = [(kind, n) for kind, n in e["by_kind_per_update"].items()]
    places = ", ".join(f"{p} {n}" for p, n in e["by_place"].items())
    cpu_only = " (model.check_inputs reads the ids' range of CPU tensors only: on a GPU it reads none)" \
        if e["device"] == "cpu" and "model.py:check_inputs" in e["by_place"] else ""
    return [f"{e['per_update']} per update over {e['updates']} Trainer updates after a warm-up, on {e['device']} "
            f"({e['precision']}, attention {e['attn_used']}); from: {places or 'nowhere'}{cpu_only}.", ""] + \
        _table(("kind", "per update"), rows)


def _md_demo(e: dict) -> list[str]:
    stages = ", ".join(f"{k} {v}" for k, v in e["stage_seconds"].items())
    head = [f"`{e['command']}` (into a scratch folder, removed at the end): {e['wall_minutes']} min wall "
            f"({e['minutes']} min of training and sampling by its report; stages in seconds: {stages}); "
            f"{e['n_prompts']} prompts per split, {e['candidates']} candidates each. Its samples: `demo-samples.png`, "
            "its report: `demo-report.md`.", ""]
    keys = sorted({k for s in e["splits"].values() for k in s})
    return head + _table(("figure", *e["splits"]), [(k, *[s.get(k) for s in e["splits"].values()]) for k in keys])


SECTIONS = {"versions": _md_versions, "train_step": _md_train_step, "resume": _md_resume, "sampler": _md_sampler,
            "attention": _md_attention, "host_syncs": _md_host_syncs, "demo": _md_demo}


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
