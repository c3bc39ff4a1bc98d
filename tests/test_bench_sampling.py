"""Tests for minidalle.bench.sampling: the benchmark's plumbing, not the speed it measures.

Speed is for `python -m minidalle bench sampling`, not for unit tests on a shared 2-core box, so these
run tiny models (the smoke preset's in the toy's place, a 2-layer d_model 16 one in the big ones')
with short samples and check the shape of the result: every key is there, positive, finite, plain
JSON; targets are judged against the numbers measured; a pair whose samplers disagree is reported and
fails its target; a compiler or a reranker that cannot run is reported, not raised.
"""

import json
import math
import sys

import pytest
import torch

from minidalle.bench import sampling as sb
from minidalle.bench import tools as benchtools
from minidalle.cli.main import main
from minidalle.config import TransformerConfig, get_config
from minidalle.model import DALLE, Layout

SMOKE = get_config("smoke")
TINY = (TransformerConfig(n_layer=2, n_head=2, head_dim=8, conv_kernel=3), Layout(8, 64, 4, 32))
TINY_MODELS = {"toy": (SMOKE.model, Layout.from_config(SMOKE)), "l8d512_16": TINY, "l8d512_32": TINY}
FAST = dict(threads=1, compile=False, repeats=2, big_repeats=2, cells=3, bandwidth_mb=8, rerank_n=4, progress=False)


def numbers(tree):
    """Every int and float in a nested dict / list (bools excluded)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.fixture
def tiny_setup(monkeypatch):
    monkeypatch.setattr(sb, "MODELS", TINY_MODELS)
    monkeypatch.setattr(benchtools, "MIN_SAMPLE_S", 0.002)  # short samples: figures, not precise ones
    monkeypatch.setattr(sb, "RERANK_PRESET", "smoke")  # its dVAE and reranker read the smoke model's 4x4 codes


@pytest.fixture(scope="module")
def tiny():
    """One tiny run, shared: the thread count after it, and the result."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the benchmark's 1, so that restoring it is visible
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sb, "MODELS", TINY_MODELS)
            mp.setattr(benchtools, "MIN_SAMPLE_S", 0.002)
            mp.setattr(sb, "RERANK_PRESET", "smoke")
            res = sb.benchmark_sampling(**FAST)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return {"after": after, "res": res}


def test_tiny_run_has_every_figure_and_its_details(tiny):
    r = tiny["res"]
    for key, _, _ in sb.TARGETS:
        if key != "kv_speedup_toy_b1_compiled":
            assert key in r, key
    for key in ("cfg_batched_speedup_toy", "batch8_per_image_speedup_toy", "kv", "cfg", "batch", "roofline",
                "rerank", "tokens_equal", "models", "method", "targets", "threads", "torch", "seconds", "part_seconds"):
        assert key in r, key
    assert r["compiled"] == "skipped (--no-compile)" and "compile_seconds_toy" not in r
    assert list(r["part_seconds"]) == ["kv_speedup_toy_b1", "kv_speedup_l8d512_16_b1", "kv_speedup_l8d512_16_b8",
                                       "kv_speedup_l8d512_32_b1", "cfg_batched_speedup", "batch8_per_image_speedup",
                                       "cfg_batched_speedup_toy", "batch8_per_image_speedup_toy", "roofline_fraction",
                                       "rerank_time_fraction"]
    assert r["threads"] == 1 and r["torch"] == torch.__version__
    assert r["models"]["toy"]["d_model"] == 32 and r["models"]["l8d512_16"]["params"] < 25_000_000  # what ran
    assert r["kv"]["kv_speedup_toy_b1"]["method"] == "full runs"
    for key in ("kv_speedup_l8d512_16_b1", "kv_speedup_l8d512_16_b8", "kv_speedup_l8d512_32_b1"):
        info = r["kv"][key]
        assert info["method"].startswith("steps: 3 of the 16 steps") and info["cells"] == [0, 8, 15]
        assert info["teacher_forced_mismatches"] == 0 and info["max_abs_logit_diff"] < 1e-4
        assert info["cached_full_run_s"] > 0
    assert all(r["tokens_equal"].values()) and set(r["tokens_equal"]) == {
        "kv_speedup_toy_b1", "kv_speedup_l8d512_16_b1", "kv_speedup_l8d512_16_b8", "kv_speedup_l8d512_32_b1",
        "cfg_batched_speedup", "cfg_batched_speedup_toy"}
    assert r["cfg"]["cfg_batched_speedup"]["model"] == "l8d512_16" and r["cfg"]["cfg_batched_speedup"]["guidance"] == 3
    f = r["roofline"]
    assert f["weight_bytes_per_step"] == 4 * f["params_read_per_step"] and 0 < f["kv_bytes_per_step"]
    assert f["steps"] == 15 and f["bandwidth_gbs"] == max(f["bandwidth_gbs_sum"], f["bandwidth_gbs_gemv"]) > 0
    assert r["roofline_fraction_sum"] >= r["roofline_fraction"]  # the slower probe: a looser bound
    assert r["rerank"]["n"] == 4 and r["rerank"]["preset"] == "smoke"
    if torch.cuda.is_available():
        assert "gpu_toy_images_per_s_n64_bf16" in r
    else:
        assert r["gpu"] == "no CUDA device here" and not any(key.startswith("gpu_") for key in r)


