"""What limits the sampler, for `bench sampling`: memory bandwidth and the roofline, the reranker's share, the GPU.

    read, copy = _bandwidth(BANDWIDTH_MB)              # GB/s over a matrix far larger than the CPU's caches
    out = _roofline(model, repeats, BANDWIDTH_MB, 0)   # the fraction of that bandwidth a decode step reaches
    out = _rerank(model, preset, n, repeats, 0)        # the reranker's share of sample + decode + rerank
    out = _gpu(cfg, layout, GPU_N, repeats, compile, 0)   # images per second on CUDA (bf16, eager and compiled)

sampling.py times the sampler's paths against each other and reports everything; the module
docstring there says what each figure means and how it is measured.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .tools import rounded as _r
from ..config import TransformerConfig, get_config
from ..errors import ConfigError
from ..model import DALLE, Layout
from ..sampling import KVCache, decode_images, decode_step, prefill, sample


BANDWIDTH_MB = 256  # the matrix the bandwidth probes stream (>> the CPU's caches)
BANDWIDTH_EVERY = 16  # decode steps between two bandwidth probes in the roofline passes
RERANK_N, RERANK_PRESET = 64, "toy"
RERANK_PROMPT = "a red circle above a blue square"
GPU_N = 64
ROOFLINE_MIN_PARAMS = 25_000_000
JUDGED = "l8d512_16"  # the model of cfg_batched_speedup, batch8_per_image_speedup and roofline_fraction
MODELS: dict | None = None  # name -> (TransformerConfig, Layout); None: default_models() (tests swap it)


# --- timing ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """(fn(), seconds it took). Example: timed(lambda: 2 + 2) -> (4, 1e-06)"""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _prompts(layout: Layout, B: int, seed: int) -> torch.Tensor:
    """B caption rows as the BPE stage writes them: 5-15 random token ids, then the per-position pads.

    Example: _prompts(toy layout, 2, 0) -> long (2, 32), e.g. [[17, 301, ..., 446 + 9, ..., 477], ...]
    """
    g = torch.Generator().manual_seed(seed)
    text = layout.pad_ids().repeat(B, 1)  # (B, T)
    for row in text:
        n = int(torch.randint(5, 16, (), generator=g).clamp(max=layout.text_len))
        row[:n] = torch.randint(0, layout.text_vocab, (n,), generator=g)
    return text


def _count(model: DALLE) -> dict:
    """Weights in all, and the weights one decode step reads (see the module docstring), of a model."""
    d = model.cfg.n_head * model.cfg.head_dim
    used = sum(p.numel() for m in (*model.blocks, model.ln_f, model.image_head) for p in m.parameters()) + 3 * d
    return {"params": sum(p.numel() for p in model.parameters()), "params_read_per_step": used}


def _bandwidth(mb: int, repeats: int = 3) -> tuple[float, float]:
    """(GB/s reading, GB/s copying) over a float32 tensor of `mb` MB, one call of each, median of repeats.
    The copy moves 2x the bytes (read + write); it is reported next to the read figure the roofline uses."""
    x = torch.ones(max(1, mb * 2**20 // 4))
    y = torch.empty_like(x)
    x.sum(), y.copy_(x)  # page the memory in
    reads, copies = [], []
    for _ in range(repeats):
        reads.append(x.numel() * 4 / timed(x.sum)[1] / 1e9)
        copies.append(2 * x.numel() * 4 / timed(lambda: y.copy_(x))[1] / 1e9)  # read + write
    return statistics.median(reads), statistics.median(copies)


@torch.no_grad()
def _roofline(model: DALLE, repeats: int, bandwidth_mb: int, seed: int) -> dict:
    """roofline_fraction (module docstring): decode steps at B = 1 against the bytes they must read."""
    lay, cfg = model.layout, model.cfg
    d, N, T = cfg.n_head * cfg.head_dim, lay.image_len, lay.text_len
    text = _prompts(lay, 1, seed)
    # the codes fed: random (a step's cost does not depend on them), so no sampling run is needed first
    codes = torch.randint(0, lay.image_vocab, (1, N), generator=torch.Generator().manual_seed(seed))
    dtype = next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    counts = _count(model)
    steps = range(N - 1)  # decode_step feeds codes 0..N-2
    keys = [sum(len(KVCache.keys(model, block.kind, T + cell, "cpu")) for block in model.blocks) for cell in steps]
    kv_bytes = 2 * d * size * statistics.mean(keys) if keys else 0.0
    weight_bytes = counts["params_read_per_step"] * size
    cache = KVCache(model, 1, text.device, dtype)
    side = max(1, math.isqrt(bandwidth_mb * 2**20 // 4))
    x, ones = torch.ones(side, side), torch.ones(side)  # streamed by the probes: x.sum() and x @ ones (a GEMV)
    probes = {"sum": x.sum, "gemv": lambda: torch.mv(x, ones)}
    for probe in probes.values():
        probe()  # page it in

    def one_pass():
        """Every decode step timed on its own, and a bandwidth probe every BANDWIDTH_EVERY steps, so both
        sample the same stretch of time on a shared machine."""
        prefill(model, cache, text, codes[:, :0])
        step_t, reads = [], {name: [] for name in probes}
        for cell in steps:
            t0 = time.perf_counter()
            decode_step(model, cache, codes[:, cell:cell + 1], cell)
            step_t.append(time.perf_counter() - t0)
            if cell % BANDWIDTH_EVERY == 0:
                for name in (probes if cell % (2 * BANDWIDTH_EVERY) else reversed(probes)):
                    reads[name].append(x.numel() * 4 / timed(probes[name])[1] / 1e9)
        return step_t, reads

    one_pass()  # warm-up
    passes = [one_pass() for _ in range(repeats)]
    # per step: the median over the passes (a step that another job preempted in one pass does not count),
    # then the mean over the steps; the bandwidth: the median of every probe
    # then the mean over the steps; the bandwidth: the median of each probe, and the faster of the two (the
    # machine can read at least that fast; x.sum() alone reads slower than a GEMV on some CPUs)
    step_s = statistics.mean(statistics.median(p[0][i] for p in passes) for i in range(len(steps)))
    each = {name: statistics.median(r for p in passes for r in p[1][name]) for name in probes}
    gbs = max(each.values())
    _, copy_gbs = _bandwidth(bandwidth_mb)
    nbytes = weight_bytes + kv_bytes
    ideal = nbytes / (gbs * 1e9)
    per_pass = [nbytes / (max(statistics.median(v) for v in p[1].values()) * 1e9) / statistics.mean(p[0])
                for p in passes]
    return {"roofline_fraction": _r(ideal / step_s), "roofline_fraction_sum": _r(nbytes / (each["sum"] * 1e9) / step_s),
            "roofline": {"model": JUDGED, "params": counts["params"],
                         "params_read_per_step": counts["params_read_per_step"],
                         "weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": round(kv_bytes),
                         "kv_positions_per_step": _r(statistics.mean(keys) if keys else 0.0),
                         "bandwidth_gbs": _r(gbs), "bandwidth_gbs_sum": _r(each["sum"]),
                         "bandwidth_gbs_gemv": _r(each["gemv"]), "copy_bandwidth_gbs": _r(copy_gbs),
                         "bandwidth_mb": bandwidth_mb,
                         "decode_step_ms": _r(1e3 * step_s), "ideal_step_ms": _r(1e3 * ideal),
                         "fraction_range": [_r(min(per_pass)), _r(max(per_pass))], "steps": len(steps),
                         "passes": repeats,
                         "method": f"decode_step after a prefill, each step timed: the median over {repeats} passes "
                                   "of each step, then the mean over the steps; bandwidth: x.sum() and a GEMV over a "
                                   f"bandwidth_mb MB matrix every {BANDWIDTH_EVERY} steps of those passes, the faster "
                                   "median (roofline_fraction_sum: with x.sum() alone); "
                                   "fraction_range: the same fraction from each pass alone (mean step time)"}}


def _rerank(model: DALLE, preset: str, n: int, repeats: int, seed: int) -> dict:
    """rerank_time_fraction: rerank / (sample + decode + rerank) for n candidates of one prompt."""
    try:
        from .. import clip as cliplib

        from ..bpe import RegexTokenizer
        from ..dvae import DVAE
        from ..sampling import encode_prompts

        cfg = get_config(preset)
        if Layout.from_config(cfg).grid != model.layout.grid or cfg.dvae.vocab_size < model.layout.image_vocab:
            raise ConfigError(f"the {preset} dVAE ({Layout.from_config(cfg).grid}x grid, {cfg.dvae.vocab_size} codes) "
                              f"cannot decode this model's codes")
        torch.manual_seed(seed)
        reranker, dvae = cliplib.CLIP.from_config(cfg).eval(), DVAE(cfg.dvae).eval()
        tok = RegexTokenizer()  # bytes only: the prompt becomes a few dozen ids, cut to the text length (the cost is the same)
        text, _ = encode_prompts(tok, [RERANK_PROMPT], model.layout, truncate=True)
        text = text.repeat(n, 1)
        gen = torch.Generator().manual_seed(seed)
        parts = {"sample": [], "decode": [], "rerank": []}
        fractions = []
        for r in range(repeats + 1):  # the first round warms up and is not counted
            codes, ts = timed(lambda: sample(model, text, 1.0, generator=gen))
            images, td = timed(lambda: decode_images(dvae, codes, model.layout.grid))
            scores, tr = timed(lambda: cliplib.rerank(reranker, tok, [RERANK_PROMPT] * n, images, truncate=True))
            if tuple(scores.shape) != (n,):
                raise ConfigError(f"rerank returned shape {tuple(scores.shape)} for {n} images")
            if r:
                for key, t in zip(parts, (ts, td, tr)):
                    parts[key].append(t)
                fractions.append(tr / (ts + td + tr))
    except Exception as e:  # noqa: BLE001 -- the reranker is optional here: say why it was not measured
        return {"rerank": f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"rerank_time_fraction": _r(statistics.median(fractions)),
            "rerank": {"n": n, "preset": preset, "prompt": RERANK_PROMPT,
                       **{f"{k}_s": _r(statistics.median(v)) for k, v in parts.items()},
                       "fraction_range": [_r(min(fractions)), _r(max(fractions))],
                       "method": "sample (temperature 1) + dVAE decode + clip.rerank, one prompt, random weights; "
                                 "median of the per-repeat fractions"}}


def _gpu(cfg: TransformerConfig, layout: Layout, n: int, repeats: int, compile: bool, seed: int) -> dict:
    """Toy images (code grids) per second at N = n on CUDA in bf16, eager and compiled."""
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    model = DALLE(cfg, layout).to(dev).eval()
    text = _prompts(layout, n, seed).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    res: dict = {"gpu_device": torch.cuda.get_device_name(dev), "gpu_n": n, "gpu_dtype": "bfloat16"}
    for label, comp in (("", False), ("_compiled", True)):
        if comp and not compile:
            res["gpu_compiled"] = "skipped (--no-compile)"
            continue
        run = lambda: sample(model, text, 1.0, generator=gen, precision="bf16", compile=comp)  # noqa: E731
        try:
            _, first = timed(run, dev)
            times = [timed(run, dev)[1] for _ in range(repeats)]
        except Exception as e:  # noqa: BLE001
            res[f"gpu{label}"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        res[f"gpu_toy_images_per_s_n{n}_bf16{label}"] = _r(n / statistics.median(times))
        res[f"gpu_first_call_s{label}"] = round(first, 2)
    return res


