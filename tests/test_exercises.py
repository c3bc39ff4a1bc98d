"""minidalle.exercises: the `check` helper the notebooks' exercises end with."""

import numpy as np
import pytest
import torch

from minidalle.exercises import STRICT_ENV, check, compare


@pytest.mark.parametrize("answer, reference, status", [
    (torch.ones(3, 3), np.ones((3, 3)), "exact"),
    (np.ones((3, 3)) + 1e-8, torch.ones(3, 3), "close"),
    (np.ones(9), torch.ones(3, 3), "wrong"),                  # shapes differ
    (torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), "wrong"),
    (float("nan"), float("nan"), "exact"),                    # NaN where the reference has NaN
    (float("nan"), 1.0, "wrong"),
    ("not numbers", torch.zeros(2), "wrong"),
    ([256, 97], [256, 97], "exact"),
    ((256, 97), [256, 98], "wrong"),
    ([1, 2], [1, 2, 3], "wrong"),                             # a prefix is not the answer
    (torch.tensor([1, 2]), [1, 2], "exact"),                  # token ids as a tensor
    ({(97, 97): 256}, {(97, 97): 256}, "exact"),
    ({(97, 97): 257}, {(97, 97): 256}, "wrong"),
    ({(97, 97): 256}, {(97, 97): 256, (97, 98): 257}, "wrong"),
    ("aaab", "aaab", "exact"),
    ("aaab", "aaac", "wrong"),
    (np.int64(3), 3, "exact"),
    (True, 1, "wrong"),                                       # a bool is not the count
    (None, 1.0, "missing"),
    (..., [1], "missing"),
    ([None, None], np.zeros(2), "missing"),                    # an empty function called in a loop
    ([None, 1.0], np.zeros(2), "wrong"),
])
def test_compare_statuses(answer, reference, status):
    assert compare(answer, reference).status == status


def test_compare_names_the_largest_difference_and_where_it_is():
    reference = torch.zeros(4, 5)
    answer = reference.clone()
    answer[2, 3], answer[0, 0] = 0.5, 0.1
    verdict = compare(answer, reference)
    assert not verdict.ok and "max abs diff 0.5 at index (2, 3)" in verdict.detail and "2 of 20" in verdict.detail


def test_equal_infinities_differ_by_nothing():
    # A masked score is -inf on both sides: the worst difference named is the finite one.
    reference = torch.tensor([[float("-inf"), 1.0], [float("inf"), 2.0]])
    answer = reference.clone()
    answer[1, 1] = 2.5
    verdict = compare(answer, reference)
    assert verdict.status == "wrong" and "max abs diff 0.5 at index (1, 1)" in verdict.detail, verdict.detail
    assert "1 of 4" in verdict.detail
    answer[1, 1], answer[0, 0] = 2.0, float("inf")                # +inf where the reference has -inf
    verdict = compare(answer, reference)
    assert verdict.status == "wrong" and "at index (0, 0)" in verdict.detail, verdict.detail


def test_tolerances_decide_close():
    assert compare(1.001, 1.0).status == "wrong"
    assert compare(1.001, 1.0, atol=1e-2).status == "close"
    assert compare(1.001, 1.0, rtol=1e-2).status == "close"


def test_check_prints_and_only_raises_when_strict(capsys, monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    check("9.1", [1, 2], [1, 3])                               # a student's wrong answer: printed, not raised
    check("9.2", None, [1, 3])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("exercise 9.1: ✗ differs at index 1") and out[1].startswith("exercise 9.2: … not attempted")
    monkeypatch.setenv(STRICT_ENV, "strict")
    check("9.3", [1, 3], [1, 3])
    assert capsys.readouterr().out.startswith("exercise 9.3: ✓ exact")
    for answer in ([1, 2], None):
        with pytest.raises(AssertionError, match="exercise 9.4"):
            check("9.4", answer, [1, 3])
    with pytest.raises(AssertionError):
        check("9.5", None, 1.0, strict=True)


def test_without_turns_a_banned_call_into_a_wrong_answer_and_restores_it():
    from minidalle.exercises import without

    x = torch.randn(3, 5)
    banned = without(lambda: torch.softmax(x, -1), "softmax")
    assert compare(banned, torch.softmax(x, -1)).status == "wrong"
    assert "torch.softmax" in compare(banned, torch.softmax(x, -1)).detail
    assert compare(without(lambda: x.softmax(-1), "softmax"), x.softmax(-1)).status == "wrong"    # the method too
    by_hand = without(lambda: x.exp() / x.exp().sum(-1, keepdim=True), "softmax")
    assert compare(by_hand, torch.softmax(x, -1)).ok                                         # restored after
    with pytest.raises(ValueError, match="no such function"):
        without(lambda: 0, "exp")
