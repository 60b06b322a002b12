"""Post-hoc analysis of checkpoints: the library behind ``landscape analyze``.

Each checkpoint is loaded into one model instance, in step order, and the chosen metrics
(the same plugins the :class:`~landscape.Monitor` uses, all due at every checkpoint) are
computed on the given data and appended to one run file; ``/checkpoints`` records which file
produced which step. Lanczos warm starts carry over from one checkpoint to the next.

The rows of a checkpoint are committed together with its ``/checkpoints`` entry, so an
analysis that is interrupted (Ctrl-C, SIGTERM, a crash) leaves every finished checkpoint in
the file and the same call resumes after the last one. The optimizer's settings saved with
a checkpoint (:mod:`landscape.checkpoints.optim`) set the sharpness threshold when none are
given.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from landscape._errors import LandscapeError
from landscape._hf import counts_next_tokens, next_token_targets
from landscape.batches import map_tensors, model_call
from landscape.checkpoints.lightning import is_last_copy
from landscape.failures import nonfinite_state
from landscape.findings import Finding
from landscape.loading import (
    Checkpoint,
    load_checkpoint,
    load_state_into,
    prepare,
    refuse_mismatch,
)
from landscape.metrics import create
from landscape.monitor import Monitor

__all__ = [
    "ANALYZE_METRICS",
    "DEFAULT_METRICS",
    "NO_LEARNING_RATE",
    "analyze",
    "check_loss",
    "discard_if_empty",
    "order_checkpoints",
]

ANALYZE_METRICS = ("top_eigenvalues", "sharpness", "hessian_trace", "spectral_density", "collapse",
                   "representation")
# what analyze computes unless told: about 30 curvature products per checkpoint (top-3
# Lanczos, shared with sharpness) and one forward pass. hessian_trace (30 more products) and
# spectral_density (stochastic Lanczos quadrature, lanczos_steps x n_probes products) are
# opt-in: on a 1M-parameter GPT-2 the density took 98.6 of 131.8 s of one checkpoint.
DEFAULT_METRICS = ("top_eigenvalues", "sharpness", "collapse", "representation")


def order_checkpoints(
    checkpoints: Sequence[Checkpoint], *, given_order_if_unknown: bool = False,
) -> list[tuple[int, Checkpoint]]:
    """``(step, checkpoint)`` pairs sorted by step.

    Steps come from the checkpoint, its file name or its folder (see
    :func:`landscape.loading.step_from_name`). When none has one, they are numbered 0, 1,
    ... in the order of the numbers that alone tell their paths apart (``run2/model.pt``
    before ``run10/model.pt``, which a shell's glob lists first), else in the given order
    (``init.pt final.pt``). Steps read from file names that collide (``epoch_1/resnet18.pt``
    and ``epoch_2/resnet18.pt``: both 18) give way to the epochs saved in the files.

    Args:
        checkpoints: the loaded checkpoints, in any order.
        given_order_if_unknown: number them in the given order, rather than fail, when
            only some have a step or two share one (an interpolation between
            ``net18_init.pt`` and ``net18_final.pt``, both "step 18").

    Returns:
        The pairs in increasing step order.

    Raises:
        LandscapeError: when only some checkpoints have a step, or two share one (unless
            ``given_order_if_unknown``).
    """
    if all(c.step is None for c in checkpoints):
        return list(enumerate(_by_path_numbers(checkpoints)))
    missing = [str(c.path) for c in checkpoints if c.step is None]
    if missing:
        if given_order_if_unknown:
            return list(enumerate(checkpoints))
        raise LandscapeError(f"cannot tell the training step of {missing[0]} "
                             "(name it ...-N.pt, or put it in a folder checkpoint-N/)")
    steps = [int(c.step) for c in checkpoints]  # type: ignore[arg-type]
    epochs = [c.epoch for c in checkpoints]
    if len(set(steps)) < len(steps) and None not in epochs and len(set(epochs)) == len(epochs):
        steps = epochs  # numbers of the names that are not steps: the saved epochs are
    pairs = sorted(zip(steps, checkpoints), key=lambda p: p[0])
    # Lightning's ModelCheckpoint(save_last=True) writes last.ckpt, a copy of the latest
    # checkpoint: a shell glob (ckpts/*.ckpt) lists it beside the one it repeats
    pairs = [(s, c) for s, c in pairs
             if not (is_last_copy(c.path) and sum(t == s for t, _ in pairs) > 1)]
    for (a, ca), (b, cb) in itertools.pairwise(pairs):
        if a == b:
            if given_order_if_unknown:
                return list(enumerate(checkpoints))
            raise LandscapeError(f"{ca.path} and {cb.path} are both step {a}")
    return pairs


def _by_path_numbers(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    """Sorted by the numbers in their paths when only those tell them apart, else as given."""
    split = [re.split(r"(\d+)", str(c.path)) for c in checkpoints]
    if len({tuple(parts[0::2]) for parts in split}) != 1:  # other words differ
        return list(checkpoints)
    keys = [tuple(int(n) for n in parts[1::2]) for parts in split]
    return [c for _, c in sorted(zip(keys, checkpoints), key=lambda kc: kc[0])]


NO_LEARNING_RATE = (
    "sharpness: the optimizer's learning rate was not found (none given, and the checkpoints "
    "hold no optimizer state analyze reads), so its threshold and ratio are NaN and the "
    "edge_of_stability rule cannot fire; pass the training's settings: on the command line "
    "--lr and --momentum, in Python optimizer={'name': 'sgd', 'lr': ..., 'momentum': ...}"
)
"""The warning :func:`analyze` gives when the sharpness metric has no learning rate."""

_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_HYPER = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad")


def _readable(settings: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's saved optimizer settings give a threshold (SGD, Adam, AdamW)."""
    return bool(settings) and settings.get("name") is not None  # type: ignore[union-attr]


def _say_momentum_left_out(optimizer: dict[str, Any] | None,
                           loaded: Sequence[tuple[int, Checkpoint]]) -> None:
    """Warn when SGD settings given without a momentum meet checkpoints that saved one.

    ``--lr`` alone is plain SGD (momentum 0, the threshold 2/lr), while restating the
    saved rate of an SGD-with-momentum run changed its threshold 1.9x without a word.
    """
    if not optimizer or optimizer.get("momentum") is not None \
            or str(optimizer.get("name", "sgd")).lower() != "sgd":
        return
    saved = next((c.optimizer for _, c in loaded if c.optimizer
                  and c.optimizer.get("name") == "sgd" and (c.optimizer.get("momentum") or 0) > 0),
                 None)
    if saved is not None:
        warnings.warn(f"sharpness: the learning rate given without a momentum is plain SGD's "
                      f"(momentum 0, threshold 2/lr), while the checkpoints' optimizer saved "
                      f"momentum {saved['momentum']:g}: pass --momentum {saved['momentum']:g} "
                      "(in Python optimizer={..., 'momentum': ...}) to use it", stacklevel=3)


def _say_no_saved_optimizer(ckpt: Checkpoint) -> None:
    """Warn that a checkpoint among others that saved their optimizer gets no threshold.

    It took the settings (and Adam's moments) of the checkpoint before it, or of a later one
    when it came first, without a word: a threshold 6x off where an ``optimizer.pt`` was
    unreadable.
    """
    unread = (ckpt.optimizer or {}).get("unread")
    what = (f"its optimizer ({unread}) is not one analyze reads (SGD, Adam, AdamW)"
            if unread else "it holds no optimizer state analyze can read (none saved, or "
            "an optimizer file that cannot be read)")
    warnings.warn(f"{ckpt.path}: {what}: its sharpness threshold and ratio are NaN; pass "
                  "--lr and --momentum for SGD's threshold (in Python optimizer=), or record "
                  "the sharpness during training with the Monitor, which reads the live "
                  "optimizer", stacklevel=3)


def _optimizer(model: nn.Module, spec: dict[str, Any] | None) -> torch.optim.Optimizer | None:
    """An optimizer that is never stepped: it only tells the sharpness metric its threshold."""
    if not spec:
        return None
    kind = str(spec.get("name", "sgd")).lower()
    kwargs = {k: v for k, v in spec.items() if k in _HYPER and v is not None}
    if kind not in _CLASSES:
        raise LandscapeError(f"optimizer {kind!r}: use one of {', '.join(_CLASSES)}")
    if kind.startswith("adam") and "state_dict" not in spec:
        raise LandscapeError("Adam's threshold needs its second moments, which checkpoints "
                             "of the model alone do not hold; use sgd or leave it out")
    try:
        return _CLASSES[kind]([p for p in model.parameters() if p.requires_grad], **kwargs)
    except (TypeError, ValueError) as err:
        raise LandscapeError(f"optimizer {kind!r}: {err}") from err


def _param_orders(model: nn.Module) -> list[list[nn.Parameter]]:
    """Orders in which a saved optimizer may number the model's trainable parameters.

    The model's own order (``Adam(model.parameters())``, Lightning's usual
    ``configure_optimizers``), and the Hugging Face ``Trainer``'s: the parameters with
    weight decay, then those without (``Trainer.get_decay_parameter_names``).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    orders = [[p for _, p in named]]
    try:
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
        orders.append([p for n, p in named if n in decay] + [p for n, p in named
                                                              if n not in decay])
    except Exception:  # transformers absent: only the model's order
        pass
    return orders


def _apply_saved(opt: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any] | None,
                 ckpt: Checkpoint) -> None:
    """Set ``opt``'s hyper-parameters (and Adam's moments) to those saved with ``ckpt``."""
    if not saved:
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    base = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    base.update({k: v for k, v in saved.items() if k in _HYPER and k in base})
    groups = _saved_groups(saved.get("state_dict"), model, base)
    opt.param_groups[:] = groups or [{**base, "params": params}]
    if groups is None:
        _say_saved_groups(saved, ckpt)
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and "state_dict" in saved:
        from landscape.checkpoints.optim import load_second_moments

        if not load_second_moments(opt, saved["state_dict"], _param_orders(model)):
            opt.state.clear()  # the sharpness row is NaN rather than another step's moments
            warnings.warn(f"{ckpt.path}: the saved Adam state does not match the model's "
                          "parameters in their order (nor in the Hugging Face Trainer's): no "
                          "preconditioned sharpness for it; an optimizer built over "
                          "model.parameters() in order can be read, or record the sharpness "
                          "during training with the Monitor", stacklevel=3)


def _saved_groups(state: Any, model: nn.Module, base: dict[str, Any]
                  ) -> list[dict[str, Any]] | None:
    """The saved optimizer's parameter groups over ``model``'s parameters, when they differ.

    A saved ``state_dict`` numbers the parameters group after group, by position only: an
    order of the model's parameters (:func:`_param_orders`) is taken when the saved states
    bear it out (:func:`~landscape.checkpoints.optim.saved_parameters`) and no two
    parameters of one shape fall in groups of different settings (equal shapes prove
    nothing: layer-wise rates listed from the top layer down would be given to the wrong
    layers). None: one group, groups alike in the settings the threshold reads, or no
    order borne out (plain SGD keeps no state).
    """
    from landscape.checkpoints.optim import saved_parameters
    from landscape.curvature.stability import stability_settings

    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return None
    if len({stability_settings(g) for g in groups if g.get("params")}) < 2:
        return None
    of = saved_parameters(state, _param_orders(model))
    if of is None:
        return None
    settings_of_shape: dict[tuple, set] = {}
    for g in groups:
        for i in g.get("params", []):
            settings_of_shape.setdefault(tuple(of[i].shape), set()).add(stability_settings(g))
    if any(len(found) > 1 for found in settings_of_shape.values()):
        return None  # which of the equal shapes trained at which rate is not borne out
    return [{**base, **{k: g[k] for k in _HYPER if k in g and k in base},
             "params": [of[i] for i in g.get("params", [])]} for g in groups]


def _say_saved_groups(saved: dict[str, Any], ckpt: Checkpoint) -> None:
    """Warn when the saved optimizer's groups trained at different rates (read: the first).

    Its groups number their parameters by position only, and no saved state bore out an
    order of the model's parameters (:func:`_saved_groups`): every parameter gets the
    first group's settings.
    """
    from landscape.curvature.stability import learning_rate

    state = saved.get("state_dict")
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        return
    rates = sorted({learning_rate(g.get("lr")) for g in groups
                    if isinstance(g, dict) and g.get("params")})
    if len(rates) > 1:
        warnings.warn(
            f"{ckpt.path}: its optimizer trained parameter groups at learning rates "
            f"{', '.join(f'{r:g}' for r in rates)}, and its saved state cannot tell which "
            "weight was in which (none saved, or parameters of one shape in groups of "
            "different settings); analyze gives every parameter the first training group's "
            "settings: lambda_max is the Hessian's, not scaled by each group's rate, so the "
            "ratio may be off by up to the ratio of the groups' rates (the Monitor, during "
            "training, scales each group by its own)", stacklevel=4)


def check_loss(net: nn.Module, loss_fn: Callable | None, batches: Sequence[Any], ckpt: Checkpoint,
               closure: Callable | None = None, *, finite: bool = True) -> float:
    """Refuse data on which the loss is not a number (a clear error, not NaN rows).

    Args:
        net: the model, holding the weights of ``ckpt``.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar (or give ``closure``).
        batches: the data, as :func:`landscape.loading.prepare` returns it.
        ckpt: the checkpoint loaded into ``net`` (named in the error).
        closure: ``closure(model, batch)``, the loss (dict batches).
        finite: refuse a loss that is not finite too (a surface of a diverged checkpoint
            holds nothing); ``False`` returns it (``analyze`` records such a checkpoint).

    Returns:
        The loss on the first batch that is not finite, else on the last batch.

    Raises:
        LandscapeError: when the model or the loss fails on a batch, the loss is not a
            scalar, or (with ``finite``) it is not finite.
    """
    from landscape.isolation import isolated
    from landscape.metrics import split_batch

    for batch in batches:
        outputs = None
        try:
            with isolated(net), torch.no_grad():
                if closure is not None:
                    value = closure(net, batch)
                else:
                    inputs, targets = split_batch(batch)
                    args, kwargs = model_call(net, inputs)  # ((x1, x2), y): net(x1, x2)
                    outputs = net(*args, **kwargs)
                    if loss_fn is F.cross_entropy:
                        refuse_constant_cross_entropy(outputs, targets)
                    if loss_fn is F.mse_loss:
                        refuse_broadcast(outputs, targets, ckpt)
                    value = loss_fn(outputs, targets)  # type: ignore[misc]
        except LandscapeError:
            raise
        except Exception as err:
            hint = ""
            if outputs is not None and not isinstance(outputs, torch.Tensor) \
                    and hasattr(outputs, "logits"):
                hint = (f" (the model returns a {type(outputs).__name__}, a Hugging Face "
                        "output, not logits: give dict batches with labels for its own "
                        "loss, or --loss module:fn taking (model, batch); a LightningModule "
                        "around a Hugging Face model is analyzed through that model)")
            elif loss_fn is F.cross_entropy and "out of bounds" in str(err):
                hint = (" (labels past the classes: an ignore_index such as 255 on "
                        "unlabelled pixels? pass --loss module:fn, a function calling "
                        "F.cross_entropy(outputs, targets, ignore_index=255))")
            raise LandscapeError(
                f"{ckpt.path}: the model or loss fails on the data: {err}{hint}"
            ) from err
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise LandscapeError("the loss function must return a scalar tensor")
        if not torch.isfinite(value).all():
            if finite:
                if nonfinite_state(net) == "parameters":
                    raise LandscapeError(f"{ckpt.path}: the weights are not finite (a run "
                                         "that blew up): nothing to evaluate around them")
                raise LandscapeError(
                    f"{ckpt.path}: the loss on the data is {float(value)} (not finite)"
                )
            return float(value)
    return float(value)


def refuse_broadcast(outputs: Any, targets: Any, ckpt: Checkpoint) -> None:
    """Refuse the mean squared error of outputs and targets of different shapes.

    ``F.mse_loss`` broadcasts them (with a warning): ``(N, 1)`` outputs of ``(N,)``
    targets give the mean over an ``(N, N)`` grid of differences, another loss, whose
    curvature and surface the command would record without a word.
    """
    if isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor) \
            and outputs.shape != targets.shape:
        raise LandscapeError(
            f"{ckpt.path}: the mean squared error (--loss mse) of outputs of shape "
            f"{tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} would "
            "broadcast them into another loss; give targets of the outputs' shape from "
            "the data factory (e.g. y[:, None] for one output per sample)")


def refuse_constant_cross_entropy(outputs: Any, targets: Any) -> None:
    """Refuse cross-entropy where it measures nothing (one output, or non-probability targets).

    The softmax of a single logit is 1, so cross-entropy over one output (a regression or
    a one-logit binary head) is 0 at every weight: every eigenvalue 0, a flat surface.
    Float targets of the outputs' shape are read as class probabilities; a regression's
    targets (negative, or rows that do not sum to 1) give a number without meaning.

    Raises:
        LandscapeError: either case, naming the loss to pass instead.
    """
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2:
        return
    if outputs.shape[1] == 1:
        raise LandscapeError(
            "the model gives one output per sample (a regression or a one-logit binary "
            "head): cross-entropy over one output is 0 at every weight; use the mean "
            "squared error or binary cross-entropy (--loss mse or --loss bce_with_logits; "
            "in Python loss_fn=F.mse_loss, ...)")
    if isinstance(targets, torch.Tensor) and targets.is_floating_point() \
            and targets.shape == outputs.shape:
        t = targets.detach().double()
        sums = t.sum(1)
        # rounding of each of C entries in the targets' own dtype (bf16 label smoothing)
        slack = max(1e-3, 2 * targets.shape[1] * torch.finfo(targets.dtype).eps)
        if bool((t < 0).any()) or not torch.allclose(sums, torch.ones_like(sums),
                                                       atol=slack):
            if bool(((t == 0) | (t == 1)).all()):  # several 1s in a row: multi-label
                raise LandscapeError(
                    "the targets are 0/1 floats of the outputs' shape with rows that do "
                    "not sum to 1: multi-label targets; use binary cross-entropy "
                    "(--loss bce_with_logits; in Python "
                    "loss_fn=F.binary_cross_entropy_with_logits): cross_entropy reads "
                    "them as soft labels")
            raise LandscapeError(
                "the targets are floats of the outputs' shape that are not class "
                "probabilities (negative, or rows that do not sum to 1): a regression's "
                "targets; use the mean squared error (--loss mse; in Python "
                "loss_fn=F.mse_loss), or binary cross-entropy for targets in [0, 1] "
                "(--loss bce_with_logits): cross_entropy reads them as soft labels")


def _released(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with its weights dropped until used (:meth:`Checkpoint.release`)."""
    ckpt.release()
    return ckpt


