"""`python -m minidalle bench attention`: the paper's sparse masks, run both ways, against dense causal.

Everything is timed side by side in one process on random q, k, v (batch 1, head dim 64), one
layout (text_len T, grid G; L = T + G*G tokens) at a time:

- training (CPU): SDPA with the boolean mask, forward + backward, against dense causal SDPA
  (`is_causal=True`) forward + backward on the same inputs. The boolean mask costs more than
  causal on CPU (it is read, not generated), so the target is "not much slower";
- inference (CPU, the largest layout given): FlexAttention, compiled, through `attention.attend`
  (so with its BlockMask, its block size and, for the column mask, its transposed column-major
  layout) against dense causal SDPA, and against SDPA with the same boolean mask. Flex and SDPA
  must agree to 1e-4. The compile happens in a warm-up call and is reported, not timed;
- inference (GPU, when there is one): flex against SDPA + boolean mask in bf16, with more heads.

How a ratio is measured: each repeat times A and B back to back, in alternating order (AB, BA,
AB, ...), so that a slow spell of the machine (another job, a frequency change) lands on both;
the ratio reported is the median of the per-repeat ratios A / B. A "sample" is enough calls in a
row to last tools.MIN_SAMPLE_S, so fast calls are not lost in the timer's noise. The median absolute
times (ms per call) and the range of the per-repeat ratios (`ratio_range`, how noisy the machine
was) are reported next to every ratio, under `*_ms_*` keys. `flex_compile_seconds` is the time of
the first row and column flex calls: the compile, plus one call each.

Keys name the grid they were measured on: `train_mask_over_causal_{G}` for each layout's grid
(`..._{G}_column`, `..._{G}_conv` for the other two masks, for information), and the flex keys
(`flex_row_over_causal_{G}`, `flex_colT_over_causal_{G}`, `flex_over_sdpa_mask_{G}`, `blocks_128_{G}`)
with the grid of the largest layout, as are the GPU keys (`gpu_flex_row_speedup_{G}`,
`gpu_flex_colT_speedup_{G}`). The default layouts give the targets' keys (grids 32 and 16).
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from ..attention import BLOCK_CPU, KINDS, MaskBank, attend, block_counts, flex_available
from .tools import judge_targets, interleaved
from .tools import rounded as _r
from ..errors import ConfigError

HEAD_DIM = 64
KERNEL = 11  # the paper's convolutional kernel; clipped to fit smaller grids (see `_kernel`)
# One timed sample lasts at least this long (several calls when one call is fast): long enough that a
# burst of another job's work on a shared machine is averaged in, not the whole of a sample.
FLEX_TOL = 1e-4  # float32 flex against SDPA, same mask
GPU_HEADS, GPU_TOL = 16, 5e-2  # bf16 on the GPU: an output element carries ~3 significant digits

# target: (key, "<=" or ">=", bound). A key not measured in a run gets met = None.
TARGETS = (
    ("train_mask_over_causal_32", "<=", 1.7),
    ("train_mask_over_causal_16", "<=", 1.2),
    ("flex_row_over_causal_32", "<=", 0.8),
    ("flex_colT_over_causal_32", "<=", 0.8),
    ("flex_over_sdpa_mask_32", "<=", 0.5),
    ("gpu_flex_row_speedup_32", ">=", 1.5),
    ("gpu_flex_colT_speedup_32", ">=", 1.5),
)


def _kernel(grid: int) -> int:
    """The paper's kernel of 11, or the largest odd kernel that fits a smaller grid.

    Example: _kernel(32) -> 11; _kernel(4) -> 3
    """
    return min(KERNEL, grid if grid % 2 else grid - 1)


def _qkv(n_head: int, L: int, device, dtype=torch.float32, grad: bool = False, seed: int = 0):
    """Random q, k, v of shape (1, n_head, L, HEAD_DIM), the same for a given seed.

    Example: q, k, v = _qkv(4, 96, "cpu"); q.shape -> (1, 4, 96, 64)
    """
    g = torch.Generator().manual_seed(seed)  # generated on the CPU, then moved: same numbers on any device
    return [torch.randn(1, n_head, L, HEAD_DIM, generator=g).to(device, dtype).requires_grad_(grad)
            for _ in range(3)]


def _train_step(q, k, v, mask=None):
    """One forward + backward of SDPA (the boolean mask, or dense causal when mask is None)."""
    def step():
        for t in (q, k, v):
            t.grad = None  # so the backward writes its gradients instead of adding to the last ones
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (1, nh, L, hd)
        out.sum().backward()
    return step


def _train_ratios(T: int, G: int, n_head: int, repeats: int, bar) -> dict:
    """train_mask_over_causal_{G}[_column|_conv] and their ms, for one layout (see the module docstring)."""
    L = T + G * G
    bank = MaskBank(T, G, _kernel(G), compile_flex=False)
    q, k, v = _qkv(n_head, L, "cpu", grad=True)
    res, ms = {}, {}
    for kind in KINDS:
        bar.set_description(f"train {kind} {T}+{G}x{G}")
        m = interleaved(_train_step(q, k, v, bank.dense(kind, L, "cpu")), _train_step(q, k, v), repeats)
        res[f"train_mask_over_causal_{G}" + ("" if kind == "row" else f"_{kind}")] = _r(m["ratio"])
        ms[kind] = {"mask": _r(1e3 * m["a_s"]), "causal": _r(1e3 * m["b_s"]), "ratio_range": [_r(m["lo"]), _r(m["hi"])]}
        bar.update(1)
    res[f"train_ms_{G}"] = ms
    return res


def _flex_warm(q, k, v, kind: str, bank: MaskBank) -> tuple[torch.Tensor, float]:
    """The first flex call (it compiles), its seconds, and whether flex really ran: `attend` falls back to
    SDPA when flex fails, and says so in bank.flex_failed, which the caller checks."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning: the caller records the reason instead
        out = attend(q, k, v, kind, bank, impl="flex")
    return out, time.perf_counter() - t0


