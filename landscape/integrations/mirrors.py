"""Mirrors: copy every row and finding of a monitored run to the dashboards you already use.

A mirror is any object with three methods, which :class:`~landscape.Monitor` calls after it
appends a row and after it raises a finding (``Monitor(..., mirrors=[...])``)::

    on_row(name, step, row)   # one row of metric `name` at `step`: field -> value
    on_finding(finding)       # a landscape.Finding
    close()                   # the run ended (the monitor was closed)

and optionally ``declare(name, components)``, called once per metric when the monitor
starts with the names of its vector fields' components (:meth:`Mirror.declare`).

A mirror that raises is switched off with one ``RuntimeWarning``; training goes on.

Each scalar field becomes one scalar series named ``landscape/<metric>/<field>`` at the
row's step; a vector field of at most :data:`MAX_VECTOR` entries becomes one series per
entry, named by the component's layer where the metric names them
(``landscape/spectral_alignment/minority/fc1``), else by its index
(``landscape/top_eigenvalues/eigenvalues/0``); larger arrays (spectral densities) and
strings are skipped. Each finding becomes a text entry (its ``str``: step, severity, rule,
message, hint) and the scalar ``landscape/findings/count``, the number of findings so far.

* :class:`TensorBoardMirror` — a ``torch.utils.tensorboard.SummaryWriter`` or a log
  directory (``pip install 'landscape-for-pytorch[tensorboard]'``); findings are
  ``add_text`` entries under ``landscape/findings``
  (https://pytorch.org/docs/stable/tensorboard.html).
* :class:`WandbMirror` — a Weights & Biases run (default: the active ``wandb.run``;
  ``[wandb]``). The rows are logged with their step as the metric ``landscape/step``,
  declared as the x-axis of ``landscape/*`` with ``define_metric``
  (https://docs.wandb.ai/guides/track/log/customize-logging-axes), because ``wandb.log``'s
  own step must only increase and belongs to whoever else logs to the run (the
  ``Trainer``, Lightning). Findings are logged as text under ``landscape/finding``.
* :class:`MLflowMirror` — an MLflow run (default: the active run, else ``run_id`` on
  ``tracking_uri``; ``[mlflow]``, ``mlflow-skinny`` is enough): metrics with
  ``log_batch``, findings as tags ``landscape.finding.<n>``
  (https://mlflow.org/docs/latest/python_api/mlflow.client.html).
* :class:`LightningLoggerMirror` — any Lightning logger, through its
  ``log_metrics(metrics, step)``; the finding text goes to the logger's backend where it has
  one (TensorBoard ``add_text``, W&B, MLflow tags).

:func:`report_to_mirrors` turns a ``transformers.TrainingArguments.report_to`` list into
mirrors; the Hugging Face and Lightning callbacks build their mirrors this way by default
(``docs/integrations.md``). Nothing here imports TensorBoard, W&B or MLflow until a mirror
is built.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landscape.findings import Finding
from landscape.store.format import as_numpy

__all__ = [
    "MAX_VECTOR",
    "LightningLoggerMirror",
    "MLflowMirror",
    "Mirror",
    "TensorBoardMirror",
    "WandbMirror",
    "lightning_logger_mirrors",
    "report_to_mirrors",
    "scalars",
    "trainer_tensorboard_dir",
]

MAX_VECTOR = 16
"""Vector fields with at most this many entries are mirrored entry by entry."""


def _needs(module: str, extra: str) -> ImportError:
    return ImportError(
        f"this mirror needs {module}: pip install 'landscape-for-pytorch[{extra}]'"
    )


def scalars(name: str, row: Mapping[str, Any], prefix: str = "landscape",
            components: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """The scalar series of one row: ``{"<prefix>/<name>/<field>": value}``.

    Args:
        name: the metric name.
        row: field -> value (numbers, arrays, tensors; strings are skipped).
        prefix: the first part of every name.
        components: field -> the names of its components (the layers of a per-layer
            field; :func:`~landscape.store.format.component_names`), where the metric
            gives them.

    Returns:
        Scalars as floats (NaN kept); vector fields of at most :data:`MAX_VECTOR` entries
        as ``<field>/<component>`` (its name, else its index); larger arrays are left out.
    """
    out: dict[str, float] = {}
    for field, value in row.items():
        if field == "step" or isinstance(value, (str, bytes)):
            continue
        try:
            arr = np.asarray(as_numpy(value), dtype=np.float64)
        except (TypeError, ValueError):
            continue
        key = f"{prefix}/{name}/{field}"
        if arr.ndim == 0:
            out[key] = float(arr)
        elif arr.ndim == 1 and arr.size <= MAX_VECTOR:
            names = (components or {}).get(field)
            if names is None or len(names) != arr.size:
                names = [str(i) for i in range(arr.size)]
            out.update({f"{key}/{n}": float(v) for n, v in zip(names, arr)})
    return out


class Mirror:
    """Base class of mirrors: buffers one step's scalars and writes them when the step ends.

    Subclasses implement :meth:`write_scalars` and :meth:`write_finding`; the rows of one
    monitor step arrive one metric at a time and are written together.

    Args:
        prefix: the first part of every mirrored name (default ``"landscape"``).
    """

    def __init__(self, prefix: str = "landscape") -> None:
        self.prefix = prefix
        self.n_findings = 0
        self._step: int | None = None
        self._buffer: dict[str, float] = {}
        self._components: dict[str, dict[str, list[str]]] = {}

    # -- the interface the monitor calls

    def declare(self, name: str, components: Mapping[str, Sequence[str]]) -> None:
        """Name the components of a metric's vector fields, before its first row.

        Optional in a mirror: the monitor calls it when the mirror has it, once per metric
        when it starts, with the names of :func:`~landscape.store.format.component_names`
        (a per-layer field then reads ``.../minority/blocks.0.mlp`` instead of
        ``.../minority/3``).

        Args:
            name: the metric name.
            components: field -> one name per component (only the fields that have them).
        """
        self._components[name] = {f: list(n) for f, n in components.items()}

    def on_row(self, name: str, step: int, row: Mapping[str, Any]) -> None:
        """Mirror one row (buffered until the step changes, a finding or :meth:`close`).

        Args:
            name: the metric name.
            step: the row's step.
            row: field -> value.
        """
        step = int(step)
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._buffer.update(scalars(name, row, self.prefix, self._components.get(name)))

    def on_finding(self, finding: Finding) -> None:
        """Mirror one finding: its text and the running count.

        Args:
            finding: the finding.
        """
        self.flush()
        self.n_findings += 1
        self.write_finding(finding, self.n_findings)

    def close(self) -> None:
        """Write what is buffered (subclasses also release what they opened)."""
        self.flush()

    # -- what subclasses implement

    def flush(self) -> None:
        """Write the buffered scalars of the current step."""
        if self._buffer and self._step is not None:
            buffer, self._buffer = self._buffer, {}
            self.write_scalars(self._step, buffer)

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write one step's scalars.

        Args:
            step: the step.
            values: name -> value.
        """
        raise NotImplementedError

    def write_finding(self, finding: Finding, count: int) -> None:
        """Write one finding and the count of findings so far.

        Args:
            finding: the finding.
            count: findings so far, this one included.
        """
        raise NotImplementedError


