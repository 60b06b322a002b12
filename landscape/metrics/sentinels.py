"""Every-step sentinels: cheap signals that say when the expensive ones are worth measuring.

:class:`Sentinels` costs one no-grad forward pass on a small fixed subsample of the probe
and a few norms of the optimizer's step. Its headline field is the secant Taylor ratio
``r_secant``: the realised logit change of the step, measured in units of the softmax
convergence radius (Sao 2026, arXiv:2603.13552, Def. 5.1). The logits of the subsample
after the previous monitor call are kept, so the parameters they were computed at are the
parameters before this step, and

    r_secant = max_x spread(z_t(x) - z_{t-1}(x)) / pi,   spread(a) = max_k a_k - min_k a_k,

the secant version of the exact r = max_x spread(J_z(x) p) / pi of
:class:`~landscape.metrics.TaylorRadius` (which costs a forward-mode JVP). On the same
samples the two agree to first order in the step p; the maximum runs over the subsample
only, so ``r_secant`` reads lower than the r of a larger batch (docs/monitor.md,
"Sentinels").
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from landscape._checks import integer_at_least, integer_dtype, positive_int
from landscape._errors import MissingInput, PartialRow
from landscape._hf import output_loss
from landscape.batches import head, leading_size, model_call, sample_sequences
from landscape.capture import first_tensor, predictions_per_sample
from landscape.curvature.stability import learning_rate
from landscape.findings import user_stacklevel
from landscape.isolation import stateless_call
from landscape.metrics._attention import AttentionLogits
from landscape.metrics.base import Metric, register
from landscape.metrics.batch_parts import (
    batch_targets,
    classes_last,
    ids_and_labels,
    keyword_batch,
    soft_labels,
    softmax_logits,
    split_batch,
    without_labels,
)
from landscape.metrics.context import StepContext
from landscape.params import read_floats, tensor_norms, trainable_named_parameters
from landscape.schedules import every

__all__ = ["Sentinels", "largest_lr", "secant_ratio"]

_log = logging.getLogger("landscape")
_STATE = "sentinels.logits"  # key in the monitor's state: (step, logits of the subsample)


def secant_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """max_x spread(after(x) - before(x)) / pi: the secant Taylor ratio of a realised step.

    Args:
        before: logits ``(..., C)`` before the step.
        after: logits of the same inputs after it.

    Returns:
        The ratio (NaN when the logits are not finite or there is nothing to compare).
    """
    if after.numel() == 0:
        return math.nan
    spread = float(_max_spread(before, after))
    return spread / math.pi if math.isfinite(spread) else math.nan


def _real_rows(z: torch.Tensor, kwargs: Any, targets: Any) -> torch.Tensor | None:
    """The logit rows of real positions, as a mask over ``z``'s rows; None when all are.

    Padding is a position whose ``attention_mask`` is 0 (a keyword batch), else one whose
    integer target is negative or past the classes (``ignore_index``: -100 on a token
    classifier's padding, 255 on unlabelled pixels). None too when nothing marks padding,
    or when every position would be left out.
    """
    lead = tuple(z.shape[:-1])
    mask = kwargs.get("attention_mask") if isinstance(kwargs, Mapping) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == lead:
        real = mask != 0
    elif isinstance(targets, torch.Tensor) and integer_dtype(targets.dtype) \
            and tuple(targets.shape) == lead:
        real = (targets >= 0) & (targets < z.shape[-1])
    else:
        return None
    real = real.reshape(-1).to(z.device)
    return None if bool(real.all()) or not bool(real.any()) else real


def _max_spread(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """max_x spread(after(x) - before(x)) as a 0-d float64 tensor, not read back.

    NaN or inf when a logit is not finite (``aminmax`` and ``max`` propagate them).
    """
    delta = (after.double() - before.double()).reshape(-1, after.shape[-1])
    low, high = torch.aminmax(delta, dim=-1)
    return (high - low).max()


def largest_lr(optimizer: torch.optim.Optimizer | None) -> float:
    """The largest ``lr`` over ``optimizer``'s parameter groups (NaN: none, or none readable).

    A tensor learning rate (``torch.optim.Adam(lr=torch.tensor(...))``) is read as a float.
    """
    return largest_of([group.get("lr")
                       for group in getattr(optimizer, "param_groups", None) or ()])


def largest_of(rates: list[Any]) -> float:
    """The largest of parameter groups' ``lr`` values read as floats (NaN: none readable)."""
    values = [learning_rate(r) for r in rates]
    return max((lr for lr in values if math.isfinite(lr)), default=math.nan)


def _samples_for_rows(z: torch.Tensor, x: Any, samples: int, rows: int | None) -> int:
    """The fewest of ``samples`` samples whose logits ``z`` hold at least ``rows`` rows.

    A logit row is one distribution over the last dimension: one per sample for a
    classifier, one per position for a sequence model. ``samples`` when ``rows`` is None or
    when ``z``'s leading dimension is not the samples' (then rows per sample are unknown).
    """
    n = leading_size(x)
    if rows is None or n is None or z.dim() < 2 or z.shape[0] != n or z.numel() == 0:
        return samples
    per_sample = z[0].numel() // z.shape[-1]
    return max(1, min(samples, math.ceil(rows / max(per_sample, 1))))


def _call_parts(
    model: nn.Module, batch: Any, samples: int, keywords: bool, labels: bool = True,
) -> tuple[tuple, dict, Any]:
    """How the sentinels call the model on the first ``samples`` samples of ``batch``.

    ``(args, kwargs, targets)``: ``model(inputs)`` for an ``(inputs, targets)`` batch (a
    2-sequence, or a dict with the keys ``inputs``/``targets`` or ``x``/``y``); with
    ``keywords``, any other dict holds the model's keyword arguments (the Hugging Face
    convention: ``input_ids``, ``attention_mask``, ``labels``) and is passed as
    ``model(**batch)``, targets None; without ``labels``, ``labels`` left out of them (a
    forward that takes no ``labels``; :func:`~landscape.metrics.batch_parts.without_labels`).
    Without ``keywords``, ``input_ids``/``labels`` are ``(inputs, targets)``, for a model
    whose forward takes the ids positionally. Never the monitor's ``loss_fn`` or
    ``closure``: they are user code that may keep state (a loss with running statistics, a
    Lightning ``training_step``), and this runs at every step.
    """
    if keywords and keyword_batch(batch):
        kwargs = dict(head(batch, samples))
        if labels:  # the model computes its loss (probe_loss) from them
            return (), kwargs, None
        return (), without_labels(model, kwargs), kwargs.get("labels")
    if sample_sequences(batch):  # images and their target dicts: cut together, by index
        inputs, targets = split_batch(head(batch, samples))
        return (*model_call(model, inputs), targets)
    inputs, targets = split_batch(batch)
    args, kwargs = model_call(model, head(inputs, samples))
    return args, kwargs, head(targets, samples)


def _whole_dict_parts(batch: Any, samples: int) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, targets)`` for a forward that takes the dict batch itself.

    A LightningModule's ``forward(self, batch)``: the first ``samples`` samples of the dict
    as its one argument, and its ``labels`` (or ``targets``/``y`` key) as the targets the
    probe loss reads (they were None: ``probe_loss`` NaN on every row, without a word).
    """
    part = head(batch, samples)
    targets = batch_targets(part)
    return (part,), {}, targets if isinstance(targets, torch.Tensor) else None


def _soft_throughout(batch: Any, targets: Any) -> bool:
    """Float targets the subsample reads as soft labels are so on the whole probe.

    The first samples of a multi-label probe may carry one label each (rows summing to 1,
    as soft labels do) where the others carry two: the sentinels read its BCE logits as
    softmax logits, while the ``logits`` metric, which reads the whole probe, did not.
    """
    if not (isinstance(targets, torch.Tensor) and targets.is_floating_point()):
        return True
    whole = batch_targets(batch)
    if not isinstance(whole, torch.Tensor) or not whole.is_floating_point():
        return True
    return soft_labels(whole)


def _reissue(caught: Any) -> None:
    """Warn again what ``warnings.catch_warnings(record=True)`` kept."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _target_index(
    targets: torch.Tensor, classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Where each logit row's integer target is, for :func:`_target_loss`.

    Targets outside ``[0, classes)`` (padding such as ``ignore_index=-1``) are left out:
    an out-of-range index raises on the CPU and is a device-side assert on CUDA.

    Returns:
        ``(index, valid)``: the targets as a ``(rows, 1)`` index, clamped into range, and
        the mask of the rows whose target is in range (None when every one is); None when
        no target is in range.
    """
    y = targets.reshape(-1).to(device=device, dtype=torch.long)  # gather's index type
    valid = (y >= 0) & (y < classes)
    if bool(valid.all()):
        return y.unsqueeze(1), None
    if not bool(valid.any()):
        return None
    return y.clamp(0, classes - 1).unsqueeze(1), valid


def _target_loss(
    flat: torch.Tensor, lse: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of the logit rows ``flat`` at their targets (:func:`_target_index`).

    ``lse`` is the rows' log-partition ``logsumexp(flat, -1)``, which the sentinels
    compute anyway: the loss is ``mean(lse - flat[y])`` over the rows in range, the value
    of ``F.cross_entropy`` up to rounding, without a second pass over the exponentials.
    """
    losses = lse - flat.gather(1, index).squeeze(1)
    return losses.mean() if valid is None else losses[valid].mean()


