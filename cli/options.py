"""What several commands share: their options and the steps behind them.

The options of the commands that load user code and checkpoints (``analyze``,
``surface``) and the loading itself (:func:`load_inputs`); the findings options of
``check``, ``report`` and ``plot`` (``--recompute/--stored``, ``--rules``,
``--ignore-rule``) and the findings they list (:func:`findings_of`); output names and
counts in messages.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

F = Callable[..., object]

SEED_MAX = 2**63 - 1
"""The largest ``--seed`` (``torch.manual_seed`` takes a 64-bit integer)."""


class FiniteFloat(click.types.FloatParamType):
    """A float that is not ``nan`` or ``inf`` (a usage error).

    ``float()`` accepts both, and ``nan`` passes every range check (comparisons with it are
    false), so a plain float or range lets them through to the library.
    """

    def convert(self, value, param, ctx):
        """The value as a float, or a usage error when it is not finite (or out of range)."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class FiniteFloatOr(FiniteFloat):
    """A finite float, or one of a few words (returned as given, lower-cased)."""

    def __init__(self, *words: str) -> None:
        self.words = words
        self.name = f"float|{'|'.join(words)}"

    def convert(self, value, param, ctx):
        """The word, or the value as a finite float."""
        if isinstance(value, str) and value.lower() in self.words:
            return value.lower()
        return super().convert(value, param, ctx)