class TensorBoardMirror(Mirror):
    """Mirror to TensorBoard event files.

    Args:
        writer: a ``SummaryWriter`` (``torch.utils.tensorboard`` or ``tensorboardX``; kept
            open on :meth:`close`, only flushed) or a log directory (a writer of its own is
            opened there and closed on :meth:`close`).
        prefix: the first part of every tag.

    Raises:
        ImportError: a log directory was given and ``tensorboard`` is not installed.

    Example:
        >>> mirror = TensorBoardMirror("runs/exp1")  # doctest: +SKIP
        >>> Monitor(model, loss_fn, "run.h5", mirrors=[mirror])  # doctest: +SKIP
    """

    def __init__(self, writer: Any = "runs", *, prefix: str = "landscape") -> None:
        super().__init__(prefix)
        if isinstance(writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise _needs("tensorboard", "tensorboard") from err
            self.writer = SummaryWriter(log_dir=str(writer))
            self._owned = True
        else:
            self.writer = writer
            self._owned = False

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """``add_scalar`` for each value."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def write_finding(self, finding: Finding, count: int) -> None:
        """``add_text`` under ``<prefix>/findings`` and the count as a scalar."""
        self.writer.add_text(f"{self.prefix}/findings", str(finding), finding.step)
        self.writer.add_scalar(f"{self.prefix}/findings/count", count, finding.step)

    def close(self) -> None:
        """Flush; close the writer if this mirror opened it."""
        super().close()
        self.writer.flush()
        if self._owned:
            self.writer.close()


class WandbMirror(Mirror):
    """Mirror to a Weights & Biases run.

    Args:
        run: a ``wandb`` run (``wandb.init(...)``'s return value); ``None``: the active
            ``wandb.run`` when the first row arrives (under the ``Trainer`` with
            ``report_to="wandb"`` or Lightning's ``WandbLogger``, the run they started).
            This mirror never finishes the run.
        prefix: the first part of every key.

    Raises:
        RuntimeError: (at the first row) no run was given and none is active.
    """

    def __init__(self, run: Any = None, *, prefix: str = "landscape") -> None:
        super().__init__(prefix)
        self._run = run
        self._defined = False

    @property
    def run(self) -> Any:
        """The W&B run mirrored to (resolved at first use)."""
        if self._run is None:
            try:
                import wandb
            except ImportError as err:
                raise _needs("wandb", "wandb") from err
            if wandb.run is None:
                raise RuntimeError("WandbMirror: no active W&B run; call wandb.init() first "
                                   "or pass run=")
            self._run = wandb.run
        if not self._defined:
            self._defined = True
            self._run.define_metric(f"{self.prefix}/step")
            self._run.define_metric(f"{self.prefix}/*", step_metric=f"{self.prefix}/step")
        return self._run

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """One ``run.log`` per step, with ``<prefix>/step``."""
        self.run.log({f"{self.prefix}/step": step, **values})

    def write_finding(self, finding: Finding, count: int) -> None:
        """The finding's text under ``<prefix>/finding`` and the count, at its step."""
        self.run.log({f"{self.prefix}/step": finding.step,
                      f"{self.prefix}/findings/count": count,
                      f"{self.prefix}/finding": str(finding)})


class MLflowMirror(Mirror):
    """Mirror to an MLflow run.

    Args:
        run_id: the run; ``None``: the active run (``mlflow.active_run()``) when the first
            row arrives (under the ``Trainer`` with ``report_to="mlflow"``, the run it
            started).
        tracking_uri: where the run lives (default: MLflow's current tracking URI).
        client: an ``MlflowClient`` to use instead (Lightning's ``MLFlowLogger.experiment``).
        prefix: the first part of every metric name.

    Raises:
        RuntimeError: (at the first row) no run was given and none is active.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        client: Any = None,
        prefix: str = "landscape",
    ) -> None:
        super().__init__(prefix)
        self._run_id = run_id
        self._tracking_uri = tracking_uri
        self._client = client

    def _target(self) -> tuple[Any, str]:
        if self._client is None or self._run_id is None:
            try:
                import mlflow
                from mlflow.tracking import MlflowClient
            except ImportError as err:
                raise _needs("mlflow", "mlflow") from err
            if self._run_id is None:
                active = mlflow.active_run()
                if active is None:
                    raise RuntimeError("MLflowMirror: no active MLflow run; call "
                                       "mlflow.start_run() first or pass run_id=")
                self._run_id = active.info.run_id
            if self._client is None:
                self._client = MlflowClient(tracking_uri=self._tracking_uri)
        return self._client, self._run_id

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """``log_batch`` of the step's metrics (1000 per call, MLflow's limit)."""
        from mlflow.entities import Metric

        client, run_id = self._target()
        now = _millis()
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def write_finding(self, finding: Finding, count: int) -> None:
        """The count as a metric and the text as the tag ``landscape.finding.<n>``."""
        from mlflow.entities import Metric

        client, run_id = self._target()
        client.log_batch(run_id, metrics=[
            Metric(f"{self.prefix}/findings/count", float(count), _millis(), finding.step)
        ])
        client.set_tag(run_id, f"{self.prefix}.finding.{count:04d}", str(finding)[:5000])


class LightningLoggerMirror(Mirror):
    """Mirror through a Lightning logger's ``log_metrics(metrics, step)``.

    The finding text goes where the logger's backend has a place for it: TensorBoard's
    ``add_text``, a W&B run's ``log``, MLflow tags; other loggers get the count only.

    Args:
        logger: a ``lightning.pytorch.loggers.Logger``.
        prefix: the first part of every metric name.
    """

    def __init__(self, logger: Any, *, prefix: str = "landscape") -> None:
        super().__init__(prefix)
        self.logger = logger

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """``logger.log_metrics(values, step)``."""
        self.logger.log_metrics(values, step=step)

    def write_finding(self, finding: Finding, count: int) -> None:
        """The count through ``log_metrics``, the text through the backend."""
        self.logger.log_metrics({f"{self.prefix}/findings/count": float(count)},
                                step=finding.step)
        text = str(finding)
        experiment = getattr(self.logger, "experiment", None)
        run_id = getattr(self.logger, "run_id", None)
        if hasattr(experiment, "add_text"):  # TensorBoardLogger: a SummaryWriter
            experiment.add_text(f"{self.prefix}/findings", text, finding.step)
        elif run_id is not None and hasattr(experiment, "set_tag"):  # MLFlowLogger
            experiment.set_tag(run_id, f"{self.prefix}.finding.{count:04d}", text[:5000])
        elif hasattr(experiment, "log") and hasattr(experiment, "define_metric"):  # W&B
            experiment.log({f"{self.prefix}/finding": text})

    def close(self) -> None:
        """Write what is buffered and ask the logger to save."""
        super().close()
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def trainer_tensorboard_dir(args: Any) -> str:
    """The directory the ``Trainer``'s ``TensorBoardCallback`` writes to.

    ``TENSORBOARD_LOGGING_DIR`` or ``args.logging_dir`` when set; otherwise the newest
    directory under ``<output_dir>/runs`` that holds an event file of this process (the
    Trainer names it after the start time, so it is found, not recomputed); otherwise
    ``<output_dir>/runs/landscape``.

    Args:
        args: the ``TrainingArguments``.

    Returns:
        The directory.
    """
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    explicit = getattr(args, "logging_dir", None)
    if explicit:
        return str(explicit)
    root = Path(args.output_dir) / "runs"
    mine = f".{socket.gethostname()}.{os.getpid()}."
    events = [p for p in glob.glob(str(root / "*" / "events.out.tfevents.*")) if mine in p]
    if events:
        return os.path.dirname(max(events, key=os.path.getmtime))
    return str(root / "landscape")


def report_to_mirrors(report_to: str | Iterable[str] | None, args: Any = None) -> list[Mirror]:
    """Mirrors for the ``report_to`` entries of ``transformers.TrainingArguments``.

    ``"tensorboard"`` mirrors to the Trainer's TensorBoard directory
    (:func:`trainer_tensorboard_dir`), ``"wandb"`` to the active W&B run, ``"mlflow"`` to
    the active MLflow run (both started by the Trainer's own callbacks before ours);
    ``"all"`` means those of the three that are installed, as for the Trainer. Other
    entries (``"comet_ml"``, ...) have no mirror and are ignored.

    Args:
        report_to: the entries (a string or a list; ``None``/``"none"``: nothing).
        args: the ``TrainingArguments`` (for the TensorBoard directory).

    Returns:
        The mirrors.
    """
    if report_to is None:
        return []
    entries = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in entries:
        entries = [name for name, module in
                   (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
                   if _installed(module)]
    out: list[Mirror] = []
    for entry in dict.fromkeys(entries):
        if entry == "tensorboard":
            out.append(TensorBoardMirror(trainer_tensorboard_dir(args)))
        elif entry == "wandb":
            out.append(WandbMirror())
        elif entry == "mlflow":
            out.append(MLflowMirror())
    return out


def lightning_logger_mirrors(loggers: Iterable[Any]) -> list[Mirror]:
    """One :class:`LightningLoggerMirror` per Lightning logger (``trainer.loggers``).

    Args:
        loggers: the loggers.

    Returns:
        The mirrors.
    """
    return [LightningLoggerMirror(logger) for logger in loggers if logger is not None]