def _flex_ratios(T: int, G: int, n_head: int, repeats: int, compile_flex: bool, bar) -> dict:
    """CPU inference: compiled flex (row, transposed column) against dense causal SDPA and SDPA + mask."""
    L = T + G * G
    bank = MaskBank(T, G, _kernel(G), compile_flex=compile_flex)
    q, k, v = _qkv(n_head, L, "cpu")
    res: dict = {"flex_compiled": compile_flex, "flex_block": BLOCK_CPU}
    with torch.no_grad():
        compile_s, diff = 0.0, 0.0
        for kind in ("row", "column"):
            bar.set_description(f"flex compile {kind}")
            out, s = _flex_warm(q, k, v, kind, bank)
            if bank.flex_failed:
                return {"flex": f"unavailable: {bank.flex_failed}"}
            compile_s += s
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bank.dense(kind, L, "cpu"))
            diff = max(diff, float((out - ref).abs().max()))
        if not diff < FLEX_TOL:
            raise AssertionError(f"FlexAttention and SDPA differ by {diff:.3g} (> {FLEX_TOL}) on the same mask: "
                                 "a bug in the BlockMask or the transposed layout, please report it")
        res.update(flex="available", flex_compile_seconds=round(compile_s, 2), flex_max_abs_diff=_r(diff))

        def causal():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def flex(kind):
            return lambda: attend(q, k, v, kind, bank, impl="flex")

        row_mask = bank.dense("row", L, "cpu")
        pairs = {  # key: (A, B, names of A and B in the ms dict)
            f"flex_row_over_causal_{G}": (flex("row"), causal, "flex_row", "causal"),
            f"flex_colT_over_causal_{G}": (flex("column"), causal, "flex_colT", "causal"),
            f"flex_over_sdpa_mask_{G}": (flex("row"), lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=row_mask), "flex_row", "sdpa_row_mask"),
        }
        ms = {}
        for key, (fa, fb, name_a, name_b) in pairs.items():
            bar.set_description(key)
            m = interleaved(fa, fb, repeats)
            res[key] = _r(m["ratio"])
            ms[key] = {name_a: _r(1e3 * m["a_s"]), name_b: _r(1e3 * m["b_s"]), "ratio_range": [_r(m["lo"]), _r(m["hi"])]}
            bar.update(1)
    if bank.flex_failed:  # failed later than the warm-up (it should not): the ratios above timed SDPA
        return {"flex": f"unavailable: {bank.flex_failed}"}
    res[f"forward_ms_{G}"] = ms
    return res


