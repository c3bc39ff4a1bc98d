"""Every measured figure the README and the notebooks quote comes from one generated file.

`python -m minidalle bench all` writes its summary (figures, date, machine) to summary.json; the
copy the project quotes is docs/results/bench/summary.json. A quote is a markdown link to that
summary whose title names the figure:

    [5.14×](docs/results/bench/summary.md "bench sampling: kv_speedup_toy_b1")

and this test fails when the number shown is not the summary's value rounded to the digits shown,
when the figure named is not in the summary, or when a sentence quotes a figure's number without
the link (for the benchmark figures a quote can go stale on: speed-ups). A share may be shown as
a percentage ("1.8%" for 0.0178).
"""

import json
import re
from pathlib import Path

import pytest

from nbtools import NOTEBOOKS, load, markdown_lines

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "docs" / "results" / "bench" / "summary.json"
QUOTE = re.compile(r"\[([^\]]+)\]\(([^)\s]*docs/results/bench/summary\.md)\s+\"bench (\w+): ([^\"]+)\"\)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def figures() -> dict[tuple[str, str], float]:
    summary = json.loads(SUMMARY.read_text(encoding="utf-8"))
    out = {}
    for name, entry in summary["benchmarks"].items():
        for r in entry.get("figures", []):
            out[name, r["key"]] = r["value"]
    for r in summary["quality"].get("figures", []):
        out["quality", r["key"]] = r["value"]
    return out


def sources() -> list[tuple[str, str]]:
    """(where, text) for the README and each notebook's markdown."""
    found = [("README.md", (ROOT / "README.md").read_text(encoding="utf-8"))]
    for path in NOTEBOOKS:
        found.append((path.name, "\n".join(line for _, line in markdown_lines(load(path)))))
    return found


def quotes():
    for where, text in sources():
        for m in QUOTE.finditer(text):
            yield where, m.group(1), m.group(3), m.group(4)


def test_the_summary_says_when_and_where_it_was_measured():
    summary = json.loads(SUMMARY.read_text(encoding="utf-8"))
    assert summary["complete"] and summary["finished_utc"] and summary["machine"]["cpus"]
    assert summary["preset"] == "toy" and not summary["machine"]["smoke_caps"]


def test_every_quoted_figure_is_the_summary_s():
    known, problems, n = figures(), [], 0
    for where, shown, bench, key in quotes():
        n += 1
        if (bench, key) not in known:
            problems.append(f"{where}: {shown!r} quotes bench {bench}: {key}, which the summary does not hold")
            continue
        number = NUMBER.search(shown)
        if number is None:
            problems.append(f"{where}: {shown!r} (bench {bench}: {key}) shows no number")
            continue
        digits = number.group().split(".")[1] if "." in number.group() else ""
        value = known[bench, key] * (100 if shown.rstrip().endswith("%") else 1)   # a share may be shown as a percentage
        if float(number.group().replace(",", "")) != round(float(value), len(digits)):
            problems.append(f"{where}: {shown!r} quotes bench {bench}: {key} = {value}")
    assert n >= 10, f"only {n} quotes of the summary found"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("where, text", sources(), ids=[w for w, _ in sources()])
def test_benchmark_speedups_are_quoted_from_the_summary(where, text):
    # A speed-up such as "4.2× faster" or "3.7× recomputing" is a benchmark figure: outside a quote it
    # is a second copy that goes stale. Quotes are taken out first; what is left must hold none.
    left = QUOTE.sub("", text)
    loose = [m.group() for m in re.finditer(r"\b\d+(?:\.\d+)?× (?:faster|recomputing|as fast|per image|than)", left)]
    assert not loose, f"{where}: figures quoted without the summary link: {loose}"
