"""The click group of ``landscape``, its one error path and its warnings.

Every user mistake surfaces as a :class:`landscape.LandscapeError` (or a click usage
error) and is printed as one line on stderr with a non-zero exit status: 2 for usage
errors (click's convention), 1 for everything else (a command whose exit 1 means something
else, ``check``, gives its input errors 2 with :func:`input_errors`). Never a traceback.

Warnings raised while a command runs are printed as ``warning: message`` lines. Those of
other installed libraries (torch's deprecations, numpy's) are hidden unless the command
runs with ``-v``: they concern the library's code, not the user's run.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

import landscape
from landscape import LandscapeError, __version__
from landscape._progress import above_bars

_VERBOSE = "landscape.verbose"
# the code of this project: its warnings are always shown
_OWN = tuple(str(Path(m.__file__).resolve().parent) for m in (landscape, sys.modules[__name__]))
# installed third-party packages and the standard library: shown only with -v
_OTHERS = tuple(
    {str(Path(p).resolve()) for k in ("purelib", "platlib", "stdlib", "platstdlib")
     if (p := sysconfig.get_paths().get(k))}
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt."""

    #: what a run file it stops records (``stopped_how``), as a monitored script's SIGTERM
    stopped_how = "stopped by SIGTERM"


_SIGNALLED = [False]  # a command of this process was stopped by SIGINT or SIGTERM