def _check_diverged_or_refuse(net: nn.Module, loss_fn: Callable | None,
                              batches: Sequence[Any], ckpt: Checkpoint,
                              closure: Callable | None, data_known_good: bool = False) -> bool:
    """:func:`check_loss` of the checkpoint loaded into ``net``, a blown-up run let through.

    Args:
        net: the model, holding the checkpoint's weights.
        loss_fn: ``loss_fn(outputs, targets)`` (or ``closure``).
        batches: the data.
        ckpt: the checkpoint (named in the error).
        closure: ``closure(model, batch)``, the loss.
        data_known_good: an earlier checkpoint gave a finite loss on the same data: the
            error then blames the weights, not the data.

    Returns:
        True when the weights themselves are not finite (a run that diverged: its metrics
        can only be NaN, recorded as such); False for a finite loss.

    Raises:
        LandscapeError: the model or loss fails on the data, or the loss is not finite on
            finite weights (the data, or logits beyond float range: nothing to measure).
    """
    value = check_loss(net, loss_fn, batches, ckpt, closure, finite=False)
    if math.isfinite(value):
        return False
    if nonfinite_state(net) != "parameters":
        why = (" on data an earlier checkpoint gave a finite loss on: its finite weights "
               "overflow (a run that blew up; the checkpoints before it are stored)"
               if data_known_good else "")
        raise LandscapeError(
            f"{ckpt.path}: the loss on the data is {value} (not finite){why}")
    return True


