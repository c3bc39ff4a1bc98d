"""The course's notebooks follow one shape, checked without running them.

nbval runs the code cells but never looks at the markdown, the cell tags or the exercises; these
tests do: one title per notebook, markdown that renders as text (not as a wall of headings), links
that stay inside the repository, a parameters cell, a runtime line, stripped outputs, and exercises
that each have a check cell and a solution.
"""

import re
from pathlib import Path

import pytest

from nbtools import (NOTEBOOKS, ROOT, exercise_cells, load, markdown_lines, solution_path, solutions, source, wrong_answers,
                     tags)

NAMES = [p.name for p in NOTEBOOKS]


@pytest.fixture(params=NOTEBOOKS, ids=NAMES)
def notebook(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_the_course_has_its_notebooks():
    assert [n[:2] for n in NAMES] == [f"{i:02d}" for i in range(len(NAMES))] and len(NAMES) >= 5, NAMES


def test_exactly_one_title(notebook):
    path, nb = notebook
    titles = [(i, line) for i, line in markdown_lines(nb) if re.match(r"^# \S", line)]
    assert len(titles) == 1 and titles[0][0] == 0, f"{path.name}: top-level headings {titles}"
    first = source(nb["cells"][0]).splitlines()[0]
    assert first.startswith(f"# {path.name[:2]} · "), f"{path.name}: the first line should be its title, got {first!r}"


def test_no_markdown_line_is_a_leftover_comment_marker(notebook):
    # A script converted to a notebook leaves "# " in front of every markdown line: "# ## 1. Versions"
    # then renders as a heading, and a lone "#" as an empty one.
    path, nb = notebook
    stray = [(i, line) for i, line in markdown_lines(nb) if re.match(r"^#+\s*$|^#+ +#", line)]
    assert not stray, f"{path.name}: markdown lines that look like leftover comment markers: {stray[:5]}"
    for i, cell in enumerate(nb["cells"]):
        lines = [line for line in source(cell).splitlines() if line.strip()]
        if cell["cell_type"] == "markdown" and len(lines) > 2:
            assert not all(line.startswith("#") for line in lines), f"{path.name} cell {i}: every line a heading"


def test_links_stay_inside_the_repository(notebook):
    path, nb = notebook
    for i, line in markdown_lines(nb):
        for target in re.findall(r"\]\(([^)\s]+)", line):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT), f"{path.name} cell {i}: {target} points outside the repository"
            assert resolved.exists(), f"{path.name} cell {i}: {target} does not exist"
    text = "\n".join(source(c) for c in nb["cells"])
    # The developers' folders, not the reader's (spelled in pieces, so that a search for them skips this line).
    for outside in ("../" + "shared", "/" + "work/", "/" + "root/"):
        assert outside not in text, f"{path.name} names {outside}, a path outside the repository"


def test_parameters_cell_near_the_top(notebook):
    path, nb = notebook
    first = [i for i, c in enumerate(nb["cells"]) if "parameters" in tags(c)]
    assert first and first[0] <= 2 and nb["cells"][first[0]]["cell_type"] == "code", f"{path.name}: {first}"
    assert "PRESET" in source(nb["cells"][first[0]]), f"{path.name}: the parameters cell should set PRESET"


def test_runtime_line_in_the_first_cell(notebook):
    path, nb = notebook
    intro = source(nb["cells"][0])
    assert re.search(r"^\*\*Runtime\.\*\* .*\d", intro, re.M), f"{path.name}: no '**Runtime.** ...' line with a figure"


def test_outputs_are_stripped(notebook):
    path, nb = notebook
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name} cell {i} has outputs"


def test_exercises_have_a_check_and_a_solution(notebook):
    path, nb = notebook
    found = exercise_cells(nb)
    number = int(path.name[:2])
    assert len(found) >= (1 if number == 0 else 3), f"{path.name}: {len(found)} exercises, expected at least 3"
    for name, i in found.items():
        assert re.fullmatch(rf"{number}\.\d+", name), f"{path.name}: exercise {name} should be numbered {number}.M"
        body = source(nb["cells"][i])
        assert re.search(r"^\s+\.\.\.  # your code here$", body, re.M), f"{path.name} {name}: the body to fill is '...'"
        following = next(c for c in nb["cells"][i + 1:] if c["cell_type"] == "code")
        assert f'check("{name}"' in source(following), f"{path.name} {name}: the next code cell should check it"
    blocks, wrong = solutions(path), wrong_answers(path)
    assert sorted(blocks) == sorted(found), f"{solution_path(path).name} vs the notebook's exercises"
    assert sorted(wrong) == sorted(found), f"{solution_path(path).name}: a '# %% Wrong N.M: why' block for each exercise"
    for name, code in blocks.items():
        compile(code, f"{solution_path(path).name}:{name}", "exec")
        assert "..." not in code.split("\n")[-1], f"{name}: the solution is not written yet"
        why, bad = wrong[name]
        compile(bad, f"{solution_path(path).name}:wrong {name}", "exec")
        assert why and bad.strip() != code.strip(), f"{name}: the wrong answer says what is wrong and differs"


def test_no_issue_numbers_or_outside_paths_in_the_project():
    # Readers have only the repository: a ticket number or a path into the developers' own folders tells them nothing.
    pattern = re.compile(r"\bissues?\s*#?\s*\d+|\.\./shared", re.I)
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run"]
    for folder in ("minidalle", "notebooks", "docs", "datasets", "tests"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in {".py", ".ipynb", ".md", ".txt", ""}
                  and not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)]
    hits = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits)
