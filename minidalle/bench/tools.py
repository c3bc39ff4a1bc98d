"""What the benchmarks share: timing A against B on a busy machine, and judging figures against targets.

    m = alternate(fa, fb, repeats=7, calls=(na, nb))        # {"ratio": median fa/fb, "lo", "hi", "a_s", "b_s"}
    judged = judge_targets({"x": 1.3}, (("x", ">=", 1.2),))  # {"x": {"target": ">= 1.2", "value": 1.3, "met": True}}

On a shared 2-core machine absolute times are noise; a ratio of two timings taken back to back,
alternating which goes first, is not, since a burst of another job's work hits both sides.
"""

from __future__ import annotations

import math
import statistics
import time




def per_call(fn, calls: int, sync=None) -> float:
    """Seconds per call of fn over `calls` calls in a row (sync: waits for the GPU before reading the clock)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / calls


def calls_for(seconds: float, min_sample: float, max_calls: int) -> int:
    """Calls in a row that make one sample last min_sample, given one call's seconds.
    Example: calls_for(0.03, 0.1, 1000) -> 4"""
    return max(1, min(max_calls, math.ceil(min_sample / max(seconds, 1e-9))))


def alternate(fa, fb, repeats: int, calls: tuple[int, int], sync=None, done=()) -> dict:
    """Time fa and fb back to back `repeats` times, alternating which goes first (AB, BA, AB, ...).

    calls: calls of each per sample. done: (a seconds, b seconds) repeats already measured (they count
    first). Returns the median of the per-repeat ratios fa / fb (`ratio`), their range (`lo`, `hi`: how
    noisy the machine was) and the median seconds per call of each (`a_s`, `b_s`).
    Example: alternate(slow, fast, 5, (2, 8)) -> {"ratio": 2.0, "lo": 1.9, "hi": 2.2, "a_s": 0.02, "b_s": 0.01}
    """
    ta, tb = [a for a, _ in done], [b for _, b in done]
    for i in range(len(done), repeats):
        if i % 2 == 0:
            a, b = per_call(fa, calls[0], sync), per_call(fb, calls[1], sync)
        else:
            b, a = per_call(fb, calls[1], sync), per_call(fa, calls[0], sync)
        ta.append(a)
        tb.append(b)
    ratios = [a / b for a, b in zip(ta, tb)]
    return {"ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
            "a_s": statistics.median(ta), "b_s": statistics.median(tb)}


MIN_SAMPLE_S = 0.1  # one timed sample lasts at least this long (several calls in a row when one is fast)
MAX_CALLS = 1000  # ... but never more calls than this in one sample


def warm_then_time(fn, sync=None) -> float:
    """Seconds of one call of fn after a first, untimed call (allocations, lazy init, a compile)."""
    fn()
    return per_call(fn, 1, sync)


def interleaved(fa, fb, repeats: int, first: tuple[float, float] | None = None, sync=None,
                long_run: float | None = None) -> dict:
    """Time fa and fb back to back `repeats` times, alternating which goes first (`alternate`), each
    sample MIN_SAMPLE_S of calls in a row. What every benchmark's A-against-B figure comes from.

    first: the seconds of one call of each (A, B), to size the samples; None: measured here, each
    function warmed by one call first. long_run: when both first calls lasted this long or more, a
    warm-up had nothing left to warm and they count as the first (AB) repeat.
    Returns `alternate`'s {"ratio", "lo", "hi", "a_s", "b_s"}.
    Example: interleaved(slow, fast, 5) -> {"ratio": 2.0, "lo": 1.9, "hi": 2.2, "a_s": 0.02, "b_s": 0.01}
    """
    if first is None:
        first = (warm_then_time(fa, sync), warm_then_time(fb, sync))
    done = [first] if long_run is not None and min(first) >= long_run else []
    calls = tuple(calls_for(t, MIN_SAMPLE_S, MAX_CALLS) for t in first)
    return alternate(fa, fb, repeats, calls, sync, done)


def rounded(x: float, digits: int = 3) -> float:
    """A float rounded to `digits` significant digits, for the JSON. Example: rounded(0.0123456) -> 0.0123"""
    return float(f"{x:.{digits}g}")


def judge_targets(res: dict, targets) -> dict:
    """Each target (key, "<=" or ">=", bound) with the measured value and whether it was met (None: not
    measured in this run). Example: judge_targets({"x": 1.3}, (("x", ">=", 1.2),))["x"]["met"] -> True"""
    out = {}
    for key, op, bound in targets:
        value = res.get(key)
        met = None if value is None else bool(value <= bound if op == "<=" else value >= bound)
        out[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return out


