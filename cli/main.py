"""Entry point of the ``landscape`` command: the group with every command registered."""

from __future__ import annotations

import contextlib
import signal
import sys

from landscape_cli.app import cli, signalled

COMMANDS = ("analyze", "check", "demo", "info", "plot", "report", "surface", "watch")
"""Each command attaches itself to :data:`cli` when its module is imported (on first use)."""

cli.add_lazy_commands({name: f"landscape_cli.commands.{name}" for name in COMMANDS})

__all__ = ["COMMANDS", "cli", "main"]


def main() -> None:
    """Console-script entry point.

    The group's own ``--help`` and ``--version`` print before any command's error handling:
    an output that cannot be written (``> /dev/full``) is one line there too.
    """
    try:
        cli.main(prog_name="landscape")
    except SystemExit:
        if signalled():  # stopped by a signal (watch too, whose exit status is 0): a Ctrl-C
            # pressed again while the process ends printed a traceback from inside torch's
            # and h5py's exit handlers
            with contextlib.suppress(ValueError):  # (not the main thread)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    except OSError as err:
        if not err.strerror or isinstance(err, BrokenPipeError):
            raise
        with contextlib.suppress(OSError):
            sys.stderr.write(f"Error: {err.strerror}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
