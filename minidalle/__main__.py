"""Entry point for `python -m minidalle`; see minidalle/cli.py."""

import sys

from .cli import main

sys.exit(main())
