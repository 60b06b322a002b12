"""Post-hoc analysis of checkpoints: the library behind ``landscape analyze``.

Each checkpoint is loaded into one model instance, in step order, and the chosen metrics
(the same plugins the :class:`~landscape.Monitor` uses, all due at every checkpoint) are
computed on the given data and appended to one run file; ``/checkpoints`` records which file
produced which step. Lanczos warm starts carry over from one checkpoint to the next.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from landscape._errors import LandscapeError
from landscape.loading import Checkpoint, load_checkpoint, load_state_into, prepare
from landscape.metrics import create
from landscape.monitor import Monitor

__all__ = ["ANALYZE_METRICS", "analyze", "check_loss", "discard_if_empty", "order_checkpoints"]

ANALYZE_METRICS = ("top_eigenvalues", "sharpness", "hessian_trace", "spectral_density", "collapse",
                   "representation")


def order_checkpoints(checkpoints: Sequence[Checkpoint]) -> list[tuple[int, Checkpoint]]:
    """``(step, checkpoint)`` pairs sorted by step.

    Steps come from the checkpoint, its file name or its folder (see
    :func:`landscape.loading.step_from_name`); when none has one, the given order numbers
    them 0, 1, ... Two checkpoints of the same step are an error.

    Args:
        checkpoints: the loaded checkpoints, in any order.

    Returns:
        The pairs in increasing step order.

    Raises:
        LandscapeError: when only some checkpoints have a step, or two share one.
    """
    if all(c.step is None for c in checkpoints):
        return list(enumerate(checkpoints))
    missing = [str(c.path) for c in checkpoints if c.step is None]
    if missing:
        raise LandscapeError(f"cannot tell the training step of {missing[0]} "
                             "(name it ...-N.pt, or put it in a folder checkpoint-N/)")
    pairs = sorted(((int(c.step), c) for c in checkpoints), key=lambda p: p[0])  # type: ignore[arg-type]
    for (a, ca), (b, cb) in itertools.pairwise(pairs):
        if a == b:
            raise LandscapeError(f"{ca.path} and {cb.path} are both step {a}")
    return pairs


def _optimizer(model: nn.Module, spec: dict[str, Any] | None) -> torch.optim.Optimizer | None:
    """An optimizer that is never stepped: it only tells the sharpness metric its threshold."""
    if not spec:
        return None
    kind = str(spec.get("name", "sgd")).lower()
    kwargs = {k: v for k, v in spec.items() if k != "name" and v is not None}
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if kind not in classes:
        raise LandscapeError(f"optimizer {kind!r}: use one of {', '.join(classes)}")
    if kind.startswith("adam"):
        raise LandscapeError("Adam's threshold needs its second moments, which checkpoints "
                             "of the model alone do not hold; use sgd or leave it out")
    return classes[kind](model.parameters(), **kwargs)


def check_loss(net: nn.Module, loss_fn: Callable, batches: Sequence[Any], ckpt: Checkpoint) -> None:
    """Refuse data on which the loss is not a finite number (a clear error, not NaN rows).

    Args:
        net: the model, holding the weights of ``ckpt``.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar.
        batches: the data, as :func:`landscape.loading.prepare` returns it.
        ckpt: the checkpoint loaded into ``net`` (named in the error).

    Raises:
        LandscapeError: when the model or the loss fails on a batch, the loss is not a
            scalar, or it is not finite.
    """
    from landscape.isolation import isolated
    from landscape.metrics import split_batch

    for batch in batches:
        inputs, targets = split_batch(batch)
        try:
            with isolated(net), torch.no_grad():
                value = loss_fn(net(inputs), targets)
        except Exception as err:
            raise LandscapeError(
                f"{ckpt.path}: the model or loss fails on the data: {err}"
            ) from err
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise LandscapeError("the loss function must return a scalar tensor")
        if not torch.isfinite(value).all():
            raise LandscapeError(
                f"{ckpt.path}: the loss on the data is {float(value)} (not finite)"
            )


def _holds_nothing(path: Path) -> bool:
    """Whether the run file ``path`` holds no row, finding, checkpoint or surface point."""
    from landscape.store import Run

    try:
        with Run.open(path) as run:
            summary = run.summary()
    except Exception:
        return True  # an unreadable file a failed command created is of no use either
    return (
        not any(m["rows"] for m in summary["metrics"].values())
        and not summary["findings"]
        and not summary["checkpoints"]
        and not any(s["computed"] for s in summary["surfaces"].values())
    )


@contextlib.contextmanager
def discard_if_empty(path: str | Path | None) -> Iterator[None]:
    """Remove the run file ``path`` when the block fails after creating it empty.

    A file that existed before the block is never removed, nor one that holds rows or
    surface points (an interrupted analysis resumes from it).

    Args:
        path: the run file the block writes (None: in memory, nothing to do).

    Yields:
        Nothing; the block runs as it is.
    """
    existed = path is None or Path(path).exists()
    try:
        yield
    except BaseException:
        if not existed and Path(path).is_file() and _holds_nothing(Path(path)):  # type: ignore[arg-type]
            with contextlib.suppress(OSError):
                Path(path).unlink()  # type: ignore[arg-type]
        raise


def _recorded_steps(path: str | Path | None, mode: str, names: Sequence[str]) -> dict[str, list]:
    """The steps each of the metrics ``names`` already has in the run file (appending)."""
    if path is None or mode != "a" or not Path(path).is_file():
        return {}
    from landscape.store import Run

    with Run.open(path) as run:
        return {m: [int(s) for s in run.steps(m)] for m in names if m in run.metrics()}


def _to_compute(
    loaded: list[tuple[int, Checkpoint]], recorded: dict[str, list], names: Sequence[str],
    path: str | Path | None,
) -> list[tuple[int, Checkpoint]]:
    """The checkpoints whose step is not yet in the run file for every metric (resuming).

    A step that every metric has is skipped (with a warning); one that cannot follow the
    rows already recorded is an error that says how to start over.
    """
    if not recorded:
        return loaded
    have = {m: set(recorded.get(m, ())) for m in names}
    last = {m: max(steps) for m, steps in recorded.items() if steps}
    todo, skipped = [], []
    for step, ckpt in loaded:
        if all(step in have[m] for m in names):
            skipped.append(step)
            continue
        before = [m for m, s in last.items() if step <= s]
        if before:
            m = before[0]
            raise LandscapeError(
                f"{path}: step {step} ({ckpt.path}) does not come after step {last[m]}, the "
                f"last one {m!r} has in the file; to start over, overwrite the file "
                "(mode='w'; on the command line --overwrite) or write to another one"
            )
        todo.append((step, ckpt))
    if skipped:
        warnings.warn(
            f"{path}: step{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} "
            "already recorded, skipped (overwrite the file to recompute them: mode='w', "
            "--overwrite)",
            stacklevel=3,
        )
    return todo


def analyze(
    checkpoints: Sequence[str | Path],
    model: nn.Module | Callable[[], nn.Module],
    data: Any,
    loss_fn: Callable[..., torch.Tensor],
    path: str | Path | None,
    *,
    metrics: Sequence[str] = ANALYZE_METRICS,
    k: int = 5,
    optimizer: dict[str, Any] | None = None,
    trust: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    mode: str = "a",
    microbatch_size: int | None = None,
) -> Monitor:
    """Compute ``metrics`` for every checkpoint into the run file ``path``.

    ``data`` is one ``(inputs, targets)`` batch or an iterable of them (curvature is the
    size-weighted mean over batches; feature metrics see all batches concatenated).
    ``optimizer`` (e.g. ``{"name": "sgd", "lr": 0.1, "momentum": 0.9}``) sets the
    edge-of-stability threshold of the sharpness metric. ``microbatch_size`` bounds the
    memory of the curvature products (:class:`~landscape.curvature.Hessian`).

    Appending (``mode="a"``) to a run file that already holds some of the checkpoints
    resumes: steps every chosen metric has are skipped; ``mode="w"`` starts the file over.
    A run file this call created is removed again when it fails before writing a row.

    Returns:
        The closed monitor (``.findings``); read what it wrote with
        ``landscape.Run.open(path)``.

    Raises:
        LandscapeError: on a checkpoint, factory or data that cannot be used, or a step
            that cannot follow the rows already in the file.
    """
    if not checkpoints:
        raise LandscapeError("no checkpoints given")
    net, batches = prepare(model, data, device)
    loaded = order_checkpoints([load_checkpoint(c, trust=trust) for c in checkpoints])
    chosen = []
    for name in metrics:
        metric = create(name, schedule=1)  # an old name warns and gives the renamed metric
        chosen.append(create(metric.name, k=k, schedule=1)
                      if metric.name == "top_eigenvalues" else metric)
    opt = _optimizer(net, optimizer)
    net.eval()
    monitor = Monitor(net, loss_fn, None if path is None else str(path), optimizer=opt,
                      metrics=chosen, probe=batches if len(batches) > 1 else batches[0],
                      mode=mode, microbatch_size=microbatch_size,
                      config={"analysis": {"checkpoints": [str(c) for c in checkpoints]}})
    todo = _to_compute(loaded, _recorded_steps(path, mode, [m.name for m in chosen]),
                       [m.name for m in chosen], path)
    for _, ckpt in todo:  # every checkpoint must fit the model before the file is touched
        load_state_into(net, ckpt)
    from tqdm.auto import tqdm

    with discard_if_empty(path), monitor:
        for step, ckpt in tqdm(todo, desc="checkpoints", unit="ckpt", disable=not progress):
            load_state_into(net, ckpt)
            check_loss(net, loss_fn, batches, ckpt)
            monitor.step(step)
            assert monitor.writer is not None
            monitor.writer.record_checkpoint(step, str(ckpt.path))
    return monitor