def diverged_finding(step: int, ckpt: Checkpoint) -> Finding:
    """The ``nonfinite`` error finding of a checkpoint whose weights are not finite.

    What the monitor's non-finite rule raises on a run that blew up; its metrics are NaN
    (their ``metric_failed`` finding points here), and ``landscape check`` fails the run.
    """
    return Finding(
        step=step, rule="nonfinite", metric="loss", severity="error", value=math.nan,
        threshold=math.nan,
        message=f"{ckpt.path}: the weights are not finite (a run that blew up)",
        hint="restart from an earlier checkpoint with a lower learning rate or gradient "
             "clipping")


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


def _recorded_steps(path: str | Path | None, mode: str, names: Sequence[str],
                    before: int | None = None) -> dict[str, list]:
    """The steps each metric already has in the run file (appending): ``names`` and the others.

    Every metric of the file counts, not only ``names``: a new step must come after all of
    them (the monitor's step order), else nothing may be written. Steps at or after
    ``before`` (a checkpoint interrupted midway) are left out.
    """
    if path is None or mode != "a" or not Path(path).is_file():
        return {}
    from landscape.store import Run

    with Run.open(path) as run:
        return {m: [int(s) for s in run.steps(m) if before is None or s < before]
                for m in run.metrics()}


def _refuse_renumbered(loaded: list[tuple[int, Checkpoint]], path: str | Path | None,
                       mode: str) -> None:
    """Refuse a checkpoint the run file already records under another step.

    A file analysed when the checkpoints had no step (numbered 0, 1, ... in the given
    order), resumed once they have one (renamed, or read by a version that reads their
    folder names), would hold each checkpoint twice under two numberings.

    Raises:
        LandscapeError: naming the checkpoint, both steps and how to start over.
    """
    if path is None or mode != "a" or not Path(path).is_file():
        return
    from landscape.store import Run

    with Run.open(path) as run:
        known = {p: int(s) for s, p in run.checkpoints()}
    for step, ckpt in loaded:
        was = known.get(str(ckpt.path))
        if was is not None and was != step:
            raise LandscapeError(
                f"{path}: {ckpt.path} is recorded there as step {was}, and is step {step} "
                "now; to start over with the new steps, overwrite the file (mode='w'; on the "
                "command line --overwrite) or write to another one")


