"""`python -m minidalle ...` and the `minidalle` script: main.py parses the command line, commands.py runs each command.

    from minidalle.cli import main
    main(["demo", "--preset", "smoke", "--out", "runs/mine"])   # what `python -m minidalle demo ...` does
"""

from .main import main

__all__ = ["main"]