def _soft_target_loss(flat: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logit rows ``flat`` against class probabilities ``targets``.

    ``mean_i sum_c t_ic (lse_i - z_ic)``, ``F.cross_entropy``'s value for probability
    targets, from the log-partition ``lse`` the sentinels compute anyway.
    """
    t = targets.reshape(flat.shape).to(flat)
    return (lse * t.sum(-1) - (flat * t).sum(-1)).mean()


def _labels_are_the_ids(args: tuple, kwargs: dict, labels: torch.Tensor) -> bool:
    """Whether ``labels`` are the call's ``input_ids`` themselves (language-model labels).

    Asked of dict batches only (``{input_ids, ..., labels}``): a tuple ``(ids, ids)`` is the
    user's own convention (a copy task's targets are its inputs, unshifted).
    In the Hugging Face convention a causal language model is given ``labels = input_ids``
    (padding set to ``-100``) and shifts them itself; a token is never its own next-token
    target otherwise (a model trained on pre-shifted targets gets other labels; a masked
    language model's labels are the tokens its inputs hide). So: every label in range
    (``>= 0``) is the id at its position.
    """
    ids = kwargs.get("input_ids") if kwargs else (args[0] if args else None)
    if not (isinstance(ids, torch.Tensor) and ids.shape == labels.shape and labels.dim() >= 2):
        return False
    labels = labels.to(ids.device)
    kept = labels >= 0
    return bool(kept.any()) and bool((labels == ids)[kept].all())


def _say_not_logits(outputs: torch.Tensor, batch: Any, own_loss: bool) -> None:
    """Say once why the sentinels read no logits (their fields stay NaN).

    A warning-level log line when the batch's inputs and integer targets disagree on their
    first dimension: most likely its samples are not that dimension (a sequence-first
    RNN's ``(T, N, F)`` inputs of ``(N,)`` targets), which every consumer takes for them.
    Anything else is by design (a regression head, multi-hot labels, a map at another
    resolution, outputs that are no tensor of logits): info.
    """
    fields = "r_secant, gap, max_abs and logsumexp_max" if own_loss \
        else "r_secant, gap, max_abs, logsumexp_max and probe_loss"
    what = (f"the model's outputs on the probe, shape {tuple(outputs.shape)}, are not class "
            f"logits of its targets: {fields} are not recorded")
    inputs, targets = split_batch(batch) if isinstance(batch, (tuple, list)) \
        and len(batch) == 2 else (None, None)
    first = first_tensor(inputs) if inputs is not None else None
    if (isinstance(targets, torch.Tensor) and isinstance(first, torch.Tensor)
            and targets.dim() > 0 and first.dim() > 0 and not targets.is_floating_point()
            and targets.dtype != torch.bool and first.shape[0] != targets.shape[0]):
        _log.warning("landscape: sentinels: %s; the batch's inputs have %d rows in their "
                     "first dimension and its targets %d: are the samples the first "
                     "dimension of every tensor of the batch? (docs/conventions.md, \"Which "
                     "outputs are logits\")", what, first.shape[0], targets.shape[0])
    else:
        _log.info("landscape: sentinels: %s (docs/conventions.md, \"Which outputs are "
                  "logits\")", what)


def _output_loss(output: Any, given_labels: bool) -> torch.Tensor | None:
    """The scalar loss a model returned with its output (Hugging Face, given ``labels``).

    :func:`landscape._hf.output_loss` (its ``loss`` entry or attribute, or the leading
    scalar of a ``return_dict=False`` tuple), when it is one number and not the tensor
    :func:`~landscape.capture.first_tensor` reads as the logits (a tuple holding a scalar
    alone). A tuple's leading scalar is the model's loss only when the call gave it
    ``labels``: a model called without them that returns ``(aux_loss, logits)`` returns
    no loss of its targets.
    """
    loss = output_loss(output)
    if loss is None or loss.numel() != 1:
        return None
    if isinstance(output, (tuple, list)) and (first_tensor(output) is loss
                                              or not given_labels):
        return None
    return loss


def _has_observers(modules: list[nn.Module]) -> bool:
    """Whether ``modules`` hold quantization observers or fake-quantize modules.

    They write their statistics in eval mode whenever they are enabled, which a training
    script may do at any step (``enable_observer``), and their fused kernels do so
    without bumping the buffers' version counters.
    """
    try:
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase
    except ImportError:  # pragma: no cover - a torch without torch.ao.quantization
        return False
    return any(isinstance(m, (FakeQuantizeBase, ObserverBase)) for m in modules)


class _BufferGuard:
    """Keeps the sentinels' direct forward pass from changing the model's buffers.

    The sentinels call the model itself (half the time of ``functional_call`` on small
    models), in eval mode, where ordinary layers leave their buffers alone. Some do not:
    a quantization-aware model's observers update their statistics in eval mode too, so a
    model holding observers or fake-quantize modules always goes through
    ``functional_call`` with cloned buffers (:func:`~landscape.isolation.stateless_call`).
    For any other model the first call keeps a copy of every buffer and compares each
    buffer's identity and values after the forward; if one changed, its object and values
    are put back and every later call goes through ``functional_call``. Later direct calls
    compare identities and version counters only (no copy): a buffer replaced by another
    object is put back, but a write into one that starts only then cannot be undone (it is
    warned about, and the calls after it go through ``functional_call``), nor seen when it
    bumps no version counter.
    """

    def __init__(self) -> None:
        self.stateless: bool | None = None  # None: not known until the first forward
        self._slots: list[tuple[nn.Module, str]] = []  # (module, buffer name)
        self._n_modules = -1  # modules when the slots were listed

    @contextlib.contextmanager
    def watch(
        self, model: nn.Module, modules: list[nn.Module] | None = None
    ) -> Iterator[bool]:
        """Guard one forward; yields whether it must go through ``functional_call``.

        ``modules``: ``list(model.modules())`` when the caller has it (the monitor walks
        the model once per step), else the model is walked here.
        """
        if self.stateless:
            yield True
            return
        if modules is None:
            modules = list(model.modules())
        fresh = self.stateless is None or len(modules) != self._n_modules
        if fresh:  # the first call, or modules added since (prepare_qat in place, ...)
            self._n_modules = len(modules)
            if _has_observers(modules):
                self.stateless = True  # they may start writing at any step
                yield True
                return
            # a TorchScript module's buffers are not a dict (in eval mode they are not
            # written: _set_training reaches its C++ flag)
            self._slots = [(m, k) for m in modules if not isinstance(m, torch.jit.ScriptModule)
                           for k in m._buffers]
        entries = [(m, k, t, t._version) for m, k in self._slots
                   if (t := m._buffers.get(k)) is not None]
        saved = [t.clone() for _, _, t, _ in entries] if fresh else None
        ran = False
        try:
            yield False
            ran = True
        finally:
            # values too where a copy exists: fused kernels (FakeQuantize's observers)
            # write into buffers without bumping their version counters
            changed = [i for i, (m, k, t, v) in enumerate(entries)
                       if m._buffers.get(k) is not t or t._version != v
                       or (saved is not None and not torch.equal(t, saved[i]))]
            for i in changed:
                m, k, t, _ = entries[i]
                m._buffers[k] = t
                if saved is not None:
                    with torch.no_grad():
                        t.copy_(saved[i])
            if changed:
                self.stateless = True
                if saved is None:
                    warnings.warn(
                        "landscape: the sentinels' forward pass changed buffers of the "
                        f"model in eval mode ({len(changed)}); from now on it runs on "
                        "copies of them", RuntimeWarning, stacklevel=user_stacklevel(),
                    )
            elif self.stateless is None and ran:  # a forward that raised proves nothing
                self.stateless = False


@register
class Sentinels(Metric):
    """Every-step early-warning sentinels on a fixed probe subsample (docs/monitor.md).

    Fields:

    * ``r_secant``: max over the subsample of the spread of the realised logit change of
      the step, over pi: the secant estimate of the Taylor ratio r (Sao 2026,
      arXiv:2603.13552, Def. 5.1); NaN at the first call.
    * ``gap``: steps between the two logit evaluations (1 when the monitor sees every
      step; the secant then spans several optimizer steps).
    * ``max_abs``, ``logsumexp_max``: the largest |logit| and log-partition on the
      subsample (output-logit growth; Wortsman et al., ICLR 2024).
    * ``attention_logit_max``: the largest pre-softmax attention logit q·kᵀ·scale (masks
      honoured) of the same forward pass (attention-logit growth; Dehghani et al. 2023,
      arXiv:2302.05442; Wortsman et al. 2023, arXiv:2309.14322), read by
      :class:`~landscape.metrics._attention.AttentionLogits` without changing the model;
      NaN when the model has no attention. The first call tells whether it has any: if
      none ran, later calls skip the capture (and its per-op cost) and record NaN. With
      ``attention_every=k`` it is measured on every k-th call only (NaN in between).
    * ``probe_loss``: the loss the model returns itself given ``labels`` (Hugging Face
      models: a language model's shifted next-token loss); otherwise the cross-entropy of
      the subsample's integer targets when their shape matches the logits', or of its
      class probabilities (soft labels: mixup, distillation) of the logits' own shape (NaN
      when neither).
    * ``update_ratio``, ``update_layer``: the largest ||Δθ_l|| / ||θ_l|| over the weight
      tensors (two or more dimensions) and the index of that tensor in
      ``config()["layers"]`` (NaN when the ratio is NaN).
    * ``lr``: the largest learning rate of the optimizer's parameter groups at the
      optimizer step this call follows (read by the monitor's pre-step hook: a scheduler
      stepped between ``optimizer.step()`` and the call, as Lightning does, has already
      set the next step's rate; without a hooked step, at this call; NaN without an
      optimizer): the rate of the update ``update_ratio`` measures, and what lets
      ``taylor_forecast`` tell a step that grows
      because a warm restart raised the learning rate back to where the run trained
      before from one growing past it (docs/alarms.md). Run files written before it have
      no such column; resumed, their earlier rows read NaN.

    ``gap`` and ``lr`` are context fields (``CONTEXT_FIELDS``): stored, but left out of the
    default plots and the mirrors.

    The forward pass calls the model directly, ``model(inputs)`` or ``model(**batch)``
    (:func:`_call_parts`; never the monitor's ``loss_fn`` or closure), in eval mode without
    gradients, inside the monitor's :func:`landscape.isolation.isolated` (RNG and modes
    restored; docs/conventions.md): half the time of a ``functional_call`` on small
    models. A model that writes its buffers in eval mode goes through ``functional_call``
    instead (:class:`_BufferGuard` says when). When that forward fails (a
    probe the model cannot read), the row keeps the update ratios and the monitor records
    the failure (:class:`~landscape._errors.PartialRow`).
    With the defaults (at most 4 samples, at most 64 logit rows) the whole metric takes
    about 10 % of a training step of the instability suite's tiny GPT, a quarter of its
    2.2 ms CNN step and under 3 % of a CIFAR-sized CNN's (docs/benchmarks.md, "Monitor
    overhead"). In eval mode BatchNorm reads its running statistics, so the change between
    two calls also contains the change of those statistics.

    Args:
        subsample: the most probe samples the forward pass sees.
        rows: fewer samples when fewer already give this many logit rows (sequence models:
            every position of a sample is one row, so 64 rows are 2 samples of 32 tokens;
            a classifier has one row per sample and keeps ``subsample``). Decided at the
            first call from the output's shape; None: always ``subsample``.
        attention_every: measure ``attention_logit_max`` on every k-th call (default 10;
            1: every call; 0: never). The capture costs a few microseconds per torch call
            of the forward (docs/monitor.md, "Sentinels"); attention logits grow over tens
            to hundreds of steps, and the rule that reads them is ``info``.
        **kwargs: ``schedule=``, ``data=`` of :class:`~landscape.metrics.Metric`.
    """

    name = "sentinels"
    FIELDS = (
        "r_secant",
        "gap",
        "max_abs",
        "logsumexp_max",
        "probe_loss",
        "attention_logit_max",
        "update_ratio",
        "update_layer",
        "lr",
    )
    CONTEXT_FIELDS = ("gap", "lr")  # the rows' conditions: stored, not plotted by default
    default_schedule = every(1)
    default_data = "probe"
    needs_update = True

    def __init__(
        self, subsample: int = 4, rows: int | None = 64, attention_every: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        subsample = positive_int("subsample", subsample)
        rows = None if rows is None else positive_int("rows", rows)
        self.subsample = subsample
        self.rows = rows
        self.attention_every = integer_at_least("attention_every", attention_every, 0)
        self.layers: list[str] = []
        self._forget()

    def _forget(self) -> None:
        """Drop what earlier calls learned about a model (a new one comes with setup)."""
        self._samples: int | None = None  # samples per forward, set by the first call
        self._calls = 0  # forward passes so far (attention_every counts them)
        self._layer_index: list[int] | None = None
        self._index_tensor: torch.Tensor | None = None
        self._attention: bool | None = None  # None: not known yet (the first call tells)
        self._guard = _BufferGuard()
        self._keywords: bool | None = None  # dict batches as keyword arguments (None: untried)
        self._labels: bool | None = None  # with their labels (None: untried)
        self._whole_dict: bool | None = None  # model(batch) with the dict itself (None: untried)
        self._softmax: bool | None = None  # the probe's outputs are softmax logits (None: untried)
        self._own_loss = False  # the model returns its loss (probe_loss on every call)
        # what is read once from the fixed probe: name -> (probe, key, value) (_of_probe)
        self._probe_reads: dict[str, tuple] = {}

    def setup(self, model: nn.Module) -> None:
        """Resolve the weight tensors whose update ratio is tracked.

        Args:
            model: the monitored model.
        """
        named = trainable_named_parameters(model)
        self.layers = [n for n, p in named.items() if p.dim() >= 2]
        self._forget()

    def config(self) -> dict[str, Any]:
        """``subsample``, ``rows``, ``attention_every`` and the tracked tensors, ``layers``."""
        return {
            "subsample": self.subsample,
            "rows": self.rows,
            "attention_every": self.attention_every,
            "layers": list(self.layers),
        }

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """One row: the secant ratio and logit statistics, and the update ratios.

        Raises:
            PartialRow: the forward pass on the probe failed; the row keeps the update
                ratios (they need no forward pass), the monitor records the failure.
        """
        row = dict.fromkeys(self.FIELDS, math.nan)
        row.update(self._update_ratio(ctx))
        row["lr"] = (largest_lr(ctx.optimizer) if ctx.step_lrs is None
                     else largest_of(ctx.step_lrs))
        try:
            row.update(self._logit_fields(ctx))
        except Exception as err:
            raise PartialRow(row, err) from err
        return row

    def _logit_fields(self, ctx: StepContext) -> dict[str, float]:
        if self._softmax is False and not self._own_loss and not self._attention_due():
            self._calls += 1  # nothing to read from this call's forward pass: none is run
            return {}
        batch = ctx.batches(self.data)[0]
        samples = self.subsample if self._samples is None else self._samples
        with torch.no_grad():  # the monitor's isolated(): eval mode, RNG restored
            if self._whole_dict:
                args, kwargs, y = _whole_dict_parts(batch, samples)
                output, attention = self._forward(ctx.model, args, kwargs, ctx.modules)
            else:
                # the first call on a dict batch may try the wrong convention: its warnings
                # (torch's, indexing a tensor with a key) are kept until one works
                trying = self._whole_dict is None and isinstance(batch, Mapping)
                caught: list[warnings.WarningMessage] = []
                try:
                    with warnings.catch_warnings(record=True) if trying \
                            else contextlib.nullcontext() as seen:
                        args, kwargs, y, output, attention = self._conventional(
                            ctx, batch, samples)
                    _reissue(seen or ())  # it worked: they were the model's own
                except (TypeError, IndexError, KeyError, MissingInput) as err:
                    if not trying:
                        raise
                    caught = list(seen or ())
                    # a forward that takes the dict batch itself (a LightningModule's
                    # forward(self, batch)): the last convention to try, once
                    args, kwargs, y = _whole_dict_parts(batch, samples)
                    try:
                        output, attention = self._forward(ctx.model, args, kwargs, ctx.modules)
                    except Exception:
                        self._whole_dict = False
                        _reissue(caught)  # neither worked: the model's error, its warnings
                        raise err from None  # the model's own error, not model(dict)'s
                    self._whole_dict = True
                else:
                    if self._whole_dict is None:
                        self._whole_dict = False  # a convention works: a later error is the model's
        z = ctx.logits_of(output)
        if z is None or z.dim() == 0:
            raise ctx.no_logits(
                "sentinels: the model's output has no logits tensor" + (
                    " (per-sample prediction dicts: a detection model in eval mode)"
                    if predictions_per_sample(output) else ""))
        targets = y if y is not None else batch_targets(kwargs)
        # a segmentation map's (N, C, H, W) logits of (N, H, W) targets: classes last
        z = classes_last(z.detach(), targets)
        if self._samples is None:  # the first call: as few samples as `rows` needs
            self._samples = _samples_for_rows(z, args[0] if args else kwargs, samples,
                                              self.rows)
            if self._samples < samples:  # every row from a forward of the same shape
                self._calls, self._attention = 0, None
                return self._logit_fields(ctx)
        if self._softmax is None:  # the probe is fixed: its outputs' kind is too
            self._softmax = softmax_logits(z, targets) and _soft_throughout(batch, targets)
            self._own_loss = _output_loss(
                output, isinstance(kwargs, Mapping) and "labels" in kwargs) is not None
            if not self._softmax:
                _say_not_logits(z, batch, self._own_loss)
        if not self._softmax:  # a regression head, ...: no logits to read, r means nothing
            return self._other_outputs(output if self._own_loss else None, attention)
        flat = z.reshape(-1, z.shape[-1]).double()
        # padded positions are no samples: their logits moved most in a padded token
        # classifier's probe (r_secant 1.7x that of its real tokens)
        real = self._real_rows_of(batch, z, kwargs, y)
        # every statistic as a 0-d tensor, read back in one transfer (secant_ratio() reads
        # the same spread back on its own)
        names = ["max_abs", "logsumexp_max"]
        lse = torch.logsumexp(flat, dim=-1)
        parts = [(flat if real is None else flat[real]).abs().max(),
                 (lse if real is None else lse[real]).max()]
        loss = _output_loss(output, True) if self._own_loss else None
        if loss is not None:
            names.append("probe_loss")
            parts.append(loss.detach().reshape(()).to(flat))
        elif isinstance(y, torch.Tensor) and y.shape == z.shape[:-1] \
                and not y.is_floating_point():  # a classifier's or next-token targets
            rows, row_lse = flat, lse
            # (a forward taking the dict itself: its keys hold the ids)
            ids_of = ((), args[0]) if self._whole_dict else (args, kwargs)
            if isinstance(batch, Mapping) and _labels_are_the_ids(*ids_of, y) \
                    and z.dim() == 3:
                # the Hugging Face convention, labels = input_ids: the model (or the
                # user's loss) shifts them, position t predicting token t + 1
                rows = flat.view(z.shape)[:, :-1].reshape(-1, z.shape[-1])
                row_lse, y = lse.view(z.shape[:-1])[:, :-1].reshape(-1), y[:, 1:]
            where = self._targets_of(batch, y, rows)
            if where is not None:
                names.append("probe_loss")
                parts.append(_target_loss(rows, row_lse, *where))
        elif isinstance(y, torch.Tensor) and y.shape == z.shape and y.is_floating_point():
            # soft labels (mixup, label smoothing as distributions, distillation): their
            # cross-entropy -sum_c t_c log softmax(z)_c, as F.cross_entropy reads them
            names.append("probe_loss")
            parts.append(_soft_target_loss(flat, lse, y))
        if attention is not None:
            names.append("attention_logit_max")
            parts.append(attention.to(flat.device))
        out: dict[str, float] = {}
        # the previous call's logits stay in the model's dtype: a float64 copy of 64 rows
        # of a 256k-token vocabulary would hold 131 MB of device memory between calls
        prev = ctx.state.get(_STATE)
        if prev is not None and prev[1].shape == z.shape:
            out["gap"] = float(ctx.step - prev[0])
            if flat.numel() == 0:
                out["r_secant"] = math.nan
            else:
                names.append("r_secant")
                parts.append(_max_spread(prev[1], z) if real is None else _max_spread(
                    prev[1].reshape(flat.shape)[real], z.reshape(flat.shape)[real]))
        ctx.state[_STATE] = (ctx.step, z)
        out.update(zip(names, torch.stack(parts).tolist()))
        if "r_secant" in names:
            spread = out["r_secant"]
            out["r_secant"] = spread / math.pi if math.isfinite(spread) else math.nan
        return out

    def _targets_of(
        self, batch: Any, y: torch.Tensor, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """:func:`_target_index` of ``y``, the targets of ``batch``'s subsample.

        Computed once for the probe (``data="probe"``: one fixed batch object, so its
        targets are too) and kept while the same object comes back with the same target
        storage, unwritten (its version counter: a probe edited in place is read again).
        """
        return self._of_probe("targets", batch, y, (flat.shape[-1], flat.device),
                              lambda: _target_index(y, flat.shape[-1], flat.device))

    def _real_rows_of(self, batch: Any, z: torch.Tensor, kwargs: Any, y: Any
                      ) -> torch.Tensor | None:
        """:func:`_real_rows`, read once for the fixed probe (no host read per step)."""
        marks = kwargs.get("attention_mask") if isinstance(kwargs, Mapping) else None
        marks = marks if isinstance(marks, torch.Tensor) else y
        if not isinstance(marks, torch.Tensor):
            return None
        return self._of_probe("real rows", batch, marks, (tuple(z.shape), z.device),
                              lambda: _real_rows(z, kwargs, y))

    def _of_probe(self, what: str, batch: Any, source: torch.Tensor, extra: tuple,
                  compute: Any) -> Any:
        """``compute()``, read once for the probe (``data="probe"``).

        Kept while the same ``batch`` object comes back with ``source`` in the same storage,
        unwritten (its version counter: a probe edited in place is read again), and
        ``extra`` unchanged; computed at every call for other data.
        """
        key = (source.shape, source.data_ptr(), source._version, *extra)
        kept = self._probe_reads.get(what)
        if kept is not None and kept[0] is batch and kept[1] == key:
            return kept[2]
        value = compute()
        if self.data == "probe":
            self._probe_reads[what] = (batch, key, value)
        return value

    def _conventional(self, ctx: StepContext, batch: Any, samples: int) -> tuple:
        """The first call that works (see _call_parts).

        ``model(inputs)`` or ``model(**batch)``; then ``model(**batch)`` without its labels;
        then ``model(input_ids)``.
        """
        args, kwargs, y = _call_parts(ctx.model, batch, samples, self._keywords is not False,
                                      self._labels is not False)
        try:
            output, attention = self._forward(ctx.model, args, kwargs, ctx.modules)
        except TypeError as err:
            # only the call's own error says which convention is wrong ("got an unexpected
            # keyword argument 'labels'"); any other TypeError is the model's, and the
            # choice made on it would hold for the whole run
            said = str(err)
            if not kwargs or self._keywords or "keyword argument" not in said:
                raise
            if self._labels is None and "labels" in kwargs and "'labels'" in said:
                # a forward without a labels argument (the user's closure computes the
                # loss): the rest of the dict, its attention mask included
                self._labels = False
                return self._conventional(ctx, batch, samples)
            if not ids_and_labels(batch):  # model(input_ids) would drop the other keys
                raise
            # a forward that takes the ids positionally: (input_ids, labels) pairs
            self._keywords = False
            args, kwargs, y = _call_parts(ctx.model, batch, samples, False)
            output, attention = self._forward(ctx.model, args, kwargs, ctx.modules)
        if kwargs and keyword_batch(batch):  # (not the inputs dict of an (inputs, y) pair)
            self._keywords = True
            if self._labels is None:
                self._labels = True
        return args, kwargs, y, output, attention

    @staticmethod
    def _other_outputs(output: Any, attention: torch.Tensor | None) -> dict[str, float]:
        """The model's own loss and the attention logits: all a non-logit output gives.

        ``output`` is None when the model returns no loss of its own.
        """
        out: dict[str, float] = {}
        loss = None if output is None else _output_loss(output, True)
        if loss is not None:
            out["probe_loss"] = float(loss)
        if attention is not None:
            out["attention_logit_max"] = float(attention)
        return out

    def _attention_due(self) -> bool:
        """Whether this call measures the attention logits (``attention_every``)."""
        return (self._attention is not False and self.attention_every > 0
                and self._calls % self.attention_every == 0)

    def _forward(
        self, model: nn.Module, args: tuple, kwargs: dict,
        modules: list[nn.Module] | None = None,
    ) -> tuple[Any, torch.Tensor | None]:
        """The model's output and its largest attention logit (None: no attention).

        The model's buffers are guarded (:class:`_BufferGuard`). The attention capture
        mode is active only during this call and removed on exit, also when the forward
        raises; once a first call saw no attention op it is skipped. ``modules``: the
        model's modules as the monitor walked them for this step (:class:`_BufferGuard`).
        """
        watch = self._attention_due()
        with self._guard.watch(model, modules) as stateless, contextlib.ExitStack() as stack:
            att = stack.enter_context(AttentionLogits()) if watch else None
            if stateless:
                output = stateless_call(model, {}, args, kwargs)
            else:
                output = model(*args, **kwargs)
        attention = None
        if att is not None:
            if self._attention is None:
                self._attention = att.seen
            attention = att.maximum()
        self._calls += 1  # counted once the forward ran (a raising one is retried)
        return output, attention

    def _update_ratio(self, ctx: StepContext) -> dict[str, float]:
        if ctx.update is None or not ctx.has_params_before:
            return {}
        if self._layer_index is None:
            wanted = set(self.layers)
            self._layer_index = [i for i, n in enumerate(ctx.names) if n in wanted]
        idx = self._layer_index
        if not idx:
            return {}
        per_step, per_base = ctx.tensor_norms("update"), ctx.tensor_norms("params_before")
        if per_step is None or per_base is None:  # mixed devices or dtypes, sharded tensors
            tensors = [ctx.update[i] for i in idx] + [ctx.params_before[i] for i in idx]
            if len({t.device for t in tensors}) > 1:  # a model split over devices: per
                # tensor (tensor_norms fuses one device's), on the host in float64
                norms = torch.stack([tensor_norms([t])[0].to("cpu", torch.float64)
                                     for t in tensors])
            else:
                norms = torch.stack([n.double() for n in tensor_norms(tensors)])
            steps, bases = norms[: len(idx)], norms[len(idx):]
        else:  # the per-tensor norms shared with the update metric (the same values)
            at = self._index_on(per_step.device)
            steps, bases = per_step.index_select(0, at), per_base.index_select(0, at)
        # a weight that was exactly zero (LoRA's B before its first step) has no relative
        # change: it is left out (its ratio read ~1e10 against a floor of 1e-12)
        # (a NaN weight keeps its NaN ratio, which the row reports)
        nonzero = bases != 0
        ratios = torch.where(nonzero, steps / bases.clamp_min(1e-12), torch.zeros_like(steps))
        at = ratios.argmax()
        # one read-back (on a GPU each float() or bool() waits for the device)
        some, best, value = read_floats([nonzero.any().to(ratios.dtype), at.to(ratios.dtype),
                                         ratios[at]])
        if not some:
            return {}
        if math.isnan(value):  # a NaN ratio (argmax's index of it is no layer's): no layer
            return {"update_ratio": value, "update_layer": math.nan}
        layer = self.layers.index(ctx.names[idx[int(best)]])
        return {"update_ratio": value, "update_layer": float(layer)}

    def _index_on(self, device: torch.device) -> torch.Tensor:
        """The tracked tensors' positions in the parameter list, as an index on ``device``."""
        cached = self._index_tensor
        if cached is None or cached.device != device:
            cached = torch.tensor(self._layer_index, dtype=torch.long, device=device)
            self._index_tensor = cached
        return cached
