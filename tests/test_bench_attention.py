"""Tests for minidalle.bench.attention: the benchmark's plumbing, not the speed it measures.

Speed is for `python -m minidalle bench attention`, not for unit tests on a shared 2-core CI box, so
these run a tiny layout with eager flex and check the shape of the result: the keys are there and
named after the grid measured, every figure is positive and finite, it is plain JSON, the targets are
judged, the thread count comes back, and a FlexAttention that cannot run is reported, not raised.
"""

import json
import math

import pytest
import torch

from minidalle import attention
from minidalle.bench import attention as attention_bench
from minidalle.bench.attention import TARGETS, benchmark_attention, check_targets, format_attention_benchmark
from minidalle.bench import tools as benchtools

TINY = ((8, 4),)  # 8 text tokens + a 4x4 grid: 24 tokens, kernel 3


def numbers(tree):
    """Every int and float in a nested dict / list (bools excluded)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.fixture(scope="module")
def tiny():
    """One tiny run, shared: the thread count before and after, and the result. Eager flex's first
    call traces (a few seconds, once per process), so the tests share it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the benchmark's 1, so that restoring it is visible
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(benchtools, "MIN_SAMPLE_S", 0.005)  # short samples: figures, not precise ones
            res = benchmark_attention(threads=1, repeats=2, compile_flex=False, layouts=TINY, progress=False)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return {"after": after, "res": res}


def test_tiny_run_has_its_keys_named_after_its_grid(tiny):
    r = tiny["res"]
    for key in ("train_mask_over_causal_4", "train_mask_over_causal_4_column", "train_mask_over_causal_4_conv",
                "flex_row_over_causal_4", "flex_colT_over_causal_4", "flex_over_sdpa_mask_4",
                "flex_compile_seconds", "flex_max_abs_diff", "train_ms_4", "forward_ms_4",
                "blocks_128_4", f"blocks_{attention.BLOCK_CPU}_4", "threads", "torch", "head_dim", "targets"):
        assert key in r, key
    assert r["flex"] == "available" and r["flex_compiled"] is False
    assert r["threads"] == 1 and r["head_dim"] == 64 and r["torch"] == torch.__version__
    assert "train_mask_over_causal_32" not in r  # not measured: no key pretends it was
    assert r["flex_max_abs_diff"] < 1e-4
    for kind in attention.KINDS:
        assert set(r["train_ms_4"][kind]) == {"mask", "causal", "ratio_range"}
        lo, hi = r["train_ms_4"][kind]["ratio_range"]
        assert lo <= r["train_mask_over_causal_4" + ("" if kind == "row" else f"_{kind}")] <= hi
        assert set(r["blocks_128_4"][kind]) == {"raster", "transposed"}
        assert "tiles" not in r["blocks_128_4"][kind]["raster"]  # a tensor: JSON only
    if torch.cuda.is_available():
        assert "gpu_flex_row_speedup_4" in r and "gpu_device" in r
    else:
        assert r["gpu"] == "no CUDA device here" and not any(key.startswith("gpu_") for key in r)


def test_tiny_run_figures_are_positive_finite_json(tiny):
    r = tiny["res"]
    ratios = [v for key, v in r.items() if "_over_" in key or "_speedup_" in key]
    assert len(ratios) == 6 + 2 * torch.cuda.is_available()
    assert all(x > 0 and math.isfinite(x) for x in ratios + numbers(r["train_ms_4"]) + numbers(r["forward_ms_4"]))
    assert all(math.isfinite(x) and x >= 0 for x in numbers(r))
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_thread_count_is_restored(tiny):
    assert tiny["after"] == 2


def test_targets_are_listed_and_judged(tiny):
    targets = tiny["res"]["targets"]
    assert list(targets) == [key for key, _, _ in TARGETS]
    for t in targets.values():
        assert t["met"] in (True, False, None)
        assert (t["met"] is None) == (t["value"] is None)  # tiny grid: none measured, none judged
    judged = check_targets({"train_mask_over_causal_32": 1.5, "train_mask_over_causal_16": 1.3,
                            "flex_compiled": True, "flex_row_over_causal_32": 0.8, "flex_over_sdpa_mask_32": 0.6,
                            "gpu_flex_row_speedup_32": 2.0, "gpu_flex_colT_speedup_32": 1.2})
    assert {key: t["met"] for key, t in judged.items()} == {
        "train_mask_over_causal_32": True, "train_mask_over_causal_16": False, "flex_row_over_causal_32": True,
        "flex_colT_over_causal_32": None, "flex_over_sdpa_mask_32": False, "gpu_flex_row_speedup_32": True,
        "gpu_flex_colT_speedup_32": False}
    assert judged["train_mask_over_causal_32"]["target"] == "<= 1.7"
    # Eager flex is not what the flex targets are about: measured, but not judged.
    eager = check_targets({"flex_compiled": False, "flex_row_over_causal_32": 0.5})
    assert eager["flex_row_over_causal_32"] == {"target": "<= 0.8", "value": 0.5, "met": None}


def test_report_names_each_ratio(tiny):
    text = format_attention_benchmark(tiny["res"])
    for key in ("train_mask_over_causal_4", "flex_row_over_causal_4", "flex_colT_over_causal_4",
                "flex_over_sdpa_mask_4", "128x128 blocks", "flex first calls"):
        assert key in text, key


def test_report_with_gpu_figures_and_met_targets(tiny):
    # No GPU in CI: the GPU lines are checked on a result made up in their shape.
    r = {key: v for key, v in tiny["res"].items() if key != "gpu"}
    r.update(gpu_device="Fake GPU", gpu_heads=16, gpu_dtype="bfloat16", gpu_flex_row_speedup_4=2.0,
             gpu_flex_colT_speedup_4=1.1, gpu_forward_ms_4={"row": {"sdpa_mask": 0.2, "flex": 0.1},
                                                            "colT": {"sdpa_mask": 0.2, "flex": 0.18}})
    r["targets"] = {"gpu_flex_row_speedup_4": {"target": ">= 1.5", "value": 2.0, "met": True},
                    "gpu_flex_colT_speedup_4": {"target": ">= 1.5", "value": 1.1, "met": False}}
    text = format_attention_benchmark(r)
    assert "Fake GPU" in text
    assert any("gpu_flex_row_speedup_4" in line and "✓" in line for line in text.splitlines())
    assert any("gpu_flex_colT_speedup_4" in line and "✗" in line for line in text.splitlines())


def test_flex_that_cannot_run_is_reported_not_raised(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(benchtools, "MIN_SAMPLE_S", 0.005)
    monkeypatch.setattr(attention, "_attend_flex", no_compiler)  # attend falls back and records why
    r = benchmark_attention(repeats=1, layouts=TINY, progress=False)
    assert r["flex"] == "unavailable: RuntimeError: no C++ compiler found"
    assert not any(key.startswith("flex_") for key in r)
    assert "train_mask_over_causal_4" in r and "FlexAttention: unavailable" in format_attention_benchmark(r)
    json.dumps(r, allow_nan=False)

    monkeypatch.setattr(attention_bench, "flex_available", lambda: (False, "FlexAttention is not in this torch"))
    r = benchmark_attention(repeats=1, layouts=TINY, progress=False)
    assert r["flex"] == "unavailable: FlexAttention is not in this torch"


def test_bad_arguments_are_config_errors():
    from minidalle.errors import ConfigError

    with pytest.raises(ConfigError):
        benchmark_attention(repeats=0, layouts=TINY, progress=False)
    with pytest.raises(ConfigError):
        benchmark_attention(layouts=((8, 0),), progress=False)