def signalled() -> bool:
    """Whether a command of this process was stopped by SIGINT or SIGTERM."""
    return _SIGNALLED[0]


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt``.

    Every command runs inside it (:meth:`LandscapeGroup.invoke`), so SIGTERM ends any
    command as Ctrl-C does: one line, the files it writes whole or not at all, what an
    interrupted ``analyze``/``surface`` stored said. SIGINT too, because a process started
    with SIGINT ignored (a background job of a script) would otherwise not stop on it.
    Only in the main thread (elsewhere signals cannot be caught). A signal after the first
    is ignored while the block runs: Ctrl-C pressed three times lost the message of what an
    interrupted ``surface`` stored (the second interrupted the first's handling). The
    console script then ignores SIGINT while the process ends
    (:func:`landscape_cli.main.main`, :func:`signalled`).
    """
    received = False

    def stop(signum, frame):
        nonlocal received
        if not received:
            received = _SIGNALLED[0] = True
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread (tests running the CLI in a thread)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CommandError(click.ClickException):
    """A one-line error with a chosen exit status (``click.ClickException``'s is 1)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def input_errors(exit_code: int = 1) -> Iterator[None]:
    """Turn library and file errors raised in the block into one line and ``exit_code``."""
    try:
        yield
    except LandscapeError as err:
        raise CommandError(str(err), exit_code) from None
    except BrokenPipeError:
        # the reader went away (``| head``): not an error of the input; click's own
        # handler ends the command quietly, as other tools do
        raise
    except OSError as err:
        if not err.strerror:  # no system error behind it (h5py's own): not the user's
            raise
        # a missing file, a directory, no permission, a full disk: the system's words
        where = f": {err.filename}" if err.filename else ""
        raise CommandError(f"{err.strerror}{where}", exit_code) from None


def interrupted(err: KeyboardInterrupt, stored: str, starts_over: str | None) -> SystemExit:
    """Say what an interrupted ``analyze`` or ``surface`` left and how to go on.

    Prints one ``Error:`` line (``stored``: what the run file holds now; ``starts_over``: the option
    given that would start the work over, ``--overwrite`` or ``--replace``, else None) and
    returns the exit to raise: 143 for SIGTERM, 130 for SIGINT.
    """
    signal_name, status = ("SIGTERM", 143) if isinstance(err, Terminated) else ("SIGINT", 130)
    how = (f"run the same command again without {starts_over} (with it, it starts over)"
           if starts_over else "run the same command again")
    click.echo(f"Error: interrupted ({signal_name}): {stored}; to continue, {how}", err=True)
    return SystemExit(status)


@contextlib.contextmanager
def run_file_errors(run_path: str, exit_code: int = 1) -> Iterator[None]:
    """A run file whose contents are not what the format says, as one line and ``exit_code``.

    The store refuses a damaged structure itself (:class:`~landscape.RunFileError`); a value
    of the wrong kind inside a well-formed file (a ``config`` attribute that is not JSON, a
    severity no rule gives, a text column where numbers belong) surfaces as the error of
    whatever reads it: ``info``, ``report``, ``plot``, ``watch`` and ``check`` name the
    file instead of printing a traceback.
    """
    try:
        yield
    except LandscapeError as err:
        raise CommandError(str(err), exit_code) from None
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise CommandError(f"{run_path}: cannot be read as a run file "
                           f"({type(err).__name__}: {err})", exit_code) from None


def _docstring_of_command(module: str) -> str | None:
    """The docstring of the click command ``module`` defines, read from its source.

    Without importing the module: the commands that compute import torch and matplotlib
    (seconds), which ``landscape -h`` should not wait for. None when the source cannot be
    read (an installation without ``.py`` files).
    """
    spec = importlib.util.find_spec(module)
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and ast.unparse(d.func) == "cli.command"
            for d in node.decorator_list
        ):
            return ast.get_docstring(node) or ""
    return None


def short_help(text: str, limit: int) -> str:
    """A command's line in ``-h``: its help's first sentence, cut to ``limit`` with ``...``."""
    words = inspect.cleandoc(text).split("\n\n")[0].split()
    line = ""
    for word in words:
        candidate = f"{line} {word}" if line else word
        if len(candidate) > limit:
            while line and len(line) + 3 > limit:
                line = line.rsplit(" ", 1)[0] if " " in line else ""
            return f"{line}..."
        line = candidate
        if word.endswith("."):
            break
    return line


INSTEAD = {
    "compare": "landscape plot RUN1 RUN2 ... -o DIR/ compares runs, one figure per metric",
    "diff": "landscape plot RUN1 RUN2 ... -o DIR/ compares runs, one figure per metric",
    "show": "landscape info RUN summarises a run; landscape report RUN writes an HTML page",
    "summary": "landscape info RUN summarises a run",
    "html": "landscape report RUN writes an HTML page",
    "gate": "landscape check RUN exits 1 when a finding reaches --fail-on",
    "hessian": "landscape analyze CKPT... measures checkpoints' Hessian spectra",
    "eigen": "landscape analyze CKPT... measures checkpoints' Hessian spectra",
    "landscape": "landscape surface CKPT... computes a loss landscape",
}
"""Names a user may reach for (other tools' commands) and the command that does it."""


class LandscapeGroup(click.Group):
    """A click group that turns library errors into one clean line on stderr.

    Its commands are loaded on first use (:meth:`add_lazy_commands`): those that compute
    import torch and matplotlib, which ``landscape -h``, ``info``, ``check`` and ``watch``
    do not need.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = {}

    def add_lazy_commands(self, modules: dict[str, str]) -> None:
        """Register commands by name and the module that attaches each when imported."""
        self.lazy_commands.update(modules)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            importlib.import_module(self.lazy_commands[cmd_name])  # attaches itself
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        """The command ``args`` name; a name other tools use says which command does it."""
        name = args[0] if args else ""
        if name in INSTEAD and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            raise click.UsageError(f"no command {name!r}: {INSTEAD[name]}", ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``-h``, short help of unloaded commands from their source."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            doc = (None if name in self.commands
                   else _docstring_of_command(self.lazy_commands[name]))
            if doc is None:  # loaded already, or its source unreadable: load it
                command = self.get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                doc = command.short_help or command.help or ""
            rows.append((name, short_help(doc, limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            with interruptible(), one_line_warnings(), input_errors():
                return super().invoke(ctx)
        except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM) where no command handles it
            if isinstance(err, Terminated):
                raise CommandError("interrupted (SIGTERM)", 143) from None
            raise CommandError("interrupted (SIGINT)", 130) from None


@click.group(cls=LandscapeGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExample:\n  landscape demo --out demo-out")
@click.version_option(__version__, prog_name="landscape")
def cli() -> None:
    """Training diagnostics and loss-landscape analysis for PyTorch.

    Each command's -h lists its options and ends with an example.
    """


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_VERBOSE] = True
    return value


def verbose_option(func: Callable) -> Callable:
    """``-v``: also print the warnings of other libraries (torch, numpy, ...)."""
    return click.option(
        "-v", "--verbose", is_flag=True, expose_value=False, is_eager=True,
        callback=_set_verbose,
        help="Also print other libraries' warnings (torch's deprecations, ...).",
    )(func)


def _from_other_library(filename: str) -> bool:
    """Whether a warning was raised in an installed third-party package or the stdlib."""
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    if path.startswith(_OWN):
        return False
    return path.startswith(_OTHERS) or "site-packages" in path or "dist-packages" in path


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_VERBOSE))


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print warnings raised inside the block as ``warning: message`` lines on stderr.

    Warnings of other libraries are printed only under ``-v`` (see :func:`verbose_option`).
    """

    def show(message, category, filename, lineno, file=None, line=None):
        if _from_other_library(str(filename)) and not _verbose():
            return
        text = str(message)  # the library's own prefix once: not "warning: landscape: ..."
        text = text[len("landscape: "):] if text.startswith("landscape: ") else text
        with above_bars():  # a progress bar is drawn: clear it, print, draw it again below
            click.echo(f"warning: {text}", err=True)

    with warnings.catch_warnings(), _quiet_library_logs(not _verbose()):
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


_CHATTY_LOGGERS = {"transformers": "TRANSFORMERS_VERBOSITY"}
"""Libraries that log warnings on their own handlers, and the variable that sets their
level when they are first imported."""


@contextlib.contextmanager
def _quiet_library_logs(quiet: bool) -> Iterator[None]:
    """Hold the log messages of :data:`_CHATTY_LOGGERS` below errors (unless ``-v``).

    Hugging Face ``transformers`` logs its notices (``loss_type=None ...``) through a handler
    of its own on stderr, not as Python warnings: its level is set through its logger when
    it is imported already, else through its environment variable, and restored after.
    """
    if not quiet:
        yield
        return
    levels, variables = [], []
    for name, variable in _CHATTY_LOGGERS.items():
        if name in sys.modules:
            logger = logging.getLogger(name)
            levels.append((logger, logger.level))
            logger.setLevel(logging.ERROR)
        elif variable not in os.environ:
            variables.append(variable)
            os.environ[variable] = "error"
    try:
        yield
    finally:
        for logger, level in levels:
            logger.setLevel(level)
        for variable in variables:
            os.environ.pop(variable, None)
