"""The timing and target helpers both benchmarks use."""

from minidalle.benchtools import alternate, calls_for, judge_targets, rounded


def test_alternate_swaps_the_order_and_counts_repeats_already_done():
    order = []
    m = alternate(lambda: order.append("a"), lambda: order.append("b"), repeats=3, calls=(1, 2), done=[(4.0, 2.0)])
    assert order == ["b", "b", "a", "a", "b", "b"]  # repeat 1 is BA, repeat 2 AB; repeat 0 was given
    assert m["hi"] == 2.0 and m["lo"] < 2.0  # the given ratio is among them; the two measured ones are near 1


def test_calls_for_and_rounded():
    assert calls_for(0.03, 0.1, 1000) == 4 and calls_for(0.0, 0.1, 50) == 50 and calls_for(5.0, 0.1, 50) == 1
    assert rounded(0.0123456) == 0.0123


def test_judge_targets_on_both_sides_of_the_bound():
    targets = (("up", ">=", 2.0), ("down", "<=", 0.5), ("absent", ">=", 1.0))
    judged = judge_targets({"up": 2.5, "down": 0.7}, targets)
    assert judged["up"]["met"] is True and judged["down"]["met"] is False and judged["absent"]["met"] is None
    assert judge_targets({"up": 1.9}, targets)["up"] == {"target": ">= 2.0", "value": 1.9, "met": False}
