"""`python -m minidalle bench sampling`: the key/value-cached sampler against the reference, and what limits it.

Everything runs in one process on `threads` CPU threads (1 by default), on transformers with random
weights (the speed of a step does not depend on what the weights learned), greedy (temperature 0) so
that the two samplers of a pair must draw exactly the same codes: each pair reports `tokens_equal`,
and a figure whose samplers disagree is marked invalid and fails its target (a warning says so too).

The models (`default_models`; the names are the keys' suffixes):
- `toy`: the toy preset (4 layers, d_model 128, caption 32 + an 8x8 grid, 256 codes, ~1M weights);
- `l8d512_16`: 8 layers, 8 heads of 64 (d_model 512), MLP x4, caption 32 (446 BPE ids, as the toy) +
  a 16x16 grid of 1024 codes, conv kernel 7 (the `small` preset's on that grid): ~26.8M weights;
- `l8d512_32`: the same on a 32x32 grid (1056 tokens), conv kernel 11 (the paper's).

What is measured (keys; targets in TARGETS):
- `kv_speedup_{model}_b{B}`: reference time / cached time for B images of B prompts. Two methods,
  named in each pair's `method`:
  "full runs": `sample_reference` and `sample`, whole runs, timed in alternating order;
  "steps": the reference on the big grids takes minutes (the 32x32 one: 1024 forward passes over up
  to 1055 tokens), so `CELLS` evenly spaced steps of each loop are timed instead and summed over all
  N steps by linear interpolation: for the reference, one iteration of its loop (`next_image_logits`
  on the prefix of that length, `pick`, the concatenation); for the cached sampler the prefill (code
  0) and `decode_step` + `pick` (every later code). The prefixes are the cached sampler's own greedy
  codes, so each timed reference step also checks, teacher-forced, that the reference picks the code
  the cached sampler picked; and the reference loop is run for real over the first CHECK_ROWS grid
  rows and compared. The first repeat times one call of each step (those calls check the codes); the
  later ones tools.MIN_SAMPLE_S samples. `cached_full_run_s` (a whole `sample` run, timed once, not
  interleaved) sits next to the integrated cached time as a rough check of the interpolation.
- `kv_speedup_toy_b1_compiled`: the same with `sample(compile=True)` (the static decode step under
  torch.compile); `compile_seconds_toy` is its first call (the compile plus one run), not timed in it.
- `cfg_batched_speedup`: classifier-free guidance (scale GUIDANCE) in two passes over batched, on
  `l8d512_16` (`cfg_batched_speedup_toy`: the toy, for information); greedy codes must agree.
- `batch8_per_image_speedup`: seconds per image at B = 1 over seconds per image at B = 8, cached
  sampler, on `l8d512_16` (`..._toy`: the toy).
- `roofline_fraction` (l8d512_16, B = 1): the time a decode step would take if it only streamed what
  it must read -- the weights it uses (every block, the final LayerNorm, the image head, three
  embedding rows; not the text embeddings or the text head) plus the cached keys and values each
  layer's mask lets it read (`KVCache.keys`, x 2 for k and v, x d_model x 4 bytes, averaged over the
  steps) -- at the memory bandwidth measured here (one thread, over BANDWIDTH_MB: the faster of
  `x.sum()` and a GEMV `x @ ones`, which read ~20% faster than `sum` on the 2-core AMD EPYC this was
  written on; `roofline_fraction_sum` uses `sum` alone), divided by the measured `decode_step` time
  (after a prefill, averaged over all steps). Each step is timed on its own and the bandwidth probed
  between steps, in the same passes; both take medians over samples (a step per pass, a probe), so
  that another job's burst on a shared machine weighs on both alike. Judged only for a model of >= 25M
  weights.
- `rerank_time_fraction`: for one prompt, RERANK_N toy candidates sampled (temperature 1), decoded by a
  toy dVAE, and scored by the toy reranker (`clip.rerank`; random weights in all three): the rerank's
  share of the whole. Reported as unavailable when `minidalle.clip` cannot be used.
- on CUDA only: toy images (code grids) per second at N = GPU_N in bf16, eager and compiled.

How a ratio is measured: A and B are timed back to back, in alternating order (AB, BA, ...), so a slow
spell of the shared machine lands on both; the ratio is the median of the per-repeat ratios, with
their range (`ratio_range`) and the median seconds of each side. A "sample" is enough calls in a row
to last tools.MIN_SAMPLE_S. Each side is called once first (a warm-up, and the codes compared); when both of
those calls lasted LONG_RUN_S or more they count as the first repeat. `part_seconds` gives the wall
time of each part of the benchmark, `seconds` the whole.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np
import torch

from . import tools
from .tools import calls_for, interleaved, judge_targets, per_call
from .tools import rounded as _r
from ..config import TransformerConfig, get_config
from ..errors import ConfigError
from ..model import DALLE, Layout
from ..sampling import KVCache, decode_step, pick, prefill, sample, sample_reference
from .sampling_limits import BANDWIDTH_MB, GPU_N, JUDGED, ROOFLINE_MIN_PARAMS, _count, _gpu, _prompts, _rerank, _roofline, _sync, timed

REPEATS = 7  # interleaved repeats of the pairs whose runs are short
BIG_REPEATS = 3  # ... and of those whose runs take seconds (l8d512)
CELLS = 7  # timed steps per "steps" pair (the per-step times are smooth in the step: linear, plus a
# small quadratic part for the reference's attention)
LONG_RUN_S = 1.0  # a whole run at least this long is its own warm-up: its time counts as the first repeat
CHECK_ROWS = 1  # grid rows the reference loop really runs, in a "steps" pair, for the tokens check
GUIDANCE = 3.0
RERANK_N, RERANK_PRESET = 64, "toy"
MODELS: dict | None = None  # name -> (TransformerConfig, Layout); None: default_models() (tests swap it)

# (key, "<=" or ">=", bound). A key not measured in a run gets met = None.
TARGETS = (
    ("kv_speedup_toy_b1", ">=", 5.0),
    ("kv_speedup_toy_b1_compiled", ">=", 5.0),
    ("kv_speedup_l8d512_16_b1", ">=", 8.0),
    ("kv_speedup_l8d512_16_b8", ">=", 25.0),
    ("kv_speedup_l8d512_32_b1", ">=", 30.0),
    ("cfg_batched_speedup", ">=", 1.15),
    ("batch8_per_image_speedup", ">=", 3.0),
    ("roofline_fraction", ">=", 0.4),
    ("rerank_time_fraction", "<=", 0.05),
)
# The kv pairs: (model, batch, method). The big reference runs are stepped (see the module docstring).
KV_PAIRS = (("toy", 1, "full"), ("l8d512_16", 1, "steps"), ("l8d512_16", 8, "steps"), ("l8d512_32", 1, "steps"))


def default_models() -> dict[str, tuple[TransformerConfig, Layout]]:
    """The three models of the benchmark (see the module docstring), by name.

    Example: default_models()["l8d512_16"][1] -> Layout(text_len=32, text_vocab=446, grid=16, image_vocab=1024)
    """
    toy = get_config("toy")
    big = dict(n_layer=8, n_head=8, head_dim=64, mlp_ratio=4, dropout=0.0)
    return {"toy": (toy.model, Layout.from_config(toy)),
            "l8d512_16": (TransformerConfig(**big, conv_kernel=7), Layout(32, 446, 16, 1024)),
            "l8d512_32": (TransformerConfig(**big, conv_kernel=11), Layout(32, 446, 32, 1024))}


def _calls(seconds: float) -> int:
    """Calls in a row that make one sample last tools.MIN_SAMPLE_S, given one call's seconds. Example: _calls(0.03) -> 4"""
    return calls_for(seconds, tools.MIN_SAMPLE_S, tools.MAX_CALLS)


