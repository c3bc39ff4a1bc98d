"""The timing and target helpers every benchmark uses (bench/tools.py)."""

import itertools
import time

import torch

from minidalle.bench import tools as benchtools
from minidalle.bench.tools import alternate, calls_for, interleaved, judge_targets, rounded


def test_alternate_swaps_the_order_and_counts_repeats_already_done():
    order = []
    m = alternate(lambda: order.append("a"), lambda: order.append("b"), repeats=3, calls=(1, 2), done=[(1e9, 1.0)])
    assert order == ["b", "b", "a", "a", "b", "b"]  # repeat 1 is BA, repeat 2 AB; repeat 0 was given
    # the given ratio (1e9, beyond any measured one even on a busy machine) is among the three
    assert m["hi"] == 1e9 and m["lo"] < 1e9 and m["a_s"] < 1e9


def test_calls_for_and_rounded():
    assert calls_for(0.03, 0.1, 1000) == 4 and calls_for(0.0, 0.1, 50) == 50 and calls_for(5.0, 0.1, 50) == 1
    assert rounded(0.0123456) == 0.0123


def test_judge_targets_on_both_sides_of_the_bound():
    targets = (("up", ">=", 2.0), ("down", "<=", 0.5), ("absent", ">=", 1.0))
    judged = judge_targets({"up": 2.5, "down": 0.7}, targets)
    assert judged["up"]["met"] is True and judged["down"]["met"] is False and judged["absent"]["met"] is None
    assert judge_targets({"up": 1.9}, targets)["up"] == {"target": ">= 2.0", "value": 1.9, "met": False}


def test_choose_threads_takes_more_threads_only_when_they_pay(monkeypatch):
    from minidalle.infra import machine

    monkeypatch.setattr(machine, "available_cpus", lambda: 2)
    before = torch.get_num_threads()
    try:
        for rates, want in (({1: 30.0, 2: 58.0}, 2), ({1: 30.0, 2: 33.0}, 1), ({1: 30.0, 2: 8.0}, 1)):
            monkeypatch.setattr(machine, "matmul_gflops", lambda t, s, r=rates: r[t])
            info = machine.choose_threads()
            assert info["threads"] == want and torch.get_num_threads() == want
            assert info["gflops"] == rates[want] and f"{want} CPU thread" in info["line"]
    finally:
        torch.set_num_threads(before)


def test_matmul_gflops_measures_and_restores_the_thread_count():
    from minidalle.infra.machine import matmul_gflops

    before = torch.get_num_threads()
    assert matmul_gflops(1, 0.05) > 0.1  # any CPU multiplies faster than 0.1 GFLOP/s
    assert torch.get_num_threads() == before


def test_interleaved_warms_each_side_sizes_the_samples_and_alternates(monkeypatch):
    monkeypatch.setattr(benchtools, "MIN_SAMPLE_S", 0.02)
    calls = []

    def slow():
        calls.append("a")
        time.sleep(0.004)

    def fast():
        calls.append("b")
        time.sleep(0.001)

    m = interleaved(slow, fast, repeats=3)
    # 2 calls each to size the samples (a sample is MIN_SAMPLE_S of calls: about 5 of slow, 20 of
    # fast), then 3 repeats of one sample each, in the order AB, BA, AB.
    assert calls[:4] == ["a", "a", "b", "b"]
    assert [name for name, _ in itertools.groupby(calls[4:])] == ["a", "b", "a", "b"]  # a b|b a|a b
    assert calls[4:].count("b") > 2 * calls[4:].count("a")  # more calls of the faster in a sample
    assert m["ratio"] > 1.5 and m["a_s"] > m["b_s"] > 0


def test_interleaved_with_first_times_given_alternates_at_once(monkeypatch):
    monkeypatch.setattr(benchtools, "MIN_SAMPLE_S", 0.004)
    calls = []

    def slow():
        calls.append("a")
        time.sleep(0.002)

    def fast():
        calls.append("b")

    m = interleaved(slow, fast, repeats=3, first=(0.002, 0.001))
    assert [name for name, _ in itertools.groupby(calls)] == ["a", "b", "a", "b"]  # a b|b a|a b
    assert m["ratio"] > 1 and m["a_s"] > m["b_s"] > 0 and m["lo"] <= m["ratio"] <= m["hi"]
