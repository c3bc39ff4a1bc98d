"""Repo-root pytest setup, shared by the unit tests and the notebooks that nbval runs.

MINIDALLE_SMOKE=1 caps every preset's compute (see minidalle/config.py) so the whole suite runs
in minutes on a 2-core CPU. It is set here, at import, so the Jupyter kernels that nbval starts
inherit it from this process's environment.
"""

import os

os.environ.setdefault("MINIDALLE_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")  # no display in CI; notebooks still draw into outputs