class FiniteFloatRange(FiniteFloat, click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf`` (:class:`FiniteFloat`)."""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MemorySize(click.ParamType):
    """A memory budget: ``free``, ``auto``, ``none``, ``<f>x step`` or a size (``4GB``,
    ``512MiB``, ``2e9``: bytes without a unit)."""

    name = "size"
    _SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

    def convert(self, value, param, ctx):
        """``"free"``, ``"auto"``, None, ``"<f>x step"`` or a number of bytes."""
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word in ("free", "auto"):
            return word
        if word == "none":
            return None
        expected = (f"{value!r}: expected a size (4GB, 512MiB, bytes), '<f>x step', free, "
                    "auto or none")
        if re.fullmatch(r"[0-9]*\.?[0-9]+\s*x\s*step", word):
            if not float(word.split("x")[0]) > 0:
                self.fail(f"{value!r}: a budget of no memory", param, ctx)
            return word
        m = self._SIZE.match(word)
        if m is None or m.group(2).lower() not in _UNITS:
            self.fail(expected, param, ctx)
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if not math.isfinite(size) or size < 1:
            self.fail(f"{value!r}: a budget is at least one byte and finite", param, ctx)
        return int(size)


def counted(n: int, noun: str) -> str:
    """``"1 surface"``, ``"3 surfaces"``: a count and its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def named_output(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A ``-o`` callback: refuse an empty name (it would write into the current directory)."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("give a file or directory name (an empty name would write "
                                 "into the current directory)")
    return value


# suffixes of what the other commands write: a run file named so is a mistake
_NOT_A_RUN = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".html", ".htm", ".vtk", ".json", ".csv")


def run_output(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A ``-o`` callback for the run file ``analyze`` and ``surface`` write.

    Refuses what :func:`named_output` does, a name ending in a slash (a directory: pathlib
    drops the slash, and a file of the directory's name was written) and the suffix of a
    figure, a report or a table (an HDF5 file named ``plane.png``).
    """
    value = named_output(ctx, param, value)
    if value is None:
        return value
    if value.endswith(("/", os.sep)):
        raise click.BadParameter(f"{value!r} names a directory; -o names the run file: "
                                 f"{value.rstrip('/' + os.sep) or '.'}/run.h5")
    if Path(value).suffix.lower() in _NOT_A_RUN:
        raise click.BadParameter(
            f"{value!r}: -o names the run file (HDF5, e.g. run.h5); figures and reports come "
            "from it: landscape plot / landscape report")
    return value


def output_directory(path: Path) -> Path:
    """Create the output directory ``path`` (and its parents) unless it exists as a file.

    Raises:
        click.ClickException: ``path`` exists and is not a directory.
    """
    if path.exists() and not path.is_dir():
        raise click.ClickException(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def factory_options(func: F) -> F:
    """The model, the data and the loss ``analyze`` and ``surface`` evaluate."""
    for option in reversed([
        click.option("--model", "model_spec", default=None,
                     help="Model factory: package.module:fn or path/to/file.py:fn (no "
                          "arguments), or a LightningModule class for .ckpt files. Default: "
                          "from the checkpoints (a Hugging Face folder's config, the class a "
                          ".ckpt records)."),
        click.option("--data", "data_spec", default=None,
                     help="Data factory returning (inputs, targets), a dict batch, or an "
                          "iterable of batches."),
        click.option("--tokens", type=click.Path(), default=None,
                     help="Language-model data: token ids in a .npy or .pt file (1-D stream "
                          "or 2-D rows)."),
        click.option("--text", type=click.Path(), default=None,
                     help="Language-model data: a text file, encoded with the tokenizer of "
                          "the Hugging Face model folder."),
        click.option("--seq-len", type=click.IntRange(2, 2**20), default=128, show_default=True,
                     help="Tokens per sequence (--tokens, --text)."),
        click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
                     help="Sequences per batch (--tokens, --text)."),
        click.option("--batches", "n_batches", type=click.IntRange(1), default=1,
                     show_default=True, help="Number of batches (--tokens, --text)."),
        click.option("--pad-id", type=click.IntRange(0), default=None,
                     help="The id that pads the rows of --tokens: its positions are left "
                          "out of the loss and masked from attention."),
        click.option("--loss", "loss_spec", default=None,
                     help="cross_entropy (default for (inputs, targets) batches), mse, nll, "
                          "bce_with_logits, model (the model's own loss: the default for dict "
                          "batches, e.g. Hugging Face models), or package.module:fn."),
    ]):
        func = option(func)
    return func


def checkpoint_options(func: F) -> F:
    """``--trust-checkpoint`` and ``--device``."""
    for option in reversed([
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow pickled objects in checkpoints (can run arbitrary code)."),
        click.option("--device", default=None, help="Device to run on, e.g. cpu or cuda:0."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="torch CPU threads (default: torch's; 1 is often fastest for small "
                          "models and on a busy machine)."),
    ]):
        func = option(func)
    return func


def _refuse_token_options_with_data(data_spec: str | None) -> None:
    """Refuse ``--tokens``, ``--text``, ``--seq-len``, ``--batch-size``, ``--batches`` and
    ``--pad-id`` beside ``--data`` (usage errors, exit 2).

    They shape --tokens and --text data; with --data they were ignored without a word.
    """
    ctx = click.get_current_context(silent=True)
    if data_spec is None or ctx is None:
        return
    kinds = [name for param, name in (("tokens", "--tokens"), ("text", "--text"))
             if ctx.params.get(param) is not None]
    if kinds:  # (the library's own check said it with exit 1: a usage error is 2)
        raise click.UsageError(f"give the data as one of --data, --tokens or --text, not "
                               f"--data and {' and '.join(kinds)}")
    given = [name for param, name in (("seq_len", "--seq-len"), ("batch_size", "--batch-size"),
                                      ("n_batches", "--batches"), ("pad_id", "--pad-id"))
             if ctx.get_parameter_source(param) is click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)}: for --tokens and --text data only; "
                               "the --data factory returns its own batches")


def load_inputs(checkpoints, model_spec, data_spec, loss_spec, tokens, text, seq_len,
                batch_size, n_batches, trust_checkpoint, device, threads=None, pad_id=None):
    """The library calls behind :func:`factory_options`: ``(opened, batches, loss_fn, closure)``."""
    from landscape.checkpoints import open_checkpoints, open_data
    from landscape.checkpoints.sources import refuse_unshifted_loss
    from landscape.loading import prepare, resolve_objective

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _refuse_token_options_with_data(data_spec)

    # (a signal while the checkpoints and data load, an endless iterator or a slow disk,
    # ends the command too: the group's invoke turns SIGINT and SIGTERM into exceptions)
    opened = open_checkpoints(checkpoints, model_spec, trust=trust_checkpoint)
    data = open_data(opened, data_spec, tokens=tokens, text=text, seq_len=seq_len,
                     batch_size=batch_size, n_batches=n_batches, pad_id=pad_id)
    opened.model, batches = prepare(opened.model, data, device)
    loss_fn, closure = resolve_objective(loss_spec, batches)
    if tokens is not None or text is not None:
        refuse_unshifted_loss(opened.model, batches, closure,
                              "--tokens" if tokens is not None else "--text")
    return opened, batches, loss_fn, closure


class OneForm(click.Option):
    """A ``--this/--that`` boolean flag pair of which a command line may give one form.

    Click keeps the last of ``--recompute --stored`` silently (a wrapper that appends
    flags flipped a failing gate to a passing one); given both, this is a usage error. The
    value stays the plain bool (or None) that ``ctx.invoke`` and ``default_map`` give.
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        forms = ctx.meta.setdefault(("landscape.forms", self.name), set())
        for opt in [*self.opts, *self.secondary_opts]:
            parsed = getattr(parser, "_long_opt", {}).get(opt)  # click's parser, if it has it
            if parsed is None:
                continue
            given = parsed.process

            def process(value: Any, state: Any, _given: Any = given, _opt: str = opt) -> None:
                forms.add(_opt)
                _given(value, state)

            parsed.process = process

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        forms = ctx.meta.get(("landscape.forms", self.name), set())
        if len(forms) > 1:
            raise click.UsageError(f"{self.opts[0]} and {self.secondary_opts[0]} do not go "
                                   "together", ctx)
        return super().process_value(ctx, value)


def flag_pair(decl: str, default: bool | None, help: str) -> Callable[[F], F]:
    """A ``--this/--that`` flag pair of which a command line may give one form only."""
    return click.option(decl, cls=OneForm, default=default, help=help)


def recompute_option(what: str) -> Callable[[F], F]:
    """``--recompute/--stored`` (check, report, plot); ``what`` says what the command does
    with the findings ("List", "Mark")."""
    return flag_pair(
        "--recompute/--stored", True,
        help=f"{what} the stored findings plus those the alarm rules find on the whole run "
             "(--recompute, the default), or only those stored in the file (--stored).",
    )


def rules_option(func: F) -> F:
    """``--rules``: the user's alarm rules, besides the built-in ones (check, report, plot)."""
    return click.option(
        "--rules", "rule_specs", multiple=True, metavar="MODULE:NAME",
        help="Your own alarm rules, evaluated with the built-in ones (with --recompute): "
             "package.module:name or path/to/file.py:name naming a rule, a list of rules, a "
             "Rule class or a function returning them. A rule named like a built-in one "
             "replaces it. Repeatable.",
    )(func)


def ignore_rule_option(func: F) -> F:
    """``--ignore-rule NAME``: leave a rule's findings out (check, report, plot)."""
    return click.option(
        "--ignore-rule", "ignore", multiple=True, metavar="NAME",
        help="Leave out the findings of rule NAME (built-in or your own): not evaluated, "
             "and those stored in RUN not listed. Repeatable.",
    )(func)


def json_safe(value: Any) -> Any:
    """``value`` for strict JSON: non-finite floats as the strings ``"nan"``, ``"inf"``,
    ``"-inf"`` (JSON has no NaN; Python's ``json`` writes one that strict readers refuse),
    in dicts and lists too."""
    from landscape.findings import format_number

    if isinstance(value, float):
        return value if math.isfinite(value) else format_number(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _say_built_in_rules_stay(extra: list) -> None:
    """Warn when ``--rules`` looks built to leave built-in rules out: it adds to them.

    A list holding built-in rules at their defaults (``default_rules(loss_spike=None)``)
    reads as "these and no others", but the built-in rules missing from it still run.
    """
    from landscape.alarms import default_rules

    built_in = {r.name: r.config() for r in default_rules()}
    as_is = [r for r in extra if built_in.get(r.name) == r.config()]
    missing = sorted(set(built_in) - {r.name for r in extra})
    if as_is and missing:
        click.echo(f"warning: --rules adds to the built-in rules: those your list leaves out "
                   f"({', '.join(missing)}) still run; check --ignore-rule NAME leaves one "
                   "out of a gate",
                   err=True)


LONG_RUN_ROWS = 100_000
"""Rows of a run above which re-evaluating the rules is announced (about 10 s per 250,000
steps of the default monitor, 2 cores)."""


def unfinished_note(source: str, status, last_step: int | None, done: str) -> str | None:
    """``note: SOURCE is STATE; <done> up to step N`` for a run that did not finish; else None.

    ``status``: the run's :meth:`~landscape.store.Run.writer_status`, read before its rows
    (a writer that closes meanwhile wrote rows this reader did not see). The rows alone do
    not tell a killed, stopped or live run from a finished one: check and report say so.
    """
    if status is None or status.finished:
        return None
    return (f"note: {source} is {status.describe()}"
            + ("" if last_step is None else f"; {done} up to step {last_step}"))


def findings_of(run, recompute: bool, rules: list | None, quiet: bool,
                ignore: tuple[str, ...] = (), known: set[str] | None = None) -> list:
    """``collect_findings`` for check, plot and report; on a long run a line says so first.

    The recomputation replays every row through the rules (seconds per 100,000 steps);
    ``--stored`` lists what the monitor stored while it ran, at once. ``ignore``: the
    rules ``--ignore-rule`` names (a usage error for a name that names no rule: none of
    ``known``, by default the rules of ``run`` and ``rules``; a comparison of several runs
    passes those of all of them).
    """
    from landscape.alarms import collect_findings, rule_names

    if ignore:
        own = rule_names(run, rules)
        known = own | (known or set())
        unknown = sorted(set(ignore) - known)
        if unknown:  # a typo would gate on the rule it meant to leave out
            raise click.BadParameter(f"no rule named {', '.join(unknown)} (rules: "
                                     f"{', '.join(sorted(known))})", param_hint="--ignore-rule")
        ignore = tuple(n for n in ignore if n in own)  # (another compared run's rule)
    if recompute and not quiet:
        rows = sum(run.rows(m) for m in run.metrics())
        if rows > LONG_RUN_ROWS:
            click.echo(f"re-evaluating the alarm rules over {rows:,} rows (--stored lists the "
                       "findings stored while the run was written, at once)", err=True)
    with contextlib.redirect_stdout(sys.stderr):  # what a rule prints: never in --json
        return collect_findings(run, recompute=recompute, rules=rules, ignore=ignore)


def load_rule_specs(specs: tuple[str, ...], recompute: bool = True) -> list | None:
    """The rules ``--rules`` names, with the built-in ones; None when none is given.

    Raises:
        click.UsageError: ``--rules`` with ``--stored``, which evaluates no rule.
    """
    if not specs:
        return None
    if not recompute:
        raise click.UsageError("--rules needs --recompute: with --stored no rule is evaluated, "
                               "only the findings stored in the file are listed")
    from landscape.alarms import OnlineAlarms, with_rules
    from landscape.loading import load_rules

    with contextlib.redirect_stdout(sys.stderr):  # a module that prints: not in --json
        extra = [rule for spec in specs for rule in load_rules(spec)]
    _say_built_in_rules_stay(extra)
    rules = with_rules(extra)
    try:  # rules named alike across the modules (one module given twice)
        OnlineAlarms(rules)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--rules") from None
    return rules
