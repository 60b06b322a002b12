"""The console script's entry point: a Ctrl-C while the command loads is one line too.

Loading the command line (click, h5py) takes a moment; once loaded, ``landscape_cli.main``
handles interruptions itself (``Error: interrupted (SIGINT)``, exit status 130, as
docs/cli.md says), also while a command that computes imports torch on first use. This
module imports nothing heavy, so that an interruption before that is the same one line,
not a traceback from inside the import.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Console-script entry point: :func:`landscape_cli.main.main`, once loaded."""
    try:
        from landscape_cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted (SIGINT)\n")
        raise SystemExit(130) from None
    run()
