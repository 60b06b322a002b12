"""Post-hoc analysis of checkpoints: the library behind ``landscape analyze``.

Each checkpoint is loaded into one model instance, in step order, and the chosen metrics
(the same plugins the :class:`~landscape.Monitor` uses, all due at every checkpoint) are
computed on the given data and appended to one run file; ``/checkpoints`` records which file
produced which step. Lanczos warm starts carry over from one checkpoint to the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from landscape._errors import LandscapeError
from landscape.loading import Checkpoint, load_checkpoint, load_state_into, prepare
from landscape.metrics import create
from landscape.monitor import Monitor

__all__ = ["ANALYZE_METRICS", "analyze", "order_checkpoints"]

ANALYZE_METRICS = ("hessian", "sharpness", "hessian_trace", "spectral_density", "collapse",
                   "representation")


def order_checkpoints(checkpoints: Sequence[Checkpoint]) -> list[tuple[int, Checkpoint]]:
    """``(step, checkpoint)`` pairs sorted by step.

    Steps come from the checkpoint (or its file name); when none has one, the given order
    numbers them 0, 1, ... Two checkpoints of the same step are an error.
    """
    if all(c.step is None for c in checkpoints):
        return list(enumerate(checkpoints))
    missing = [str(c.path) for c in checkpoints if c.step is None]
    if missing:
        raise LandscapeError(f"cannot tell the training step of {missing[0]} (name it ...-N.pt)")
    pairs = sorted(((int(c.step), c) for c in checkpoints), key=lambda p: p[0])  # type: ignore[arg-type]
    for (a, ca), (b, cb) in zip(pairs, pairs[1:]):
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


def _check_loss(net: nn.Module, loss_fn: Callable, batch: Any, ckpt: Checkpoint) -> None:
    """Refuse data on which the loss is not a finite number (a clear error, not NaN rows)."""
    from landscape.isolation import isolated
    from landscape.metrics import split_batch

    inputs, targets = split_batch(batch)
    try:
        with isolated(net), torch.no_grad():
            value = loss_fn(net(inputs), targets)
    except Exception as err:
        raise LandscapeError(f"{ckpt.path}: the model or loss fails on the data: {err}") from err
    if value.numel() != 1:
        raise LandscapeError("the loss function must return a scalar")
    if not torch.isfinite(value).all():
        raise LandscapeError(f"{ckpt.path}: the loss on the data is {float(value)} (not finite)")


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
    memory of the curvature products (:class:`~landscape.curvature.Hessian`). Returns the
    closed monitor (``.findings``, ``.run()``).
    """
    if not checkpoints:
        raise LandscapeError("no checkpoints given")
    net, batches = prepare(model, data, device)
    loaded = order_checkpoints([load_checkpoint(c, trust=trust) for c in checkpoints])
    chosen = []
    for name in metrics:
        chosen.append(create(name, k=k, schedule=1) if name == "hessian"
                      else create(name, schedule=1))
    opt = _optimizer(net, optimizer)
    net.eval()
    monitor = Monitor(net, loss_fn, None if path is None else str(path), optimizer=opt,
                      metrics=chosen, probe=batches if len(batches) > 1 else batches[0],
                      mode=mode, microbatch_size=microbatch_size,
                      config={"analysis": {"checkpoints": [str(c) for c in checkpoints]}})
    from tqdm.auto import tqdm

    with monitor:
        for step, ckpt in tqdm(loaded, desc="checkpoints", unit="ckpt", disable=not progress):
            load_state_into(net, ckpt)
            _check_loss(net, loss_fn, batches[0], ckpt)
            monitor.step(step)
            assert monitor.writer is not None
            monitor.writer.record_checkpoint(step, str(ckpt.path))
    return monitor