def data_fingerprint(batches: Sequence[Any], loss: Any) -> str:
    """What an analysis measures on: the loss function's name and the batches' tensors.

    The tensors by shape, dtype and a hash of their first megabyte each. Stored in the
    run's config (``analysis.data``), so an append with other data or another loss is
    refused (:func:`_refuse_other_data`) instead of joining two series.
    """
    digest = hashlib.sha256()
    parts = []
    for batch in batches:
        found: list[torch.Tensor] = []
        map_tensors(batch, found.append)
        for t in found:
            parts.append(f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}")
            head = t.detach().reshape(-1)[: 2**20 // max(t.element_size(), 1)]
            digest.update(head.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    name = getattr(loss, "__qualname__", None) or type(loss).__qualname__
    shown = ", ".join(parts[:4]) + (f" (+{len(parts) - 4} tensors)" if len(parts) > 4 else "")
    return f"{name} on {len(batches)} batch(es) [{shown}] #{digest.hexdigest()[:12]}"


def _refuse_training_run(path: str | Path | None, mode: str, names: Sequence[str]) -> None:
    """Refuse to write an analysis into a run a training session wrote.

    Appended, rows of a metric the training recorded would join the series the monitor
    measured on its probe with rows measured on other data (and at the checkpoint's step,
    one after the monitor's row of the same weights), and rows of any metric at the
    checkpoints' steps, past the training's last row, would make the training's resume
    from an earlier checkpoint fail; overwritten, what training recorded would be lost. A
    review (session 41) did both by accident: ``analyze``'s default ``-o run.h5`` is the
    name the callbacks' docs give their file, and a refusal's advice (``--overwrite``)
    deleted it.

    Raises:
        LandscapeError: naming the file as a training run and where to write instead.
    """
    if path is None or not Path(path).is_file():
        return
    from landscape.store import Run

    try:
        with Run.open(path) as run:
            config = run.config or {}
            # an analysis's own file (its config says so) and a training's empty one: no
            # series to join, no resume to block
            if not run.trained or "analysis" in config or not run.metrics():
                return
            integration = config.get("integration")
            shared = [n for n in names if n in run]
    except LandscapeError:  # not a run file: refused where the file is written
        return
    who = f"the {integration} callback" if integration else "a training session's monitor"
    if mode != "a":
        harm = "replace everything the training recorded"
    elif shared:
        harm = (f"join its series of {', '.join(shared)}, measured on the training's own "
                "probe or batches, with rows on other data")
    else:
        harm = ("add rows at the checkpoints' steps, past its last, and a resume of the "
                "training from a checkpoint would then be refused")
    raise LandscapeError(
        f"{path}: a training run, written by {who}; this analysis would {harm}. Write "
        "it to a file of its own (on the command line -o posthoc.h5)"
        + ("" if mode == "a" else "; delete the training run first if you mean to lose it"))


def _refuse_other_data(path: str | Path | None, mode: str, data_print: str) -> None:
    """Refuse to append an analysis of other data, or another loss, to ``path``.

    Raises:
        LandscapeError: naming what the file holds and what this call measures on.
    """
    if path is None or mode != "a" or not Path(path).is_file():
        return
    from landscape.store import Run

    with Run.open(path) as run:
        held = (run.config.get("analysis") or {}).get("data")
    if held is not None and held != data_print:  # older files hold none: not compared
        raise LandscapeError(
            f"{path}: it holds an analysis of other data or another loss ({held}); this "
            f"one measures {data_print}; write to another file, or overwrite it (mode='w'; "
            "on the command line --overwrite). A data factory must give the same batches "
            "each time (no shuffling, a fixed seed)")


def _partial_step(path: str | Path | None, mode: str) -> int | None:
    """The first step of an analysis interrupted midway: rows without a ``/checkpoints`` entry.

    Only in a run file this module wrote (its config has ``analysis``); rows after its last
    recorded checkpoint belong to a checkpoint that was not finished (the process was killed
    before it could clean up) and are dropped on resuming.
    """
    if path is None or mode != "a" or not Path(path).is_file():
        return None
    from landscape.store import Run

    with Run.open(path) as run:
        if "analysis" not in (run.config or {}):
            return None
        done = [int(s) for s, _ in run.checkpoints()]
        last = max(done) if done else None
        later = [int(s) for m in run.metrics() for s in run.steps(m)
                 if last is None or s > last]
    return min(later) if later else None


def _memory_budget(budget: int | float | str | None, net: nn.Module) -> Any:
    """``analyze``'s ``memory_budget`` as the metrics take it: ``"free"`` in bytes.

    Where the device's free memory cannot be told, ``"free"`` is the monitor's ``"auto"``.
    """
    from landscape.curvature.memory import check_budget, posthoc_budget

    if isinstance(budget, str) and budget.strip().lower() == "free":
        device = next(net.parameters(), torch.empty(0)).device
        free = posthoc_budget(device)
        return "auto" if free is None else int(free)
    try:
        check_budget(budget)
    except ValueError as err:
        raise ValueError(f"{err} (or 'free', analyze's default)") from None
    return budget


def _drop_from(path: str | Path | None, step: int) -> None:
    """Remove the rows of ``step`` and later from the run file (an unfinished checkpoint).

    Called while the error that stopped the analysis propagates: the file says why, as the
    monitor had said before this reopening cleared it (``closed_how``).
    """
    if path is None or not Path(path).is_file():
        return
    from landscape.store import RunWriter
    from landscape.store.writer_status import stopped_how

    with contextlib.suppress(Exception):  # the file stays as the monitor closed it
        RunWriter(path, mode="a", truncate_from=step, posthoc=True).close(
            how=stopped_how(sys.exc_info()[1]))


class _Progress:
    """Progress bars on stderr: checkpoints (with the time left), metrics and products.

    The outer bar counts checkpoints and estimates the remaining time; the inner one
    counts the metrics of the current checkpoint, its description names the metric being
    computed and how many curvature products it has used so far.
    """

    def __init__(self, total: int, n_metrics: int, enabled: bool) -> None:
        from landscape._progress import bar

        self.enabled = enabled
        # the time left from the mean over every checkpoint so far (smoothing=0): their
        # costs vary several-fold (a Lanczos run converging in 8 products or in 40), and
        # tqdm's moving average read the last fast ones as the rate (00:31 left of 91 s)
        self.outer = bar(enabled=enabled, total=total, desc="checkpoints", unit="ckpt",
                         position=0, smoothing=0)
        self.inner = bar(enabled=enabled, nested=True, total=n_metrics, desc="metrics",
                         unit="metric", position=1, leave=False)
        self.products = 0

    def start_checkpoint(self, step: int) -> None:
        self.inner.reset()
        self.outer.set_postfix_str(f"step {step}")

    def instrument(self, metric: Any) -> None:
        """Wrap ``metric.compute`` (this instance only) to report its progress."""
        compute = metric.compute

        def reported(ctx: Any) -> Any:
            self.products = 0
            self.inner.set_description_str(metric.name)
            self.inner.set_postfix_str("")
            self._count_products(ctx)
            try:
                return compute(ctx)
            finally:
                self.inner.update(1)

        metric.compute = reported

    def _count_products(self, ctx: Any) -> None:
        """Count the curvature products of the operators ``ctx`` builds (this step only)."""
        if getattr(ctx, "_landscape_progress", False):
            return
        ctx._landscape_progress = True
        make = ctx.operator

        def operator(source: str, *args: Any, **kwargs: Any) -> Any:
            op = make(source, *args, **kwargs)
            for target in (op, getattr(op, "base", None), getattr(op, "operator", None)):
                if target is not None and not getattr(target, "_landscape_counted", False):
                    self._wrap_products(target)
            return op

        ctx.operator = operator

    def _wrap_products(self, op: Any) -> None:
        op._landscape_counted = True
        for name, count in (("matvec", lambda a: 1), ("matmat", len)):
            method = getattr(op, name, None)
            if method is None:
                continue

            def counted(arg: Any, _method: Any = method, _count: Any = count) -> Any:
                out = _method(arg)
                self.products += _count(arg)
                self.inner.set_postfix_str(f"{self.products} products", refresh=True)
                return out

            setattr(op, name, counted)

    def end_checkpoint(self) -> None:
        self.outer.update(1)

    def close(self) -> None:
        self.inner.close()
        self.outer.close()


def _to_compute(
    loaded: list[tuple[int, Checkpoint]], recorded: dict[str, list], names: Sequence[str],
    path: str | Path | None,
) -> list[tuple[int, Checkpoint]]:
    """The checkpoints whose step is not yet in the run file for every metric (resuming).

    A step that every metric of ``names`` has is skipped (with a warning); one that cannot
    follow the rows already recorded, of any metric (adding a metric to checkpoints the file
    already holds), is an error that says how to start over, raised before anything is
    written.
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
    checkpoints: Sequence[str | Path | Checkpoint],
    model: nn.Module | Callable[[], nn.Module],
    data: Any,
    loss_fn: Callable[..., torch.Tensor] | None,
    path: str | Path | None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    k: int = 3,
    optimizer: dict[str, Any] | None = None,
    trust: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    mode: str = "a",
    microbatch_size: int | None = None,
    closure: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    memory_budget: int | float | str | None = "free",
) -> Monitor:
    """Compute ``metrics`` for every checkpoint into the run file ``path``.

    ``data`` is one ``(inputs, targets)`` batch or an iterable of them (curvature is the
    size-weighted mean over batches; feature metrics see all batches concatenated); with
    ``closure(model, batch)`` (e.g. :func:`landscape.loading.model_loss` for a Hugging Face
    model on dict batches) it replaces ``loss_fn``. ``optimizer`` (e.g. ``{"name": "sgd",
    "lr": 0.1, "momentum": 0.9}``) sets the edge-of-stability threshold of the sharpness
    metric; by default the settings saved with the checkpoints are used (Lightning
    ``optimizer_states``, a Hugging Face checkpoint folder's ``optimizer.pt``), each
    checkpoint with its own learning rate; with neither (plain state dicts) the sharpness
    rows have a NaN threshold and ratio, and a warning (:data:`NO_LEARNING_RATE`) says so.
    ``microbatch_size`` bounds the memory of the curvature products
    (:class:`~landscape.curvature.Hessian`). ``memory_budget`` bounds each curvature
    measurement (docs/curvature.md, "Memory budgets"): by default ``"free"``, half the
    memory free on the device when the analysis starts
    (:func:`landscape.curvature.memory.posthoc_budget`: no training shares it); bytes,
    ``"<f>x step"``, ``"auto"`` (the monitor's) or None (no limit) as for the metrics. A
    measurement over it records NaN with one warning, as in the monitor.

    Appending (``mode="a"``) to a run file that already holds some of the checkpoints
    resumes: steps every chosen metric has are skipped, and the rows of a checkpoint left
    unfinished by a killed process are dropped first; ``mode="w"`` starts the file over.
    Each checkpoint's rows are committed before the next one starts; on an interruption
    (``KeyboardInterrupt``, or any exception) the unfinished checkpoint's rows are removed
    and the exception propagates. A run file this call created is removed again when it
    fails before writing a row. The data are tried on the first checkpoint to compute
    before the file is opened: a model or loss that fails there is refused and leaves the
    file as it was. A non-finite loss on finite weights is refused at any checkpoint (the
    data, or logits beyond float range); a checkpoint whose weights are not finite (a run
    that blew up) is recorded with a warning, its metrics NaN.

    Args:
        checkpoints: paths (:func:`landscape.loading.load_checkpoint`) or loaded
            :class:`~landscape.loading.Checkpoint` objects
            (:func:`landscape.checkpoints.open_checkpoints`).
        model: the model, or a factory of it.
        data: one batch or an iterable of batches.
        loss_fn: ``loss_fn(model(inputs), targets)``; None with ``closure``.
        path: the run file (None: in memory).
        metrics: metric names (default :data:`DEFAULT_METRICS`).
        k: number of top Hessian eigenvalues.
        optimizer: the optimizer's settings, for the sharpness threshold.
        trust: allow pickled objects in checkpoint files.
        device: where to run.
        progress: progress bars on stderr.
        mode: ``"a"`` (append, resume) or ``"w"`` (start over).
        microbatch_size: curvature products in micro-batches of at most this many samples.
        closure: ``closure(model, batch)`` returning the loss.
        memory_budget: the most memory one curvature measurement may take (``"free"``).

    Returns:
        The closed monitor (``.findings``); read what it wrote with
        ``landscape.Run.open(path)``.

    Raises:
        LandscapeError: on a checkpoint, factory or data that cannot be used, or a step
            that cannot follow the rows already in the file.
    """
    if not checkpoints:
        raise LandscapeError("no checkpoints given")
    if loss_fn is None and closure is None:
        raise LandscapeError("analyze needs loss_fn or closure")
    net, batches = prepare(model, data, device)
    loaded = order_checkpoints([c if isinstance(c, Checkpoint) else _released(
        load_checkpoint(c, trust=trust)) for c in checkpoints])
    chosen = []
    for name in metrics:
        metric = create(name, schedule=1)  # an old name warns and gives the renamed metric
        if any(m.name == metric.name for m in chosen):  # named twice (or old and new name)
            continue
        chosen.append(create(metric.name, k=k, schedule=1)
                      if metric.name == "top_eigenvalues" else metric)
    budget = _memory_budget(memory_budget, net)
    for m in chosen:
        if hasattr(m, "memory_budget"):  # the curvature metrics
            m.memory_budget = budget
    names = [m.name for m in chosen]
    size = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if "top_eigenvalues" in names and k > size:  # (beyond it NaN would be stored, silently)
        raise LandscapeError(f"k={k}: the model has {size} trainable parameters, so at most "
                             f"{size} eigenvalues")
    saved = optimizer is None and any(_readable(c.optimizer) for _, c in loaded)
    spec = next((c.optimizer for _, c in loaded if _readable(c.optimizer)), None) \
        if saved else optimizer
    _say_momentum_left_out(optimizer, loaded)
    opt = _optimizer(net, spec)
    net.eval()
    _refuse_training_run(path, mode, names)
    partial = _partial_step(path, mode)
    recorded = _recorded_steps(path, mode, names, partial)
    _refuse_renumbered(loaded, path, mode)
    data_print = data_fingerprint(batches, closure if closure is not None else loss_fn)
    _refuse_other_data(path, mode, data_print)
    todo = _to_compute(loaded, recorded, names, path)
    # rows at or before this step were in the file before: never dropped on a failure
    kept_until = max((max(v) for v in recorded.values() if v), default=None)
    for _, ckpt in todo:  # every checkpoint must fit the model before the file is touched
        refuse_mismatch(net, ckpt)  # (from the shapes it kept: the file is not read again)
    # and the data the model (mode="w" empties the file when the monitor starts); the first
    # checkpoint stays loaded for its computation
    first_diverged = None
    if todo:
        load_state_into(net, todo[0][1])
        first_diverged = _check_diverged_or_refuse(net, loss_fn, batches, todo[0][1], closure)
    monitor = Monitor(net, None if closure is not None else loss_fn,
                      None if path is None else str(path), optimizer=opt,
                      closure=closure, metrics=chosen,
                      probe=batches if len(batches) > 1 else batches[0],
                      # a causal LM's padded batches by their next-token targets, as
                      # the Hugging Face callback weighs them: several batches then
                      # average as one batch of all their tokens
                      batch_size=next_token_targets if counts_next_tokens(net, closure)
                      else None,
                      mode=mode, truncate_from=partial, microbatch_size=microbatch_size,
                      adaptive=False, on_disk_full="raise",  # a full disk ends the command
                      config={"analysis": {"checkpoints": [str(c.path) for _, c in loaded],
                                           "data": data_print}})
    # checkpoints measured after training: a training run's record of how it ended stays
    monitor._writer_args["posthoc"] = True
    bars = _Progress(len(todo), len(chosen), progress)
    for m in chosen:
        bars.instrument(m)
    step = None
    data_good = False  # an earlier checkpoint of this call gave a finite loss on the data
    try:
        with discard_if_empty(path):
            try:
                with monitor:
                    for step, ckpt in todo:
                        bars.start_checkpoint(step)
                        load_state_into(net, ckpt)
                        own = not saved or _readable(ckpt.optimizer)
                        if saved and own and opt is not None:
                            _apply_saved(opt, net, ckpt.optimizer, ckpt)
                        elif not own and "sharpness" in names:
                            _say_no_saved_optimizer(ckpt)
                        if opt is not None:  # the weights change with no step of it: each
                            # checkpoint's optimizer is a new one; none where this checkpoint
                            # saved none (another checkpoint's settings were read for it)
                            monitor.set_optimizer(opt if own else None)
                        diverged = (first_diverged if ckpt is todo[0][1] else
                                    _check_diverged_or_refuse(net, loss_fn, batches, ckpt,
                                                              closure, data_good))
                        data_good = data_good or not diverged
                        if diverged:
                            warnings.warn(
                                f"{ckpt.path}: the weights are not finite (a run that blew "
                                "up): its metrics are recorded as NaN", RuntimeWarning,
                                stacklevel=2)
                        monitor.step(step)
                        assert monitor.writer is not None
                        if diverged:  # an error finding: `landscape check` fails the run
                            finding = diverged_finding(step, ckpt)
                            monitor.findings.append(finding)
                            monitor.writer.add_finding(finding)
                        monitor.writer.record_checkpoint(step, str(ckpt.path))
                        monitor.writer.flush()  # this checkpoint's rows are committed
                        ckpt.release()
                        step = None
                        bars.end_checkpoint()
            except BaseException:
                if step is not None and (kept_until is None or step > kept_until):
                    _drop_from(path, step)
                raise
    finally:
        bars.close()
    if opt is None and "sharpness" in names and todo:  # after the rows, not before an error
        unread = sorted({c.optimizer["unread"] for _, c in todo
                         if c.optimizer and c.optimizer.get("unread")})
        warnings.warn(NO_LEARNING_RATE + (
            f" (the checkpoints' optimizer, {', '.join(unread)}, is not one analyze reads: "
            "SGD, Adam, AdamW)" if unread and optimizer is None else ""), stacklevel=2)
    return monitor
