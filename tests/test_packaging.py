"""Packaging: environment.yml (conda) and pyproject.toml (pip) must ask for the same packages."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}  # conda names that differ from the PyPI names
NOT_PACKAGES = {"python", "pip"}


def _split(req: str) -> tuple[str, str]:
    """'torch>=2.5' -> ('torch', '>=2.5'); markers after ';' are dropped."""
    req = req.split(";")[0].strip()
    m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        reqs += [r for r in items if not r.startswith("minidalle")]
    out = {}
    for r in reqs:
        if "python_version" in r:  # a backport only older Pythons need
            continue
        name, spec = _split(r)
        out[name] = spec
    return out


def _environment() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-e"):
                continue
            name, spec = _split(item.replace("=", "==") if re.match(r"^[\w.-]+=\d", item) else item)
            name = CONDA_TO_PIP.get(name, name)
            if name not in NOT_PACKAGES:
                out[name] = spec
    return out


def test_environment_yml_and_pyproject_list_the_same_packages():
    pip, conda = _pyproject(), _environment()
    assert sorted(set(pip) - set(conda)) == [], "in pyproject.toml but not environment.yml"
    assert sorted(set(conda) - set(pip)) == [], "in environment.yml but not pyproject.toml"


@pytest.mark.parametrize("name", sorted(_pyproject()))
def test_lower_bounds_agree(name):
    assert _environment().get(name) == _pyproject()[name], f"{name}: version bounds drifted apart"


def test_environment_installs_this_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_items = [i for d in env["dependencies"] if isinstance(d, dict) for i in d["pip"]]
    assert "-e ." in pip_items


def test_torch_is_not_capped():
    assert _pyproject()["torch"].startswith(">=") and "<" not in _pyproject()["torch"]
