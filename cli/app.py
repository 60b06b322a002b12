"""The click group of ``landscape`` and its one error path.

Every user mistake surfaces as a :class:`landscape.LandscapeError` (or a click usage
error) and is printed as one line on stderr with a non-zero exit status: 2 for usage
errors (click's convention), 1 for everything else. Never a traceback.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import click

from landscape import LandscapeError, __version__


class LandscapeGroup(click.Group):
    """A click group that turns library errors into one clean line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LandscapeError as err:
            raise click.ClickException(str(err)) from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise click.ClickException(f"{err.strerror}: {err.filename}") from None


@click.group(cls=LandscapeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="landscape")
def cli() -> None:
    """Training diagnostics and loss-landscape analysis for PyTorch."""


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print warnings raised inside the block as ``warning: message`` lines on stderr."""

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield
