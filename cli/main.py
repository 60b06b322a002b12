"""Entry point of the ``landscape`` command.

The command line holds no computation: each command parses its arguments, calls the
library, and prints. Every user mistake surfaces as a :class:`landscape.LandscapeError`
(or a click usage error) and is printed as one line on stderr with exit status 2 for
usage errors and 1 for the rest; never a traceback.
"""

from __future__ import annotations

import sys

import click

from landscape import LandscapeError, __version__


class LandscapeGroup(click.Group):
    """A click group that turns library errors into one clean line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LandscapeError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(1)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            click.echo(f"Error: {err.strerror}: {err.filename}", err=True)
            ctx.exit(1)


@click.group(cls=LandscapeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="landscape")
def cli() -> None:
    """Training diagnostics and loss-landscape analysis for PyTorch."""


def _register_commands() -> None:
    from landscape_cli import commands  # noqa: F401  (commands attach themselves to `cli`)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register_commands()
    cli.main(args=argv, prog_name="landscape", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
