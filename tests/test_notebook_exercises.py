"""Every exercise against its solution: each notebook runs with its solutions pasted in.

The notebooks as committed leave the exercises empty, and nbval runs them that way (their checks
print "not attempted yet"). Here each notebook runs once more, under the smoke switch, with every
exercise cell replaced by its block from `notebooks/solutions/`, and with MINIDALLE_EXERCISES=strict,
under which a check that is missing or wrong raises. So an exercise whose check, reference or
solution is broken fails CI, and so does a notebook cell that stops working with a solution in place.
"""

import json
import re

import nbclient
import nbformat
import pytest

from nbtools import NOTEBOOKS, exercise_cells, load, solved, source


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if exercise_cells(load(p))], ids=lambda p: p.name)
def test_every_exercise_passes_with_its_solution(path, monkeypatch):
    monkeypatch.setenv("MINIDALLE_EXERCISES", "strict")  # the kernel inherits this process's environment
    monkeypatch.setenv("MINIDALLE_SMOKE", "1")
    nb = nbformat.reads(json.dumps(solved(path)), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} with its solutions: {str(e)[-2000:]}", pytrace=False)
    printed = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                        for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    for name in exercise_cells(load(path)):
        verdicts = re.findall(rf"^exercise {re.escape(name)}: (\S)", printed, re.M)
        assert verdicts and set(verdicts) == {"✓"}, f"{path.name} exercise {name}: {verdicts or 'no check printed'}"
    assert any(source(c).startswith("# Exercise") and "solved" in source(c).splitlines()[0] for c in nb.cells)
