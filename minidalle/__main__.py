"""Entry point for `python -m minidalle`; see minidalle/cli/."""

import sys

from .cli.main import main
from .scale.distributed import exit_now_if_distributed

code = main()
exit_now_if_distributed(code)  # a process that joined a process group leaves without interpreter teardown
sys.exit(code)
