"""The package's layout rules: the top level is the course's reading list, nothing there imports a stage,
a benchmark or the command line, and no import cycle exists (imports inside functions included)."""

import ast
from pathlib import Path

import minidalle

PKG = Path(minidalle.__file__).parent
ENTRY = {"minidalle", "minidalle.__main__"}  # the package itself and `python -m minidalle` sit above everything
UPPER = ("stages", "bench", "cli")  # folders a top-level module must not import


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (module level or in a function)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan). Example: {a: {b}, b: {a}} -> [[a, b]]"""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    """A top-level module is its own room; a folder is one room (minidalle.stages.report -> minidalle.stages)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back_through_others():
    assert cycles(import_graph()) == []


def test_no_cycle_between_folders_and_top_level_modules():
    graph = import_graph()
    rooms = {}
    for m, deps in graph.items():
        if m in ENTRY:
            continue
        rooms.setdefault(_room(m), set()).update(_room(d) for d in deps if d not in ENTRY and _room(d) != _room(m))
    assert cycles(rooms) == []


def test_top_level_modules_import_no_stage_benchmark_or_command_line():
    graph, mods = import_graph(), _modules()
    top = [m for m, p in mods.items() if p.parent == PKG and p.name != "__init__.py" and m not in ENTRY]
    bad = {m: sorted(d for d in graph[m] if d.split(".")[1] in UPPER) for m in top}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_top_level_is_the_reading_list():
    course = [m for _, _, modules in minidalle.READING_ORDER for m in modules]
    top = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))
    assert len(course) == len(set(course)) and sorted(course) == top
    folders = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert folders == ["bench", "cli", "infra", "realdata", "scale", "stages"]


def test_the_package_map_lists_every_file_in_reading_order():
    text = (PKG / "README.md").read_text()
    course = [m for _, _, modules in minidalle.READING_ORDER for m in modules]
    places = [text.index(f"`{m}.py`") for m in course]
    assert places == sorted(places), "minidalle/README.md lists the top-level modules out of reading order"
    for p in sorted(PKG.glob("*/*.py")):
        if p.name != "__init__.py":
            assert f"`{p.parent.name}/{p.name}`" in text, f"minidalle/README.md does not mention {p.parent.name}/{p.name}"


def test_no_top_level_module_is_a_long_read():
    lines = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert {n: k for n, k in lines.items() if k > 600} == {}
