"""The timing and target helpers both benchmarks use."""

import torch

from minidalle.bench.tools import alternate, calls_for, judge_targets, rounded


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
