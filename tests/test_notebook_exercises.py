"""Every notebook, run once under the smoke switch with each exercise tried three ways.

`nbtools.course_run` builds the run: every cell as committed (each exercise's check first says
"not attempted yet"), then, after each check cell, the check again with a plausible wrong answer
from `notebooks/solutions/` (it must print ✗) and with the solution under MINIDALLE_EXERCISES=strict
(it must print ✓; a wrong verdict raises). So one execution proves the notebook runs clean as a
student opens it, that every check rejects a wrong answer, and that every solution passes.

Where the browser test can run (chromium and playwright are here), it executes this same course run
in JupyterLab and checks the same verdicts, and this headless run stands aside: each notebook runs
once. MINIDALLE_HEADLESS_NOTEBOOKS=1 runs it here anyway.
"""

import json
import os

import nbclient
import nbformat
import pytest

from nbtools import NOTEBOOKS, browser_available, course_run, exercise_cells, load, verdict_problems

HEADLESS = os.environ.get("MINIDALLE_HEADLESS_NOTEBOOKS", "").strip() == "1"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_its_checks_tell_right_from_wrong(path, monkeypatch):
    if browser_available() is None and not HEADLESS:
        pytest.skip("run in JupyterLab by tests/browser/test_jupyterlab.py (MINIDALLE_HEADLESS_NOTEBOOKS=1 runs it here)")
    monkeypatch.setenv("MINIDALLE_EXERCISES", "lenient")  # the kernel inherits it; the solution cells make it strict
    monkeypatch.setenv("MINIDALLE_SMOKE", "1")
    nb = nbformat.reads(json.dumps(course_run(path)), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} (course run): {str(e)[-2000:]}", pytrace=False)
    problems = verdict_problems(nb)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_a_course_run_tries_each_exercise_three_ways():
    # The run's plan itself: for each exercise, its check cell, then wrong answer + check, solution + check.
    for path in NOTEBOOKS:
        nb, marks = course_run(path), exercise_cells(load(path))
        roles = [c["metadata"]["minidalle_course_run"] for c in nb["cells"] if "minidalle_course_run" in c.get("metadata", {})]
        for number in marks:
            assert [r["role"] for r in roles if r["exercise"] == number] == \
                ["unanswered", "wrong answer", "wrong", "solution", "solved", "reset"], f"{path.name} {number}"
        assert len(nb["cells"]) == len(load(path)["cells"]) + 5 * len(marks)


def test_verdicts_are_read_from_the_check_cells():
    def cell(role, text):
        return {"cell_type": "code", "metadata": {"minidalle_course_run": {"exercise": "9.9", "role": role}},
                "outputs": [{"output_type": "stream", "name": "stdout", "text": text}], "source": ""}
    good = {"cells": [cell("unanswered", "exercise 9.9: … not attempted yet\n"),
                      cell("wrong", "exercise 9.9: ✗ differs at index 1\n"), cell("solved", "exercise 9.9: ✓ exact\n")]}
    assert verdict_problems(good) == []
    accepted = {"cells": [cell("wrong", "exercise 9.9: ✓ exact\n")]}             # a check that lets a wrong answer through
    silent = {"cells": [cell("solved", "nothing printed\n")]}
    assert "expected a ✗" in verdict_problems(accepted)[0] and "printed nothing" in verdict_problems(silent)[0]