def test_tiny_run_figures_are_positive_finite_json(tiny):
    r = tiny["res"]
    figures = [r[key] for key in r if key.startswith(("kv_speedup", "cfg_batched", "batch8", "roofline_fraction",
                                                       "rerank_time_fraction")) and not isinstance(r[key], dict)]
    assert len(figures) == 4 + 2 + 2 + 2 + 1  # kv, cfg, batch8, roofline (and with sum alone), rerank
    assert all(x > 0 and math.isfinite(x) for x in figures)
    assert all(math.isfinite(x) and x >= 0 for x in numbers(r))
    assert json.loads(json.dumps(r, allow_nan=False)) == r
    for group in ("kv", "cfg", "batch"):
        for info in r[group].values():
            lo, hi = info["ratio_range"]
            assert lo <= hi


def test_thread_count_is_restored(tiny):
    assert tiny["after"] == 2


def test_targets_are_judged_on_the_measured_numbers(tiny):
    targets = tiny["res"]["targets"]
    assert list(targets) == [key for key, _, _ in sb.TARGETS]
    for key, t in targets.items():
        if t["value"] is not None:
            assert t["value"] == tiny["res"][key]
    assert targets["kv_speedup_toy_b1_compiled"]["met"] is None  # not measured: not judged
    assert targets["roofline_fraction"]["met"] is None  # a tiny model: measured, not judged
    # Each side of each threshold.
    above = {"kv_speedup_toy_b1": 5.0, "kv_speedup_l8d512_16_b1": 8.1, "kv_speedup_l8d512_16_b8": 25.0,
             "kv_speedup_l8d512_32_b1": 31.0, "cfg_batched_speedup": 1.2, "batch8_per_image_speedup": 3.0,
             "roofline_fraction": 0.5, "rerank_time_fraction": 0.05, "roofline": {"params": 26_000_000}}
    below = {"kv_speedup_toy_b1": 4.9, "kv_speedup_l8d512_16_b1": 7.9, "kv_speedup_l8d512_16_b8": 24.0,
             "kv_speedup_l8d512_32_b1": 29.0, "cfg_batched_speedup": 1.1, "batch8_per_image_speedup": 2.9,
             "roofline_fraction": 0.39, "rerank_time_fraction": 0.06, "roofline": {"params": 26_000_000}}
    good, bad = sb.check_targets(above), sb.check_targets(below)
    for key in above:
        if key != "roofline":
            assert good[key]["met"] is True and bad[key]["met"] is False, key
    assert good["cfg_batched_speedup"] == {"target": ">= 1.15", "value": 1.2, "met": True}
    assert bad["rerank_time_fraction"]["target"] == "<= 0.05"
    small = sb.check_targets({"roofline_fraction": 0.9, "roofline": {"params": 1_000_000}})
    assert small["roofline_fraction"]["met"] is None and "25,000,000" in small["roofline_fraction"]["note"]


def test_a_figure_whose_samplers_disagree_fails_its_target():
    judged = sb.check_targets({"kv_speedup_toy_b1": 9.0, "tokens_equal": {"kv_speedup_toy_b1": False}})
    t = judged["kv_speedup_toy_b1"]
    assert t["met"] is False and t["valid"] is False and "different greedy codes" in t["note"]
    assert "✗" in sb._mark(t)


