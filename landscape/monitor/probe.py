"""The default probe: the first training batch's first samples, kept for the whole run.

Without ``probe=``, the metrics on probe data (curvature, representations, sentinels) read
a copy of the first ``probe_size`` samples of the first batch the monitor sees
(docs/monitor.md). The copy is stored in the run file (up to :data:`PROBE_BYTES`), so a
resumed run measures on the same samples and its rows stay comparable across the resume.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import torch

from landscape import distributed as _dist
from landscape.batches import (
    cast_like,
    head,
    in_containers_of,
    leading_size,
    map_tensors,
    plain_containers,
    rebuilt,
)
from landscape.capture import first_tensor
from landscape.metrics.batch_parts import each_batch, inputs_in, is_batch_list, target_place
from landscape.store import RunWriter

__all__ = ["PROBE_BYTES", "PROBE_NOTE", "inputs_in_models_dtype", "restore_probe", "store_probe",
           "take_probe", "targets_in_batch_dtype"]

_log = logging.getLogger("landscape")
PROBE_BYTES = 64 * 2**20  # the largest default probe stored in the run file for a resume


def _layout(batch: Any) -> list[tuple[int, torch.dtype]]:
    """Each tensor's number of dimensions and dtype, in order.

    Not their sizes: a language model's sequences may vary in length from batch to batch.
    """
    found: list[tuple[int, torch.dtype]] = []
    map_tensors(batch, lambda t: found.append((t.dim(), t.dtype)))
    return found


def _parts(batch: Any) -> Any:
    """What a micro-batch holds, for telling a list of batches from one batch of parts.

    A mapping's keys with their tensors' dimensions (in any order, any dtype), or a
    sequence's dimensions; sizes never count (a last micro-batch may be short).
    """
    if isinstance(batch, Mapping):
        return frozenset((k, v.dim() if isinstance(v, torch.Tensor) else None)
                         for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return tuple(v.dim() if isinstance(v, torch.Tensor) else None for v in batch)
    return None


PROBE_NOTE = ("landscape: no probe= given; the monitor keeps the first %d samples of the "
              "first training batch as its fixed probe (probe_size=None turns this off)")
"""What :func:`take_probe` logs once (the demo, whose own choice it is, leaves it out)."""


LIST_NOTE = ("landscape: the first training batch is a list of %d parts laid out "
             "differently, read as micro-batches (several batches); if it is one batch of "
             "several parts (a query and a document: a DataLoader collates tuple samples "
             "into a list), pass batch=tuple(batch) to step(); under a callback, give the "
             "loader a collate_fn that returns a tuple")
"""What :func:`take_probe` logs when a list of batches looks like one batch of parts."""


def take_probe(batch: Any, size: int) -> tuple[Any, int]:
    """A detached copy of the first ``size`` samples of ``batch``, and how many it holds.

    From a list of micro-batches (:func:`~landscape.metrics.batch_parts.is_batch_list`), the
    first ``size`` samples across them in order, as a list of as many as they fill (empty
    ones skipped); a warning when the list's parts are laid out differently
    (:data:`LIST_NOTE`). The monitor says once on the ``landscape`` logger that it took
    it (rank 0 under ``torch.distributed``).
    """
    if is_batch_list(batch):  # micro-batches: the first samples across them, in order
        if len({_parts(part) for part in batch}) > 1 and _dist.rank() == 0:
            _log.warning(LIST_NOTE, len(batch))
        parts, kept = [], 0
        for part in batch:
            if kept >= size:
                break
            have = leading_size(part)
            n = size - kept if have is None else min(size - kept, have)
            if n > 0:  # (an empty micro-batch adds nothing)
                parts.append(head(part, n))
                kept += n
        probe = map_tensors(parts or [head(batch[0], size)], lambda t: t.detach().clone())
    else:
        probe = map_tensors(head(batch, size), lambda t: t.detach().clone())
        kept = leading_size(probe) or size
    if _dist.rank() == 0:  # every rank takes its own; one says so
        _log.warning(PROBE_NOTE, kept)
    return probe, kept


def store_probe(writer: RunWriter, probe: Any) -> None:
    """Keep ``probe`` in the run file, so that a resumed run reads it back.

    A batch that does not pickle, or is larger than :data:`PROBE_BYTES`, is not stored
    (said once): a resumed run then takes a new probe.
    """
    buffer = io.BytesIO()
    try:
        torch.save(plain_containers(probe), buffer)
    except Exception as err:  # a batch type that does not pickle: resume takes anew
        _log.warning("landscape: the default probe cannot be stored in the run file "
                     "(%s); a resumed run will take a new one", err)
        return
    if buffer.tell() > PROBE_BYTES:
        _log.warning("landscape: the default probe (%.0f MiB) is too large to store in "
                     "the run file; a resumed run will take a new one",
                     buffer.tell() / 2**20)
        return
    writer.save_blob("probe", buffer.getvalue())


def restore_probe(writer: RunWriter, batch: Any) -> Any | None:
    """Resuming a run that took its probe from its first batch: that probe, read back.

    The probe moves to the device of ``batch`` and takes its container types.

    Returns:
        The probe, or ``None`` for a new run, a run truncated before its probe was taken,
        or a file without a readable stored probe (said once); then a new one is taken.
    """
    if writer.last_step("probe") is None:
        return None
    data = writer.load_blob("probe")
    probe, why = None, "is not stored in its file"
    if data is not None:
        try:
            probe = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # written by a newer torch, damaged: take a new one
            why = f"cannot be read back ({err})"
    # a probe taken from micro-batches holds as many as it needed: each is laid out as
    # this run's micro-batch of its place (the last one's past the end)
    several = is_batch_list(batch) and is_batch_list(probe)

    def like(i: int) -> Any:  # the run's micro-batch that stored part i is read against
        return batch[min(i, len(batch) - 1)]

    fits = (all(_layout(part) == _layout(like(i)) for i, part in enumerate(probe))
            if several else probe is not None and _layout(probe) == _layout(batch))
    if probe is not None and not fits:
        # another model appended to the file (a warning said so): its batches differ
        probe, why = None, "does not fit this run's batches (other shapes or dtypes)"
    if probe is None:
        _log.warning("landscape: resuming a run whose default probe %s; a new probe is "
                     "taken from this batch, so the probe metrics are not comparable "
                     "across this step", why)
        return None
    first = first_tensor(batch)  # the probe goes where this run's batches are
    if first is not None:
        probe = map_tensors(probe, lambda t: t.to(first.device))
    _log.info("landscape: resuming with the probe stored in the run file")
    if several:
        return [in_containers_of(part, like(i)) for i, part in enumerate(probe)]
    return in_containers_of(probe, batch)


def _say_cast(cast: list[torch.dtype], what: str, to: str) -> None:
    if cast:
        _log.info("landscape: the probe's %s %s tensors are cast to %s",
                  ", ".join(str(d).removeprefix("torch.") for d in cast), what, to)


def inputs_in_models_dtype(probe: Any, dtype: torch.dtype | None) -> Any:
    """A probe with its inputs' floating-point tensors in the dtype of the model's weights.

    A model trained in bfloat16 given a float32 probe failed every probe metric on "mat1
    and mat2 must have the same dtype"; so did a default probe taken from float32 batches
    that a wrapper casts on the way in (Lightning Fabric's ``bf16-true``). The inputs are
    cast to the weights' one floating dtype (``dtype``; None: they mix several) before
    any metric or the Taylor guard reads
    the probe (:func:`~landscape.metrics.batch_parts.inputs_in`); the targets stay as given,
    and a model whose weights mix floating dtypes gets the probe as it is. The first
    training batch then sets the targets' dtype (:func:`targets_in_batch_dtype`).
    """
    if dtype is None:  # weights of several floating dtypes
        return probe
    probe, cast = each_batch(probe, lambda b: inputs_in(b, dtype))
    _say_cast(cast, "input", f"the model's {str(dtype).removeprefix('torch.')}")
    return probe


def targets_in_batch_dtype(probe: Any, given: Any, batch: Any) -> Any:
    """``probe`` with its floating-point targets in the dtype of the training batch's targets.

    Read from the probe as it was ``given`` (never a copy already rounded), where both
    hold their targets at the same kind of place
    (:func:`~landscape.metrics.batch_parts.target_place`) and those are laid out alike
    (:func:`~landscape.batches.cast_like`): a loop that keeps its float targets in
    float32 keeps the probe's in float32, one that casts them casts the probe's too.
    """
    place, batch_place = target_place(given), target_place(batch)
    if place is None or batch_place is None or type(place) is not type(batch_place):
        return probe
    targets, cast = cast_like(given[place], batch[batch_place])
    if not cast:
        return probe
    if isinstance(probe, Mapping):
        out = rebuilt(probe, {**probe, place: targets})
    else:
        out = rebuilt(probe, [targets if i == place else v for i, v in enumerate(probe)])
    _say_cast(cast, "target", "the dtype of the training batch's")
    return out
