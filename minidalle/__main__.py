"""Entry point for `python -m minidalle`; see minidalle/cli.py."""

import sys

from .cli import main
from .distributed import exit_now_if_distributed

code = main()
exit_now_if_distributed(code)  # a process that joined a process group leaves without interpreter teardown
sys.exit(code)