def test_compare_codes_names_the_first_mismatch():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert sb.compare_codes(a, a.clone()) == {"tokens_equal": True, "mismatches": 0}
    b = a.clone()
    b[1, 2] = 0
    b[1, 1] = 0
    assert sb.compare_codes(a, b) == {"tokens_equal": False, "mismatches": 2, "first_mismatch": [1, 1]}
    assert sb.compare_codes(a, a[:, :2])["tokens_equal"] is False


def _tiny_model():
    torch.manual_seed(0)
    return DALLE(*TINY).eval()


def test_a_reference_that_draws_other_codes_is_reported(tiny_setup, monkeypatch):
    real = sb.sample_reference

    def off_by_one(model, text, *args, **kwargs):  # a broken sampler: every code moved by one
        return (real(model, text, *args, **kwargs) + 1) % model.layout.image_vocab

    monkeypatch.setattr(sb, "sample_reference", off_by_one)
    model = _tiny_model()
    res = sb._kv_pairs(lambda name: model, (("toy", 1, "full"),), 1, 1, 3, 1, 0)
    info = res["kv"]["kv_speedup_toy_b1"]
    assert res["tokens_equal"] == {"kv_speedup_toy_b1": False}
    assert info["tokens_equal"] is False and info["mismatches"] == 16 and info["first_mismatch"] == [0, 0]
    text = sb.format_sampling_benchmark({**_minimal_result(), "kv_speedup_toy_b1": res["kv_speedup_toy_b1"],
                                         "kv": res["kv"], "tokens_equal": res["tokens_equal"],
                                         "targets": sb.check_targets({**res, "tokens_equal": res["tokens_equal"]})})
    assert "CODES DIFFER (16 mismatches" in text


def test_the_stepped_check_catches_a_reference_that_disagrees(tiny_setup, monkeypatch):
    model = _tiny_model()
    real = model.next_image_logits

    def shifted(text, image):  # the reference's logits rolled by one code: another argmax every step
        return real(text, image).roll(1, dims=-1)

    monkeypatch.setattr(model, "next_image_logits", shifted)
    res = sb._kv_pairs(lambda name: model, (("l8d512_16", 1, "steps"),), 1, 1, 3, 1, 0)
    info = res["kv"]["kv_speedup_l8d512_16_b1"]
    assert info["tokens_equal"] is False and res["tokens_equal"]["kv_speedup_l8d512_16_b1"] is False
    assert info["mismatches"] > 0 and info["teacher_forced_mismatches"] == 3  # all 3 timed steps


def test_mismatch_warns_in_the_whole_benchmark(tiny_setup, monkeypatch):
    monkeypatch.setattr(sb, "KV_PAIRS", (("toy", 1, "full"),))
    real = sb.sample_reference
    def flipped(model, text, *args, **kwargs):  # every code changed
        return (real(model, text, *args, **kwargs) + 1) % model.layout.image_vocab

    monkeypatch.setattr(sb, "sample_reference", flipped)
    with pytest.warns(UserWarning, match="different greedy codes in kv_speedup_toy_b1"):
        r = sb.benchmark_sampling(**FAST)
    assert r["targets"]["kv_speedup_toy_b1"]["valid"] is False


def test_a_compile_that_fails_is_reported_not_raised(monkeypatch):
    real = sb.sample

    def no_compiler(*args, compile=False, **kwargs):
        if compile:
            raise RuntimeError("no C++ compiler found")
        return real(*args, **kwargs)

    monkeypatch.setattr(sb, "sample", no_compiler)
    out = sb._compiled_pair(_tiny_model(), 1, 0)
    assert out == {"compiled": "unavailable: RuntimeError: no C++ compiler found"}


