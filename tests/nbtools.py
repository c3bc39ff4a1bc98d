"""Reading the course's notebooks and their solutions, for the notebook tests (no Jupyter needed).

An exercise is a code cell tagged `exercise` whose first line is `# Exercise N.M: title`, followed
by a check cell that calls `check("N.M", ...)`. Its solution is the block of
`notebooks/solutions/<notebook>.py` that starts with the line `# %% Exercise N.M`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = ROOT / "notebooks" / "solutions"
EXERCISE_LINE = re.compile(r"^# Exercise (\d+\.\d+): \S")
SOLUTION_LINE = re.compile(r"^# %% Exercise (\d+\.\d+)\s*$", re.M)


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


def solutions(notebook: Path) -> dict[str, str]:
    """{"1.1": the code of its block, ...} from the notebook's solutions file (empty if none)."""
    path = solution_path(notebook)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    marks = list(SOLUTION_LINE.finditer(text))
    return {m.group(1): text[m.end():marks[k + 1].start() if k + 1 < len(marks) else len(text)].strip("\n")
            for k, m in enumerate(marks)}


def solved(notebook: Path) -> dict:
    """The notebook with every exercise cell replaced by its solution block."""
    nb = load(notebook)
    blocks = solutions(notebook)
    for number, i in exercise_cells(nb).items():
        nb["cells"][i]["source"] = f"# Exercise {number}, solved (from {solution_path(notebook).name})\n" + blocks[number]
    return nb


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
