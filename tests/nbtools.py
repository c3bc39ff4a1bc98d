"""Reading the course's notebooks and their solutions, for the notebook tests (no Jupyter needed).

An exercise is a code cell tagged `exercise` whose first line is `# Exercise N.M: title`, followed
by a check cell that calls `check("N.M", ...)`. Its solution is the block of
`notebooks/solutions/<notebook>.py` that starts with the line `# %% Exercise N.M`, and a plausible
wrong answer, which the check must reject, is the block that starts with `# %% Wrong N.M: what is wrong`.

`course_run(path)` is the notebook the tests execute, once: every cell as committed (so each
exercise's check first says "not attempted yet"), and after each check cell three more runs of it,
inserted: with the wrong answer (the check must print ✗), then with the solution, under
MINIDALLE_EXERCISES=strict (the check must print ✓, and raises otherwise). `verdict_problems`
reads the executed notebook's outputs and names every exercise whose check said otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = ROOT / "notebooks" / "solutions"
EXERCISE_LINE = re.compile(r"^# Exercise (\d+\.\d+): \S")
SOLUTION_LINE = re.compile(r"^# %% (Exercise|Wrong) (\d+\.\d+)(?:: (.*\S))?\s*$", re.M)
ROLE = "minidalle_course_run"  # cell metadata key: which exercise an inserted or check cell belongs to, and its role
STRICT = "import os\nos.environ[\"MINIDALLE_EXERCISES\"] = {!r}   # inserted by the tests: {}"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return "".join(cell["source"])


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def exercise_cells(nb: dict) -> dict[str, int]:
    """{"1.1": index of its exercise cell, ...} for the cells tagged `exercise`."""
    found = {}
    for i, cell in enumerate(nb["cells"]):
        if "exercise" in tags(cell):
            m = EXERCISE_LINE.match(source(cell))
            found[m.group(1) if m else f"<cell {i}: no '# Exercise N.M: title' line>"] = i
    return found


def solution_path(notebook: Path) -> Path:
    return SOLUTIONS / f"{notebook.stem}.py"


def _blocks(notebook: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """{("Exercise" | "Wrong", "N.M"): (what is wrong or "", code)} from the notebook's solutions file."""
    path = solution_path(notebook)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    marks = list(SOLUTION_LINE.finditer(text))
    return {(m.group(1), m.group(2)): (m.group(3) or "",
                                       text[m.end():marks[k + 1].start() if k + 1 < len(marks) else len(text)].strip("\n"))
            for k, m in enumerate(marks)}


def solutions(notebook: Path) -> dict[str, str]:
    """{"1.1": the code of its solution block, ...} (empty if the notebook has no solutions file)."""
    return {number: code for (kind, number), (_, code) in _blocks(notebook).items() if kind == "Exercise"}


def wrong_answers(notebook: Path) -> dict[str, tuple[str, str]]:
    """{"1.1": (what is wrong with it, its code), ...}: the answers each check must reject."""
    return {number: (why, code) for (kind, number), (why, code) in _blocks(notebook).items() if kind == "Wrong"}


def _solved_source(notebook: Path, number: str, code: str) -> str:
    return f"# Exercise {number}, solved (from {solution_path(notebook).name})\n" + code


def check_cell(nb: dict, number: str, exercise_index: int) -> int:
    """The index of exercise N.M's check cell: the next code cell, which must call check("N.M", ...)."""
    after = [j for j in range(exercise_index + 1, len(nb["cells"])) if nb["cells"][j]["cell_type"] == "code"]
    if not after or f'check("{number}"' not in source(nb["cells"][after[0]]):
        raise AssertionError(f"exercise {number}: the code cell after it must call check(\"{number}\", ...)")
    return after[0]


def _code(text: str, number: str, role: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": f"course-run-{number}-{role}".replace(".", "-").replace(" ", "-"),
            "metadata": {ROLE: {"exercise": number, "role": role}}, "outputs": [], "source": text}


def course_run(notebook: Path) -> dict:
    """The notebook as committed, with each exercise's check run again with its wrong answer and
    with its solution (see the module's docstring). Raises AssertionError when a block is missing."""
    nb = load(notebook)
    good, bad = solutions(notebook), wrong_answers(notebook)
    marks = exercise_cells(nb)
    missing = [f"{n} ({what})" for n in marks for what, blocks in (("solution", good), ("wrong answer", bad))
               if n not in blocks]
    if missing:
        raise AssertionError(f"{notebook.name}: no block in {solution_path(notebook).name} for exercise "
                             + ", ".join(missing))
    for number, i in sorted(marks.items(), key=lambda kv: -kv[1]):        # from the end: indices stay valid
        j = check_cell(nb, number, i)
        check = nb["cells"][j]
        check.setdefault("metadata", {})[ROLE] = {"exercise": number, "role": "unanswered"}
        why, wrong = bad[number]
        inserted = [
            _code(STRICT.format("lenient", "a wrong answer prints a cross, it does not raise") + f"\n# Exercise {number}, "
                  f"a wrong answer ({why}), from {solution_path(notebook).name}\n" + wrong, number, "wrong answer"),
            _code(source(check), number, "wrong"),
            _code(STRICT.format("strict", "from here a wrong answer raises") + "\n"
                  + _solved_source(notebook, number, good[number]), number, "solution"),
            _code(source(check), number, "solved"),
            _code(STRICT.format("lenient", "the next exercise is first run unanswered"), number, "reset"),
        ]
        nb["cells"][j + 1:j + 1] = inserted
    return nb


EXPECTED = {"unanswered": "…", "wrong": "✗", "solved": "✓"}


def verdict_problems(nb: dict) -> list[str]:
    """What an executed course_run notebook's checks printed that they should not have, one line each:
    the unanswered exercise must say "not attempted", the wrong answer ✗, the solution only ✓."""
    problems = []
    for cell in nb["cells"]:
        mark = cell.get("metadata", {}).get(ROLE)
        if not mark or mark["role"] not in EXPECTED:
            continue
        number, role = mark["exercise"], mark["role"]
        printed = "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")
        verdicts = re.findall(rf"^exercise {re.escape(number)}: (\S)", printed, re.M)
        want = EXPECTED[role]
        ok = want in verdicts if role == "wrong" else bool(verdicts) and set(verdicts) == {want}
        if not ok:
            problems.append(f"exercise {number}, {role}: the check printed {verdicts or 'nothing'}, expected "
                            f"{'a ' + want if role == 'wrong' else 'only ' + want}")
    return problems


def markdown_lines(nb: dict):
    """(cell index, line) for every markdown line outside fenced code blocks."""
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        fenced = False
        for line in source(cell).splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                yield i, line


def chromium_path() -> str | None:
    """The browser the browser test drives: MINIDALLE_CHROMIUM, else Debian's /usr/bin/chromium, else
    `chromium` on the PATH (None when there is none)."""
    import os
    import shutil

    return os.environ.get("MINIDALLE_CHROMIUM") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium"))


def browser_available() -> str | None:
    """Why the browser test cannot run here (no playwright, no chromium), or None when it can.
    Where it can, it executes the course run of every notebook; the headless run then stands aside."""
    import importlib.util
    import os

    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not importable"
    chromium = chromium_path()
    if not chromium or not os.path.exists(chromium):
        return f"no chromium at {chromium or '/usr/bin/chromium'}"
    return None