def test_a_reranker_that_cannot_be_used_is_reported(monkeypatch):
    import minidalle

    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "minidalle.clip", None)  # `from . import clip` raises ImportError ...
        mp.delattr(minidalle, "clip", raising=False)  # ... also once another test has imported it
        torch.manual_seed(0)
        out = sb._rerank(DALLE(*TINY_MODELS["toy"]).eval(), "smoke", 2, 1, 0)
    assert list(out) == ["rerank"]
    assert out["rerank"].startswith(("unavailable: ImportError", "unavailable: ModuleNotFoundError"))
    # A model whose codes the preset's dVAE cannot decode is refused the same way.
    out = sb._rerank(_tiny_model(), "toy", 2, 1, 0)
    assert out["rerank"].startswith("unavailable: ConfigError") and "cannot decode" in out["rerank"]


def test_integration_and_cells():
    assert sb._cells(256, 5) == [0, 64, 128, 191, 255]
    assert sb._cells(4, 9) == [0, 1, 2, 3] and sb._cells(1, 9) == [0]
    assert sb._integrate([0, 10], [1.0, 2.0], 0, 10) == pytest.approx(16.5)
    assert sb._integrate([5], [2.0], 1, 4) == pytest.approx(8.0)  # flat past the ends
    assert sb._integrate([0, 1], [1.0, 1.0], 3, 2) == 0.0


def _minimal_result():
    return {"torch": torch.__version__, "threads": 1, "repeats": 1, "big_repeats": 1, "ratio_method": "m",
            "seconds": 1.0, "models": {}, "kv": {}, "cfg": {}, "batch": {}, "tokens_equal": {},
            "gpu": "no CUDA device here", "rerank": "unavailable: ImportError: x"}


def test_report_names_each_figure(tiny):
    text = sb.format_sampling_benchmark(tiny["res"])
    for key in ("kv_speedup_toy_b1", "kv_speedup_l8d512_16_b8", "kv_speedup_l8d512_32_b1", "cfg_batched_speedup",
                "batch8_per_image_speedup", "roofline_fraction", "rerank_time_fraction", "codes equal",
                "3 steps integrated", "skipped (--no-compile)", "GPU: no CUDA device here"):
        assert key in text, key


def test_report_with_compiled_and_gpu_figures():
    # No compile and no GPU in CI: their lines are checked on a result made up in their shape.
    r = {**_minimal_result(), "kv_speedup_toy_b1_compiled": 6.0, "compile_seconds_toy": 50.0,
         "kv": {"kv_speedup_toy_b1_compiled": {"method": "full runs", "reference_s": 0.3, "cached_compiled_s": 0.05,
                                               "ratio_range": [5.5, 6.5], "tokens_equal": True}}}
    del r["gpu"]
    r.update(gpu_device="Fake GPU", gpu_dtype="bfloat16", gpu_toy_images_per_s_n64_bf16=300.0,
             gpu_toy_images_per_s_n64_bf16_compiled=900.0)
    r["targets"] = sb.check_targets(r)
    text = sb.format_sampling_benchmark(r)
    assert "Fake GPU" in text and "gpu_toy_images_per_s_n64_bf16_compiled 900.0" in text
    assert "compile of the toy decode step" in text and "50.0 s" in text
    assert any("kv_speedup_toy_b1_compiled" in line and "✓" in line for line in text.splitlines())
    assert "unavailable: ImportError" in text


def test_bad_arguments_are_config_errors():
    from minidalle.errors import ConfigError

    with pytest.raises(ConfigError):
        sb.benchmark_sampling(threads=0, progress=False)
    with pytest.raises(ConfigError, match="method"):
        sb._kv_pairs(lambda name: _tiny_model(), (("toy", 1, "sometimes"),), 1, 1, 3, 1, 0)


def test_cli_help_and_a_tiny_json_run(tiny_setup, monkeypatch, capsys):
    assert main(["bench", "sampling", "--help"]) == 0
    assert "--no-compile" in capsys.readouterr().out
    for name, value in (("REPEATS", 1), ("BIG_REPEATS", 1), ("CELLS", 2), ("BANDWIDTH_MB", 4), ("RERANK_N", 2)):
        monkeypatch.setattr(sb, name, value)
    assert main(["bench", "sampling", "--no-compile", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # --json: only the JSON line
    r = json.loads(lines[0])
    assert r["compiled"] == "skipped (--no-compile)" and r["repeats"] == 1 and "kv_speedup_toy_b1" in r
    assert r["kv"]["kv_speedup_l8d512_32_b1"]["cells"] == [0, 15]