def _gpu_ratios(T: int, G: int, repeats: int, compile_flex: bool, bar) -> dict:
    """GPU inference in bf16: SDPA + boolean mask time / flex time (row, transposed column)."""
    dev = torch.device("cuda")
    L = T + G * G
    bank = MaskBank(T, G, _kernel(G), compile_flex=compile_flex)
    q, k, v = _qkv(GPU_HEADS, L, dev, torch.bfloat16)
    res: dict = {"gpu_device": torch.cuda.get_device_name(dev), "gpu_heads": GPU_HEADS, "gpu_dtype": "bfloat16"}
    ms, diff = {}, 0.0
    with torch.no_grad():
        for kind, name in (("row", "row"), ("column", "colT")):
            bar.set_description(f"gpu flex {name}")
            out, _ = _flex_warm(q, k, v, kind, bank)
            if bank.flex_failed:
                return {**res, "gpu_flex": f"unavailable: {bank.flex_failed}"}
            mask = bank.dense(kind, L, dev)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            diff = max(diff, float((out.float() - ref.float()).abs().max()))

            def sdpa(mask=mask):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            def flex(kind=kind):
                return attend(q, k, v, kind, bank, impl="flex")

            m = interleaved(sdpa, flex, repeats, sync=torch.cuda.synchronize)  # SDPA / flex: a speedup
            res[f"gpu_flex_{name}_speedup_{G}"] = _r(m["ratio"])
            ms[name] = {"sdpa_mask": _r(1e3 * m["a_s"]), "flex": _r(1e3 * m["b_s"]), "ratio_range": [_r(m["lo"]), _r(m["hi"])]}
            bar.update(1)
    if not diff < GPU_TOL:
        raise AssertionError(f"FlexAttention and SDPA differ by {diff:.3g} (> {GPU_TOL}) in bf16 on the GPU")
    if bank.flex_failed:
        return {**res, "gpu_flex": f"unavailable: {bank.flex_failed}"}
    res.update(gpu_flex_max_abs_diff=_r(diff), **{f"gpu_forward_ms_{G}": ms})
    return res


def _blocks(T: int, G: int, block: int) -> dict:
    """block_counts for every kind, raster and transposed, without the tiles tensor (JSON only).

    Example: _blocks(256, 32, 128)["row"]["raster"] -> {"touched": 34, "full": ..., "causal": 55, ...}
    """
    def counts(kind, transposed):
        c = block_counts(kind, T, G, _kernel(G), block, transposed)
        return {key: (_r(val) if isinstance(val, float) else val) for key, val in c.items() if key != "tiles"}
    return {kind: {"raster": counts(kind, False), "transposed": counts(kind, True)} for kind in KINDS}


def check_targets(res: dict) -> dict:
    """Each target of TARGETS with the measured value and whether it was met (None: not measured here,
    or measured on uncompiled flex, which is not what the flex targets are about).

    Example: check_targets({"train_mask_over_causal_32": 1.5})["train_mask_over_causal_32"]
             -> {"target": "<= 1.7", "value": 1.5, "met": True}
    """
    out = judge_targets(res, TARGETS)
    if res.get("flex_compiled") is False:
        for key in out:
            if key.startswith("flex_"):
                out[key]["met"] = None
    return out


def benchmark_attention(threads: int = 1, repeats: int = 7, compile_flex: bool = True,
                        layouts=((256, 32), (32, 16)), n_head: int = 4, progress: bool = True) -> dict:
    """Time the masks both ways against dense causal (see the module docstring) on `threads` CPU
    threads (restored afterwards). layouts: (text_len, grid) pairs; each gives train_* keys named after
    its grid, and the largest (most tokens) also gives the flex_* and blocks_* keys, named after its
    grid. Returns plain JSON: ratios, ms, block counts, and `targets` (check_targets).

    Example: benchmark_attention() -> {"train_mask_over_causal_32": 1.4, "train_mask_over_causal_16": 1.1,
             "flex_row_over_causal_32": 0.75, ..., "targets": {...}, "threads": 1, "torch": "2.13.0"}
    """
    from tqdm.auto import tqdm

    layouts = [tuple(int(x) for x in lay) for lay in layouts]
    if not layouts or any(T < 1 or G < 1 for T, G in layouts):
        raise ConfigError(f"layouts={layouts} is invalid: give (text_len, grid) pairs, both >= 1")
    if repeats < 1 or threads < 1 or n_head < 1:
        raise ConfigError(f"repeats={repeats}, threads={threads}, n_head={n_head}: each must be >= 1")
    T32, G32 = max(layouts, key=lambda lay: lay[0] + lay[1] ** 2)  # the flex layout
    ok, why = flex_available()
    cuda = torch.cuda.is_available()
    steps = 3 * len(layouts) + 3 * ok + 2 * (ok and cuda)
    res: dict = {"threads": threads, "torch": torch.__version__, "head_dim": HEAD_DIM, "n_head": n_head,
                 "batch": 1, "repeats": repeats,
                 "layouts": [{"text_len": T, "grid": G, "length": T + G * G, "kernel": _kernel(G)}
                             for T, G in layouts],
                 "ratio_method": "median of per-repeat ratios; A and B timed back to back, order alternating"}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tqdm(total=steps, desc="attention", disable=not progress) as bar:
            for T, G in layouts:
                res.update(_train_ratios(T, G, n_head, repeats, bar))
            if ok:
                res.update(_flex_ratios(T32, G32, n_head, repeats, compile_flex, bar))
            else:
                res["flex"] = f"unavailable: {why}"
            if not cuda:
                res["gpu"] = "no CUDA device here"
            elif not ok:
                res["gpu"] = f"a CUDA device, but FlexAttention is unavailable: {why}"
            else:
                res.update(_gpu_ratios(T32, G32, repeats, compile_flex, bar))
            bar.update(steps - bar.n)  # steps skipped when flex is unavailable
    finally:
        torch.set_num_threads(old_threads)
    res[f"blocks_128_{G32}"] = _blocks(T32, G32, 128)
    res[f"blocks_{BLOCK_CPU}_{G32}"] = _blocks(T32, G32, BLOCK_CPU)  # the block flex uses on CPU
    res["targets"] = check_targets(res)
    return res