def _per_call(fn, calls: int, device="cpu") -> float:
    """Seconds per call of fn over `calls` calls in a row."""
    return per_call(fn, calls, lambda: _sync(device))


def compare_codes(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Whether two samplers drew the same codes, and where they first differ (row, cell) when not.

    Example: compare_codes(tensor([[1, 2, 3]]), tensor([[1, 2, 4]])) -> {"tokens_equal": False, "mismatches": 1,
             "first_mismatch": [0, 2]}
    """
    if a.shape != b.shape:
        return {"tokens_equal": False, "mismatches": None, "first_mismatch": None,
                "shapes": [list(a.shape), list(b.shape)]}
    diff = (a.cpu() != b.cpu()).nonzero()
    if len(diff) == 0:
        return {"tokens_equal": True, "mismatches": 0}
    return {"tokens_equal": False, "mismatches": len(diff), "first_mismatch": diff[0].tolist()}


# --- the pairs ---------------------------------------------------------------------------------------------
def _pair_info(m: dict, name_a: str, name_b: str, check: dict, method: str, **extra) -> dict:
    return {"method": method, f"{name_a}_s": _r(m["a_s"]), f"{name_b}_s": _r(m["b_s"]),
            "ratio_range": [_r(m["lo"]), _r(m["hi"])], **check, **extra}


def _full_pair(fa, fb, repeats: int, name_a: str, name_b: str, method: str = "full runs") -> tuple[float, dict]:
    """Two samplers' whole runs (the same greedy codes expected): (median ratio a / b, the details)."""
    codes_a, ta = timed(fa)  # the warm-up calls: their codes are the ones compared
    codes_b, tb = timed(fb)
    check = compare_codes(codes_a, codes_b)
    m = interleaved(fa, fb, repeats, (ta, tb), long_run=LONG_RUN_S)
    return m["ratio"], _pair_info(m, name_a, name_b, check, method)


def _integrate(cells: list[int], times: list[float], lo: int, hi: int) -> float:
    """Sum over steps lo..hi of per-step seconds known at `cells`, linearly interpolated (flat past the ends).

    Example: _integrate([0, 10], [1.0, 2.0], 0, 10) -> 16.5  (1.0, 1.1, ..., 2.0)
    """
    if hi < lo:
        return 0.0
    return float(np.interp(np.arange(lo, hi + 1), cells, times).sum())


def _cells(N: int, k: int) -> list[int]:
    """k steps evenly spaced over 0..N-1 (both ends included). Example: _cells(256, 5) -> [0, 64, 128, 191, 255]"""
    return sorted({round(x) for x in np.linspace(0, N - 1, max(1, min(k, N)))})


@torch.no_grad()
def _reference_codes(model: DALLE, text: torch.Tensor, n: int) -> torch.Tensor:
    """The first n greedy codes of `sample_reference`, by its own loop (next_image_logits, pick, cat),
    stopped after n codes (sample_reference always runs to the end of the grid)."""
    image = torch.zeros(text.shape[0], 0, dtype=torch.long, device=text.device)
    for _ in range(n):
        image = torch.cat([image, pick(model.next_image_logits(text, image).float(), 0.0)], dim=1)
    return image  # (B, n)


@torch.no_grad()
def _steps_pair(model: DALLE, text: torch.Tensor, repeats: int, cells_k: int, check_rows: int) -> tuple[float, dict]:
    """The "steps" method (module docstring): (median of the per-repeat integrated ratios, the details)."""
    lay = model.layout
    B, N, dev = text.shape[0], lay.image_len, text.device
    codes, cached_full = timed(lambda: sample(model, text, 0.0))  # (B, N): the cached sampler's greedy codes
    n_check = min(N, check_rows * lay.grid)
    check = compare_codes(_reference_codes(model, text, n_check), codes[:, :n_check])
    dtype = next(model.parameters()).dtype
    cache = KVCache(model, B, dev, dtype)
    prefill(model, cache, text, codes[:, :N - 1])  # every position a decode step reads holds its true key/value
    fresh = KVCache(model, B, dev, dtype)
    empty = codes[:, :0]
    cells = _cells(N, cells_k)

    def ref_step(c):  # one iteration of the reference loop, for code c
        def step():
            logits = model.next_image_logits(text, codes[:, :c]).float()
            torch.cat([codes[:, :c], pick(logits, 0.0)], 1)
            return logits
        return step

    def kv_step(c):  # the cached loop's work for code c: the prefill for code 0, else the step feeding code c - 1
        def step():
            logits = (prefill(model, fresh, text, empty) if c == 0 else
                      decode_step(model, cache, codes[:, c - 1:c], c - 1)).float()
            pick(logits, 0.0)
            return logits
        return step

    # Repeat 0 is one call of each side per step, which also checks the codes (teacher-forced) and sizes
    # the samples of the later repeats; nothing is left to warm by then (both samplers have just run).
    forced_bad, logit_diff, calls_ref, calls_kv = 0, 0.0, [], []
    ratios, ref_totals, kv_totals = [], [], []
    for r in range(repeats):
        t_ref, t_kv = [], []
        for i, c in enumerate(cells):
            fa, fb = ref_step(c), kv_step(c)
            if r == 0:
                if i % 2 == 0:
                    (ref_logits, a), (kv_l, b) = timed(fa), timed(fb)
                else:
                    (kv_l, b), (ref_logits, a) = timed(fb), timed(fa)
                forced_bad += int((ref_logits.argmax(-1) != codes[:, c]).sum())
                logit_diff = max(logit_diff, float((ref_logits - kv_l).abs().max()))
                calls_ref.append(_calls(a))
                calls_kv.append(_calls(b))
            elif (r + i) % 2 == 0:
                a, b = _per_call(fa, calls_ref[i]), _per_call(fb, calls_kv[i])
            else:
                b, a = _per_call(fb, calls_kv[i]), _per_call(fa, calls_ref[i])
            t_ref.append(a)
            t_kv.append(b)
        ref_total = _integrate(cells, t_ref, 0, N - 1)
        kv_total = t_kv[0] + (_integrate(cells[1:], t_kv[1:], 1, N - 1) if len(cells) > 1 else 0.0)
        ratios.append(ref_total / kv_total)
        ref_totals.append(ref_total)
        kv_totals.append(kv_total)
    check["teacher_forced_mismatches"] = forced_bad
    check["tokens_equal"] = check["tokens_equal"] and forced_bad == 0
    m = {"ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
         "a_s": statistics.median(ref_totals), "b_s": statistics.median(kv_totals)}
    method = (f"steps: {len(cells)} of the {N} steps of each loop timed ({cells}), summed over all steps by "
              f"linear interpolation; codes checked on the first {n_check} by the reference loop and, "
              f"teacher-forced, at the timed steps")
    return m["ratio"], _pair_info(m, "reference", "cached", check, method, cached_full_run_s=_r(cached_full),
                                  max_abs_logit_diff=_r(logit_diff), cells=cells)


def _kv_pairs(models, pairs, repeats, big_repeats, cells_k, check_rows, seed) -> dict:
    res: dict = {"kv": {}, "tokens_equal": {}}
    for name, B, method in pairs:
        key = f"kv_speedup_{name}_b{B}"
        model = models(name)
        text = _prompts(model.layout, B, seed)
        if method == "full":
            ratio, info = _full_pair(lambda: sample_reference(model, text, 0.0), lambda: sample(model, text, 0.0),
                                     repeats, "reference", "cached")
        elif method == "steps":
            ratio, info = _steps_pair(model, text, big_repeats, cells_k, check_rows)
        else:
            raise ConfigError(f"method {method!r} for {key} is invalid: use 'full' or 'steps'")
        res[key] = _r(ratio)
        res["kv"][key] = info
        res["tokens_equal"][key] = info["tokens_equal"]
    return res


def _compiled_pair(model: DALLE, repeats: int, seed: int) -> dict:
    """kv_speedup_toy_b1_compiled: the reference against sample(compile=True); the first call compiles
    (it may take less when torch.compile's on-disk cache already holds the kernels)."""
    text = _prompts(model.layout, 1, seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, first = timed(lambda: sample(model, text, 0.0, compile=True))
    except Exception as e:  # noqa: BLE001 -- no C++ compiler, an unsupported op: report it, do not stop the bench
        model.__dict__.pop("_compiled_step", None)
        return {"compiled": f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    with warnings.catch_warnings():  # measuring the compiled step on the CPU is the point here
        warnings.filterwarnings("ignore", message=r"sample\(compile=True\) on the CPU")
        ratio, info = _full_pair(lambda: sample_reference(model, text, 0.0),
                                 lambda: sample(model, text, 0.0, compile=True), repeats, "reference", "cached_compiled")
    return {"kv_speedup_toy_b1_compiled": _r(ratio), "compile_seconds_toy": round(first, 1),
            "kv": {"kv_speedup_toy_b1_compiled": info},
            "tokens_equal": {"kv_speedup_toy_b1_compiled": info["tokens_equal"]}}


def _cfg_pair(model: DALLE, repeats: int, seed: int) -> tuple[float, dict]:
    text = _prompts(model.layout, 1, seed)

    def run(batched):
        return lambda: sample(model, text, 0.0, guidance=GUIDANCE, guidance_batched=batched)
    ratio, info = _full_pair(run(False), run(True), repeats, "two_passes", "batched")
    info["guidance"] = GUIDANCE
    return ratio, info


def _batch_pair(model: DALLE, repeats: int, seed: int) -> tuple[float, dict]:
    """Seconds per image at B = 1 over at B = 8 (the B = 8 prompts start with the B = 1 one)."""
    text = _prompts(model.layout, 8, seed)
    one, eight = lambda: sample(model, text[:1], 0.0), lambda: sample(model, text, 0.0)
    codes1, t1 = timed(one)
    codes8, t8 = timed(eight)
    m = interleaved(one, eight, repeats, (t1, t8), long_run=LONG_RUN_S)
    m = {**m, "ratio": 8 * m["ratio"], "lo": 8 * m["lo"], "hi": 8 * m["hi"]}  # per image
    # row 0 is the same prompt alone and in a batch of 8: information (a batched matmul may round differently)
    info = _pair_info(m, "b1", "b8", {}, "full runs, cached sampler; ratio = 8 x time(B=1) / time(B=8)",
                      row0_equal_alone_and_batched=bool(torch.equal(codes1[0], codes8[0])))
    return m["ratio"], info


# --- the benchmark ---------------------------------------------------------------------------------------
def check_targets(res: dict) -> dict:
    """Each target of TARGETS with its measured value and whether it was met: None when not measured
    (or, for the roofline, measured on a model under 25M weights); False, with `valid: False`, when the
    two samplers of its pair drew different codes.

    Example: check_targets({"cfg_batched_speedup": 1.6})["cfg_batched_speedup"]
             -> {"target": ">= 1.15", "value": 1.6, "met": True}
    """
    out = judge_targets(res, TARGETS)
    for key, t in out.items():
        value = t["value"]
        if key == "roofline_fraction" and value is not None and \
                res.get("roofline", {}).get("params", 0) < ROOFLINE_MIN_PARAMS:
            t["met"], t["note"] = None, f"not judged: the model has under {ROOFLINE_MIN_PARAMS:,} weights"
        if res.get("tokens_equal", {}).get(key) is False:
            t["met"], t["valid"] = False, False
            t["note"] = "invalid: the two samplers drew different greedy codes"
    return out


def benchmark_sampling(threads: int = 1, compile: bool = True, repeats: int | None = None,
                       big_repeats: int | None = None, cells: int | None = None, bandwidth_mb: int | None = None,
                       rerank_n: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Time the cached sampler against the reference, and the rest (see the module docstring), on
    `threads` CPU threads (restored afterwards). None: the module's defaults (REPEATS, BIG_REPEATS,
    CELLS, BANDWIDTH_MB, RERANK_N). compile=False skips the compiled pair (~50 s of compile on 2 cores).
    Returns plain JSON: the figures, their details, `tokens_equal` per pair and `targets` (check_targets).

    Example: benchmark_sampling() -> {"kv_speedup_toy_b1": 2.1, "kv_speedup_l8d512_16_b1": 8.9, ...,
             "targets": {...}, "threads": 1, "torch": "2.13.0"}
    """
    from tqdm.auto import tqdm

    repeats, big_repeats = repeats or REPEATS, big_repeats or BIG_REPEATS
    cells, bandwidth_mb, rerank_n = cells or CELLS, bandwidth_mb or BANDWIDTH_MB, rerank_n or RERANK_N
    if min(threads, repeats, big_repeats, cells, bandwidth_mb, rerank_n) < 1:
        raise ConfigError(f"threads={threads}, repeats={repeats}, big_repeats={big_repeats}, cells={cells}, "
                          f"bandwidth_mb={bandwidth_mb}, rerank_n={rerank_n}: each must be >= 1")
    specs = MODELS if MODELS is not None else default_models()
    built: dict[str, DALLE] = {}

    def models(name: str) -> DALLE:
        if name not in built:
            torch.manual_seed(seed)
            built[name] = DALLE(*specs[name]).eval()
        return built[name]

    t_start = time.perf_counter()
    res: dict = {"threads": threads, "torch": torch.__version__, "repeats": repeats, "big_repeats": big_repeats,
                 "greedy": True, "seed": seed,
                 "models": {name: {"n_layer": c.n_layer, "d_model": c.n_head * c.head_dim, "n_head": c.n_head,
                                   "conv_kernel": c.conv_kernel, "text_len": lay.text_len, "grid": lay.grid,
                                   "image_vocab": lay.image_vocab, "length": lay.length,
                                   **_count(models(name))} for name, (c, lay) in specs.items()},
                 "ratio_method": "median of per-repeat ratios; A and B timed back to back, order alternating"}
    cuda = torch.cuda.is_available()
    steps = len(KV_PAIRS) + compile + 4 + 1 + 1 + cuda
    parts: dict[str, float] = {}  # wall seconds of each part of the benchmark

    def timed_part(name, fn, *args):
        bar.set_description(name)
        t0 = time.perf_counter()
        out = fn(*args)
        parts[name] = round(time.perf_counter() - t0, 1)
        bar.update(1)
        return out

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tqdm(total=steps, desc="sampling", disable=not progress) as bar:
            res["kv"], res["tokens_equal"] = {}, {}
            for pair in KV_PAIRS:
                kv = timed_part(f"kv_speedup_{pair[0]}_b{pair[1]}", _kv_pairs, models, (pair,), repeats, big_repeats,
                                cells, CHECK_ROWS, seed)
                for group in ("kv", "tokens_equal"):
                    res[group].update(kv.pop(group))
                res.update(kv)
            if compile:
                out = timed_part("kv_speedup_toy_b1_compiled", _compiled_pair, models("toy"), repeats, seed)
                res["kv"].update(out.pop("kv", {}))
                res["tokens_equal"].update(out.pop("tokens_equal", {}))
                res.update(out)
            else:
                res["compiled"] = "skipped (--no-compile)"
            res["cfg"], res["batch"] = {}, {}
            for name, suffix, reps in ((JUDGED, "", big_repeats), ("toy", "_toy", repeats)):
                key = f"cfg_batched_speedup{suffix}"
                ratio, info = timed_part(key, _cfg_pair, models(name), reps, seed)
                res[key], res["cfg"][key] = _r(ratio), {"model": name, **info}
                res["tokens_equal"][key] = info["tokens_equal"]
                key = f"batch8_per_image_speedup{suffix}"
                ratio, info = timed_part(key, _batch_pair, models(name), reps, seed)
                res[key], res["batch"][key] = _r(ratio), {"model": name, **info}
            res.update(timed_part("roofline_fraction", _roofline, models(JUDGED), big_repeats, bandwidth_mb, seed))
            res.update(timed_part("rerank_time_fraction", _rerank, models("toy"), RERANK_PRESET, rerank_n,
                                  big_repeats, seed))
            if cuda:
                res.update(timed_part("gpu", _gpu, *specs["toy"], GPU_N, big_repeats, compile, seed))
            else:
                res["gpu"] = "no CUDA device here"
    finally:
        torch.set_num_threads(old_threads)
    res["part_seconds"] = parts
    res["targets"] = check_targets(res)
    bad = [key for key, ok in res["tokens_equal"].items() if not ok]
    if bad:
        warnings.warn(f"the two samplers drew different greedy codes in {', '.join(bad)}: those figures are "
                      "invalid (see tokens_equal and first_mismatch in the JSON); please report it", stacklevel=2)
    res["method"] = ("pairs timed in alternating order; 'full runs' time whole sampler calls, 'steps' time "
                     f"{cells} evenly spaced steps of each loop and sum over all steps by linear interpolation "
                     "(see each pair's `method`)")
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def _mark(t: dict | None) -> str:
    if t is None:
        return ""
    if t.get("note"):
        return f"  target {t['target']} {'✗' if t['met'] is False else ''} ({t['note']})"
    return f"  target {t['target']} " + {True: "✓", False: "✗", None: "(not measured)"}[t["met"]]


def _sides(info: dict, names: tuple[str, ...]) -> str:
    """The seconds of a pair's two sides, in a fixed order (the JSON line sorts its keys).

    Example: _sides({"cached_s": 0.1, "reference_s": 0.3}, ("reference", "cached")) -> "reference 0.3 s vs cached 0.1 s"
    """
    return " vs ".join(f"{n} {info[n + '_s']} s" for n in names if n + "_s" in info)


def format_sampling_benchmark(r: dict) -> str:
    """`benchmark_sampling`'s result as a short text report: each figure with its target, ✓ / ✗."""
    targets = r["targets"]

    def line(key: str, detail: str = "") -> str:
        return f"  {key:<36} {r[key]:>8.3f}{_mark(targets.get(key))}{detail}"

    def tokens(info: dict) -> str:
        if info.get("tokens_equal", True):
            return "codes equal"
        return f"CODES DIFFER ({info.get('mismatches')} mismatches, first at {info.get('first_mismatch')})"

    lines = [f"sampling benchmark: torch {r['torch']}, {r['threads']} thread(s), greedy, random weights, "
             f"{r['repeats']} / {r['big_repeats']} interleaved repeats ({r['ratio_method']}); {r['seconds']} s"]
    for name, m in sorted(r["models"].items(), key=lambda item: item[1]["length"]):
        lines.append(f"  model {name}: {m['n_layer']} layers, d_model {m['d_model']}, caption {m['text_len']} + "
                     f"{m['grid']}x{m['grid']} grid ({m['length']} tokens), {m['image_vocab']} codes, "
                     f"{m['params'] / 1e6:.2f}M weights")
    lines.append("key/value cache: reference time / cached time")
    order = [key for key, _, _ in TARGETS]
    for key, info in sorted(r["kv"].items(), key=lambda item: order.index(item[0]) if item[0] in order else 99):
        times = _sides(info, ("reference", "cached", "cached_compiled"))
        extra = f", a whole cached run {info['cached_full_run_s']} s" if "cached_full_run_s" in info else ""
        how = "full runs" if info["method"] == "full runs" else f"{len(info['cells'])} steps integrated"
        lines.append(line(key, f"   ({times}{extra}; {how}; {tokens(info)}; repeats "
                               f"{info['ratio_range'][0]}-{info['ratio_range'][1]})"))
    if "compile_seconds_toy" in r:
        lines.append(f"  compile of the toy decode step (first call, with one run): {r['compile_seconds_toy']} s")
    elif "compiled" in r:
        lines.append(f"  compiled decode step: {r['compiled']}")
    lines.append(f"guidance (scale {GUIDANCE}) two passes / batched, and B=1 / B=8 per image, cached sampler:")
    for group in ("cfg", "batch"):
        for key, info in sorted(r[group].items()):
            times = _sides(info, ("two_passes", "batched", "b1", "b8"))
            check = f"; {tokens(info)}" if "tokens_equal" in info else ""
            lines.append(line(key, f"   ({info['model']}: {times}{check})"))
    if "roofline" in r:
        f = r["roofline"]
        lines.append(line("roofline_fraction", f"   ({f['model']}, {f['params'] / 1e6:.1f}M weights: "
                                               f"{f['weight_bytes_per_step'] / 1e6:.1f} MB weights + "
                                               f"{f['kv_bytes_per_step'] / 1e3:.0f} kB cache per step at "
                                               f"{f['bandwidth_gbs']} GB/s = {f['ideal_step_ms']} ms; "
                                               f"measured {f['decode_step_ms']} ms; with x.sum()'s "
                                               f"{f['bandwidth_gbs_sum']} GB/s alone: {r['roofline_fraction_sum']})"))
    if "rerank_time_fraction" in r:
        f = r["rerank"]
        lines.append(line("rerank_time_fraction", f"   ({f['n']} {f['preset']} candidates: sample {f['sample_s']} s, "
                                                  f"decode {f['decode_s']} s, rerank {f['rerank_s']} s)"))
    else:
        lines.append(f"  rerank_time_fraction: {r.get('rerank')}")
    if "gpu" in r:
        lines.append(f"GPU: {r['gpu']}")
    else:
        gpu = [k for k in r if k.startswith("gpu_toy_images_per_s")]
        lines.append(f"GPU ({r['gpu_device']}, {r['gpu_dtype']}): " +
                     ", ".join(f"{k} {r[k]}" for k in gpu) + (f"; {r['gpu_compiled']}" if "gpu_compiled" in r else ""))
    return "\n".join(lines)
