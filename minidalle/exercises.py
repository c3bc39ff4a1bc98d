"""`check`: the self-check that ends every exercise in the notebooks.

The model is the `cmp()` helper of karpathy's nn-zero-to-hero: compare your answer with the
package's reference and print one readable line -- exact or only close (and how close), the
largest difference and where it is, or why the two cannot be compared (shapes, types, lengths).

    check("1.1", square_coverage(10.3, 12.7, 9.0, 24), shape_mask("square", 10.3, 12.7, 9.0, 24))
    # exercise 1.1: ✓ exact, array of shape (24, 24)

An exercise that asks you not to call a function (write softmax with exp and a sum, cross-entropy
with gather) is checked through `without`, which runs your code with those functions made to refuse:

    check("6.5", without(lambda: next_code_probs(logits, 2.0), "softmax"), torch.softmax(logits / 2.0, -1))

An exercise you have not attempted yet (your function still returns None, or `...`) prints a
reminder and fails nothing, so a notebook runs clean before you fill it in, and a wrong answer
prints what differs without stopping the notebook. With `MINIDALLE_EXERCISES=strict` in the
environment -- what the test that runs every notebook with its solutions filled in sets -- a missing
or wrong answer raises AssertionError instead, so an exercise whose check and solution disagree
fails CI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

STRICT_ENV = "MINIDALLE_EXERCISES"  # "strict": a missing or wrong answer raises (CI's solution run)


@dataclass(frozen=True)
class Verdict:
    """What `compare` found. `ok` is True for exact and close answers."""

    status: str  # exact | close | missing | wrong
    detail: str  # one readable line, without the exercise's name

    @property
    def ok(self) -> bool:
        return self.status in ("exact", "close")


def compare(answer, reference, atol: float = 1e-6, rtol: float = 1e-5) -> Verdict:
    """Compare `answer` with `reference`; the reference's type decides how.

    Numbers, numpy arrays and tensors are compared as float arrays: shapes first, then exact
    equality, then closeness (|answer - reference| <= atol + rtol * |reference|, NaN equal to NaN),
    with the largest difference and its index. Strings, ints, lists, tuples and dicts must be equal,
    and the first difference is named.
    Example: compare([1, 2, 3], [1, 2, 4]) -> Verdict("wrong", "differs at index 2: 3, the reference has 4")
    """
    if _unanswered(answer):
        return Verdict("missing", "not attempted yet: fill in the exercise cell above, run it, then run this one")
    if isinstance(answer, Banned):
        return Verdict("wrong", f"your code calls {answer.name}, which this exercise asks you to do without")
    if _is_numeric(reference) and not isinstance(reference, (bool, int, np.integer)):
        return _compare_arrays(answer, reference, atol, rtol)
    if isinstance(reference, dict):
        return _compare_dicts(answer, reference)
    if isinstance(reference, (list, tuple)):
        return _compare_sequences(answer, reference)
    if _plain(answer) == _plain(reference) and type(_plain(answer)) is type(_plain(reference)):
        return Verdict("exact", f"exact: {_short(reference)}")
    return Verdict("wrong", f"got {_short(answer)}, the reference is {_short(reference)}")


# The functions an exercise may ask you to do without, by name: every spelling torch offers of each.
BANNABLE = {
    "softmax": ((torch, "softmax"), (torch.Tensor, "softmax"), (torch.nn.functional, "softmax"),
                (torch.special, "softmax")),
    "cross_entropy": ((torch.nn.functional, "cross_entropy"), (torch.nn.functional, "nll_loss")),
    "scaled_dot_product_attention": ((torch.nn.functional, "scaled_dot_product_attention"),),
}


@dataclass(frozen=True)
class Banned:
    """What `without` returns when the answer called a function the exercise asks you not to use."""

    name: str


class _BannedCall(Exception):
    pass


def without(fn, *names: str):
    """fn() with the functions named (keys of BANNABLE) made to refuse; their refusal makes the answer
    a `Banned`, which `compare` reports as wrong. Example: without(lambda: f(x), "softmax")"""
    unknown = [n for n in names if n not in BANNABLE]
    if unknown:
        raise ValueError(f"without(): no such function to ban: {unknown} (known: {sorted(BANNABLE)})")
    saved = [(owner, attr, getattr(owner, attr)) for n in names for owner, attr in BANNABLE[n]]

    def refuse(name):
        def call(*args, **kwargs):
            raise _BannedCall(name)
        return call

    try:
        for n in names:
            for owner, attr in BANNABLE[n]:
                setattr(owner, attr, refuse(f"{owner.__name__}.{attr}"))
        return fn()
    except _BannedCall as e:
        return Banned(str(e))
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def check(exercise: str, answer, reference, atol: float = 1e-6, rtol: float = 1e-5,
          strict: bool | None = None) -> None:
    """Print one line saying whether `answer` matches `reference` (see `compare`).

    strict (default: `MINIDALLE_EXERCISES=strict` in the environment) raises AssertionError on a
    missing or wrong answer instead of only printing it.
    Example: check("1.1", 0.5, 0.5) prints "exercise 1.1: ✓ exact: 0.5"
    """
    verdict = compare(answer, reference, atol=atol, rtol=rtol)
    mark = {"exact": "✓", "close": "✓", "missing": "…", "wrong": "✗"}[verdict.status]
    line = f"exercise {exercise}: {mark} {verdict.detail}"
    print(line)
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip().lower() == "strict"
    if strict and not verdict.ok:
        raise AssertionError(line)


def _unanswered(answer) -> bool:
    """None or `...` (what an empty exercise function returns), or a list made only of those."""
    if isinstance(answer, (list, tuple)) and answer:
        return all(_unanswered(a) for a in answer)
    return answer is None or answer is Ellipsis


def _is_numeric(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray, np.number, float, int)) and not isinstance(x, bool)


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _compare_arrays(answer, reference, atol: float, rtol: float) -> Verdict:
    try:
        a = _as_array(answer)
    except (TypeError, ValueError):
        return Verdict("wrong", f"got {type(answer).__name__} {_short(answer)}, expected numbers "
                                f"like the reference's {type(reference).__name__}")
    r = _as_array(reference)
    what = "a number" if r.ndim == 0 else f"array of shape {tuple(r.shape)}"
    if a.shape != r.shape:
        return Verdict("wrong", f"shape {tuple(a.shape)}, but the reference has shape {tuple(r.shape)}")
    if r.size == 0 or np.array_equal(a, r, equal_nan=True):
        return Verdict("exact", f"exact, {what}" if r.ndim else f"exact: {r.item():.6g}")
    with np.errstate(invalid="ignore"):  # inf - inf
        diff = np.abs(a - r)
    same = (a == r) | (np.isnan(a) & np.isnan(r))  # equal infinities (a masked score) and NaN with NaN differ by 0
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))  # NaN on one side only: as far off as can be
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if r.ndim else ()
    gap = float(diff[worst])
    if np.allclose(a, r, atol=atol, rtol=rtol, equal_nan=True):
        return Verdict("close", f"close (not exact): max abs diff {gap:.2g}, within atol {atol:g} + rtol {rtol:g}, {what}")
    where = f" at index {tuple(int(i) for i in worst)}" if r.ndim else ""
    return Verdict("wrong", f"not close: max abs diff {gap:.3g}{where} (yours {a[worst]:.6g}, reference "
                            f"{r[worst]:.6g}); {int((diff > atol + rtol * np.abs(r)).sum())} of {r.size} values "
                            f"differ beyond atol {atol:g} + rtol {rtol:g}")


def _compare_sequences(answer, reference) -> Verdict:
    if isinstance(answer, (torch.Tensor, np.ndarray)):
        answer = answer.tolist()
    if not isinstance(answer, (list, tuple)):
        return Verdict("wrong", f"got {type(answer).__name__} {_short(answer)}, expected a "
                                f"{type(reference).__name__} like {_short(reference)}")
    for i, (x, y) in enumerate(zip(answer, reference)):
        if _plain(x) != _plain(y):
            return Verdict("wrong", f"differs at index {i}: {_short(x)}, the reference has {_short(y)}")
    if len(answer) != len(reference):
        return Verdict("wrong", f"length {len(answer)}, but the reference has length {len(reference)} "
                                f"(equal up to index {min(len(answer), len(reference)) - 1})")
    return Verdict("exact", f"exact, {len(reference)} items")


def _compare_dicts(answer, reference) -> Verdict:
    if not isinstance(answer, dict):
        return Verdict("wrong", f"got {type(answer).__name__} {_short(answer)}, expected a dict")
    missing = [k for k in reference if k not in answer]
    extra = [k for k in answer if k not in reference]
    if missing or extra:
        parts = [f"{len(keys)} {name} (e.g. {_short(keys[:3])})" for name, keys in (("missing", missing), ("extra", extra))
                 if keys]
        return Verdict("wrong", f"keys differ from the reference's: {', '.join(parts)}")
    for key, value in reference.items():
        if _plain(answer[key]) != _plain(value):
            return Verdict("wrong", f"differs at key {key!r}: {_short(answer[key])}, the reference has {_short(value)}")
    return Verdict("exact", f"exact, {len(reference)} entries")


def _plain(x):
    """numpy / torch scalars as Python values, so 3 == np.int64(3) == torch.tensor(3)."""
    if isinstance(x, (np.generic, torch.Tensor)) and np.ndim(x) == 0:
        return x.item()
    return x


def _short(x, limit: int = 60) -> str:
    text = repr(_plain(x))
    return text if len(text) <= limit else text[:limit - 3] + "..."