def _range(ms: dict) -> str:
    """The per-repeat ratios' range, for the report.

    Example: _range({"ratio_range": [0.7, 0.9]}) -> "repeats 0.7-0.9"
    """
    lo, hi = ms.get("ratio_range", (None, None))
    return "" if lo is None else f"repeats {lo}-{hi}"


def format_attention_benchmark(r: dict) -> str:
    """`benchmark_attention`'s result as a short text report: each ratio with its target, ✓ / ✗."""
    targets = r["targets"]

    def line(key: str, ms: str = "") -> str:
        t = targets.get(key)
        mark = "" if t is None else {True: "  ✓", False: "  ✗", None: "  (target not judged)"}[t["met"]]
        aim = f"  target {t['target']}" if t else "  (information)"
        return f"  {key:<34} {r[key]:>7.3f}{aim}{mark}{ms}"

    lines = [f"attention benchmark: torch {r['torch']}, {r['threads']} thread(s), batch 1, {r['n_head']} heads "
             f"of {r['head_dim']}, {r['repeats']} interleaved repeats ({r['ratio_method']})",
             "training, SDPA + boolean mask over dense causal SDPA (forward + backward):"]
    for lay in r["layouts"]:
        G = lay["grid"]
        for kind in KINDS:
            key = f"train_mask_over_causal_{G}" + ("" if kind == "row" else f"_{kind}")
            ms = r[f"train_ms_{G}"][kind]
            lines.append(line(key, f"   ({kind} {ms['mask']} ms vs causal {ms['causal']} ms, L={lay['length']}; "
                                   f"{_range(ms)})"))
    G = max(r["layouts"], key=lambda lay: lay["length"])["grid"]
    if r.get("flex") == "available":
        compiled = "compiled" if r["flex_compiled"] else "NOT compiled (eager)"
        lines.append(f"inference on CPU, FlexAttention ({compiled}, block {r['flex_block']}) over SDPA:")
        for key, ms in r[f"forward_ms_{G}"].items():
            times = " vs ".join(f"{n} {v} ms" for n, v in ms.items() if n != "ratio_range")
            lines.append(line(key, f"   ({times}; {_range(ms)})"))
        first = "compile" if r["flex_compiled"] else "first calls"
        lines.append(f"  flex {first} {r['flex_compile_seconds']} s (row + column, not in the ratios); "
                     f"flex vs SDPA max |diff| {r['flex_max_abs_diff']:.2g}")
    else:
        lines.append(f"FlexAttention: {r['flex']}")
    if "gpu" in r:
        lines.append(f"GPU: {r['gpu']}")
    elif "gpu_flex" in r:
        lines.append(f"GPU ({r['gpu_device']}): flex {r['gpu_flex']}")
    else:
        lines.append(f"inference on {r['gpu_device']} ({r['gpu_dtype']}, {r['gpu_heads']} heads), "
                     "SDPA + mask time / flex time:")
        for name in ("row", "colT"):
            ms = r[f"gpu_forward_ms_{G}"][name]
            lines.append(line(f"gpu_flex_{name}_speedup_{G}",
                              f"   (sdpa {ms['sdpa_mask']} ms vs flex {ms['flex']} ms; {_range(ms)})"))
    for block in sorted({128, r.get("flex_block", BLOCK_CPU)}, reverse=True):
        counts = r.get(f"blocks_{block}_{G}")
        if counts:
            cells = ", ".join(f"{kind} {c['raster']['touched']} (transposed {c['transposed']['touched']})"
                              for kind, c in counts.items())
            first = next(iter(counts.values()))["raster"]
            lines.append(f"{block}x{block} blocks touched at grid {G}: {cells}; dense causal "
                         f"{first['causal']} of {first['total']}")
    return "\n".join(lines)

