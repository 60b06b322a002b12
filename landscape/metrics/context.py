"""The per-step context: lazily computed, shared work for the metrics due at one step.

Several metrics due at the same step share one computation of each expensive piece: one
forward pass per data source capturing every requested layer, one curvature operator and
one Lanczos run per (data source, preconditioning), the gradient the user's backward left
in ``.grad``. State that must survive between steps (Lanczos warm
starts) lives in ``state``, a dict owned by the monitor.

Everything here runs inside :func:`landscape.isolation.isolated` (entered by the monitor):
the model is in eval mode, and parameters, buffers, ``.grad``, modes and the RNG are
restored afterwards. Forward passes go through ``functional_call`` with cloned buffers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._deprecation import deprecated_alias
from landscape._errors import MissingInput
from landscape.batches import (
    model_call,
)
from landscape.capture import (
    Captured,
    capture,
    last_child_output,
    output_logits,
)
from landscape.isolation import (
    buffers_kept,
    rank_zero_buffers,
    stateless_call,
    stateless_closure,
)
from landscape.metrics.batch_parts import (
    as_pair,
    batch_targets,
    each_batch,
    ids_and_labels,
    inputs_in,
    is_batch_list,
    keyword_batch,
    mask_fits_positions,
    split_batch,
    whole_dict_call,
)
from landscape.params import (
    Vector,
    difference,
    gradient_norm,
    stackable,
    tensor_norms,
    trainable_named_parameters,
    weights_dtype,
)

__all__ = ["MissingInput", "NoLossFunction", "StepContext"]

Closure = Callable[[nn.Module, Any], torch.Tensor]


class NoLossFunction:
    """The loss function of a monitor given neither ``loss_fn`` nor ``closure``: none.

    The default metrics need no loss function (the sentinels then read a classifier's
    cross-entropy from its targets); a metric that evaluates the loss records NaN and one
    ``metric_failed`` finding with this reason, before anything checks the data's form
    for a loss function (:meth:`StepContext.operator`).

    Args:
        where: what to pass ``loss_fn=`` or ``closure=`` to, as the reason says it.
    """

    def __init__(self, where: str) -> None:
        self.reason = f"this metric evaluates the loss: pass loss_fn= or closure= to {where}"

    def __call__(self, *args: Any) -> torch.Tensor:
        """Raise :class:`MissingInput` with the reason, whatever it is given."""
        raise MissingInput(self.reason)


def _concat(parts: list[Captured]) -> Captured:
    """Captures of several batches joined along the sample dimension."""
    joined = Captured()
    for attr in ("inputs", "outputs"):
        keys = set.intersection(*(set(getattr(p, attr)) for p in parts))
        for k in keys:
            ts = [getattr(p, attr)[k] for p in parts]
            if len({t.shape[1:] for t in ts}) > 1 and all(t.dim() == 3 for t in ts) \
                    and len({t.shape[-1] for t in ts}) == 1:
                # (N, T, d) sequences of different lengths: one row per position, as the
                # metrics read them (a channels-first image batch is left to torch.cat)
                ts = [t.reshape(-1, t.shape[-1]) for t in ts]
            getattr(joined, attr)[k] = torch.cat(ts)
    return joined


class _Rebuilt:
    """The parameters before the optimizer step, to rebuild from those after it and Δθ.

    The monitor keeps one copy of the parameters per step, which becomes Δθ in place
    (:attr:`StepContext.update`); the parameters before the step are ``θ_after − Δθ``,
    computed when first read (:attr:`StepContext.params_before`). That is bitwise
    ``θ_before`` wherever the step changed a weight by less than a factor of two
    (Sterbenz's lemma: the rounded difference of two floats within a factor two of each
    other is exact, Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    Lemma 2.4), and within one rounding elsewhere.
    """

    def __init__(self, after: Sequence[torch.Tensor], update: Sequence[torch.Tensor]) -> None:
        self.after, self.update = list(after), list(update)

    def build(self) -> Vector:
        with torch.no_grad():
            return difference(self.after, self.update)


@dataclass
class StepContext:
    """Everything a metric may read at one step, built by the monitor (module docstring).

    ``names`` are the monitored parameters' names; :attr:`parameters` their current
    (detached) tensors in that order. ``params_before`` and ``update`` hold the parameters
    before the optimizer step and its Δθ when a metric with ``needs_update`` is due.
    ``parameter_objects`` optionally maps parameter names to the model's parameter objects
    (the monitor builds it once; otherwise it is looked up once per step).
    ``optimizer_stepped`` says whether the optimizer stepped since the monitor's previous
    call (None: not known, without ``optimizer=``). ``given_grad_norm`` is the gradient
    norm the caller passed (``Monitor.step(grad_norm=...)``: the norm before clipping),
    ``given_samples`` the samples behind the loss it passed (``Monitor.step(samples=...)``).
    ``modules`` is the model's ``list(model.modules())`` as the monitor walked it for this
    step (None: whoever needs it walks the model). ``microbatch_size`` and ``batch_size``
    (a batch's weight, e.g. its token count) go to the curvature operators.
    ``state`` survives between steps (warm starts); the rest lives for one step.
    """

    step: int
    model: nn.Module
    loss_fn: Callable[..., torch.Tensor] | None
    closure: Closure | None
    optimizer: torch.optim.Optimizer | None
    names: Sequence[str]
    batch: Any = None
    probe: Any = None
    loss: Any = None
    outputs: Any = None
    given_grad_norm: float | None = None
    given_samples: int | None = None
    #: the one floating dtype of the model's weights (None: several); the batch's inputs
    #: are read in it
    weights_dtype: torch.dtype | None = None
    #: the parameter groups' ``lr`` at the last optimizer step (None: no hooked step seen)
    step_lrs: list[Any] | None = None
    #: reads the logits from the model's output (the monitor's ``output_fn``; None:
    #: :func:`~landscape.capture.output_logits`); :meth:`logits_of` applies it
    output_fn: Callable[[Any], torch.Tensor | None] | None = None
    #: what the ``loss`` metric says at a step without a loss (the monitor's ``no_loss_reason``)
    no_loss_reason: str = "the loss metric needs step(..., loss=loss)"
    #: what to do when a metric reads the probe and there is none (the monitor's own
    #: words: its default probe turned off, or not taken yet)
    no_probe_hint: str = "pass probe=... to Monitor"
    params_before: InitVar[Vector | None] = None  # a property below: rebuilt when read
    update: Vector | None = None
    #: per-tensor norms of ``params_before`` when the monitor took them before it turned
    #: its copy of the parameters into ``update`` (:meth:`tensor_norms` then reads them)
    before_norms: torch.Tensor | None = None
    state: dict = field(default_factory=dict)
    microbatch_size: int | None = None
    batch_size: Callable[[Any], int | None] | None = None
    parameter_objects: dict[str, nn.Parameter] | None = None
    optimizer_stepped: bool | None = None
    capture_plan: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)
    modules: list[nn.Module] | None = None
    #: the monitor's step-long stack: the buffers of the modules the loss function or
    #: closure holds (``loss_modules``) are kept on it once the step first calls either
    loss_guard: contextlib.ExitStack | None = None
    #: :func:`~landscape.isolation.modules_reached` from the loss function and the closure
    loss_modules: Sequence[nn.Module] = ()
    _loss_kept: bool = False
    _buffers_shared: bool = False  # rank 0's buffers entered (rank_zero_buffers)
    _captured: dict[str, Captured] = field(default_factory=dict)
    _cache: dict[Any, Any] = field(default_factory=dict)
    _params_before: Any = field(default=None, init=False, repr=False)

    def __post_init__(self, params_before: Vector | None) -> None:
        self._params_before = params_before

    @classmethod
    def for_model(cls, model: nn.Module, *, metrics: Sequence[Any] = (), step: int = 0,
                  loss_fn: Callable[..., torch.Tensor] | None = None,
                  optimizer: torch.optim.Optimizer | None = None,
                  **fields: Any) -> StepContext:
        """A context over ``model``'s trainable parameters, as the monitor would build it.

        For a metric's unit test and for calling a metric outside a monitor::

            metric = Collapse()
            ctx = StepContext.for_model(model, metrics=[metric], probe=(x, y))
            row = metric.compute(ctx)

        As the monitor does, ``metrics`` are set up on the model (:meth:`Metric.setup`:
        the layers they read) and the layers their ``captures()`` name are captured by
        the shared forward pass; ``names`` are those of the parameters with
        ``requires_grad``; when the weights have one floating dtype, the probe's and the
        batch's inputs are read in it. ``fields`` sets any other field: ``batch``,
        ``probe``, ``loss`` (the ``loss`` metric's), ``params_before`` and ``update`` (a
        metric with ``needs_update``), ``optimizer_stepped`` (the ``nonfinite`` metric's
        ``skipped``), ... What the monitor adds besides (unwrapping DDP or ``torch.compile``
        wrappers, the default probe, restoring the model's state after the metric: docs/
        conventions.md) is not done here.

        Args:
            model: the model.
            metrics: the metrics that will compute on the context.
            step: the step the context stands for.
            loss_fn: ``loss_fn(model(inputs), targets)``, for the metrics that evaluate it.
            optimizer: the optimizer, for the metrics that read its state.
            **fields: the other fields of :class:`StepContext`.

        Returns:
            The context.
        """
        fields.setdefault("names", list(trainable_named_parameters(model)))
        fields.setdefault("closure", None)
        dtype = weights_dtype(model.parameters())
        fields.setdefault("weights_dtype", dtype)
        if dtype is not None and fields.get("probe") is not None:
            fields["probe"] = each_batch(fields["probe"], lambda b: inputs_in(b, dtype))[0]
        for metric in metrics:
            metric.setup(model)
        ctx = cls(step=step, model=model, loss_fn=loss_fn, optimizer=optimizer, **fields)
        ctx.plan_captures(metrics)
        return ctx

    def plan_captures(self, metrics: Sequence[Any]) -> None:
        """Add the layers ``metrics`` capture to the shared forward pass's plan.

        By the data each reads (:attr:`capture_plan`), from their ``captures()``: what the
        monitor does for the metrics due at a step.
        """
        for metric in metrics:
            ins, outs = metric.captures()
            wanted = self.capture_plan.setdefault(metric.data, (set(), set()))
            wanted[0].update(ins)
            wanted[1].update(outs)

    @property
    def has_params_before(self) -> bool:
        """Whether :attr:`params_before` is known (without rebuilding it)."""
        return self._params_before is not None

    def rebuild_params_before(self, after: Sequence[torch.Tensor],
                              update: Sequence[torch.Tensor]) -> None:
        """Make :attr:`params_before` ``after − update``, computed when first read."""
        self._params_before = _Rebuilt(after, update)

    # -- parameters and data

    @property
    def named_params(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of the monitored parameters, detached (cached for the step)."""
        if "named_params" not in self._cache:
            own = self._own()
            self._cache["named_params"] = {n: own[n].detach() for n in self.names}
        return dict(self._cache["named_params"])

    def _own(self) -> dict[str, nn.Parameter]:
        """The model's parameter objects by name (looked up once per step)."""
        if self.parameter_objects is not None:  # given by the monitor, built once
            return self.parameter_objects
        if "own" not in self._cache:
            self._cache["own"] = dict(self.model.named_parameters())
        return self._cache["own"]

    @property
    def parameters(self) -> Vector:
        """Current values of the monitored (trainable) parameters, detached."""
        return tuple(self.named_params.values())

    params = deprecated_alias("params", "parameters")

    def data(self, source: str) -> Any:
        """The batch (or list of batches) of ``source``.

        Args:
            source: ``"probe"`` or ``"batch"``.

        Returns:
            The monitor's probe data or the step's training batch.

        Raises:
            MissingInput: that data was not given.
        """
        value = self.probe if source == "probe" else self.batch
        if value is None:
            hint = self.no_probe_hint if source == "probe" else "pass batch=... to step()"
            raise MissingInput(f"this metric needs the {source} data: {hint}")
        if source == "batch" and self.weights_dtype is not None:
            # the inputs in the weights' dtype, as the probe's: batches that a wrapper casts
            # on the way in (Fabric's bf16-true), which the monitor looks through
            if "batch_in_dtype" not in self._cache:
                self._cache["batch_in_dtype"] = each_batch(
                    value, lambda b: inputs_in(b, self.weights_dtype))[0]
            value = self._cache["batch_in_dtype"]
        return value

    def batches(self, source: str) -> list[Any]:
        """``source`` as a list of batches (a probe may be one batch or a list of batches).

        Args:
            source: ``"probe"`` or ``"batch"``.

        Returns:
            The batches.
        """
        value = self.data(source)
        return list(value) if is_batch_list(value) else [value]

    def targets(self, source: str) -> torch.Tensor:
        """Targets of ``source``, concatenated over its batches.

        Args:
            source: ``"probe"`` or ``"batch"``.

        Returns:
            The flattened targets.
        """
        parts = []
        for b in self.batches(source):
            t = batch_targets(b)  # (inputs, targets), or a keyword batch's labels
            if not isinstance(t, torch.Tensor):
                split_batch(b)  # raises MissingInput with the usual message
                raise MissingInput(f"this metric needs integer targets; the {source} has none")
            parts.append(t.reshape(-1))
        return torch.cat(parts)

    def given_targets(self, source: str) -> Any:
        """The targets of ``source`` as given (:func:`batch_targets`), or None.

        Unlike :meth:`targets` they keep their shape (soft labels) and a batch without
        targets gives None; a list probe's are concatenated like its outputs.
        """
        parts = [batch_targets(b) for b in self.batches(source)]
        if len(parts) == 1:
            return parts[0]
        whole = all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in parts)
        return torch.cat(parts) if whole else None

    def attention_masks(self, source: str, layer: nn.Module | None = None
                        ) -> list[torch.Tensor] | None:
        """The real positions of each batch of ``source``: its ``attention_mask``, or None.

        A keyword batch's ``attention_mask`` (the Hugging Face convention: non-zero on a
        real token, 0 on padding), ``(N, T)`` booleans, one per batch of a list probe. None,
        so that every position counts, when a batch has no such mask, or holds inputs whose
        positions it does not describe (:func:`mask_fits_positions`: images or audio beside the
        text, a decoder's ids). An encoder-decoder model's mask (T5, BART) is its
        encoder's: it applies to a ``layer`` inside the encoder only, never to the
        decoder's positions that a head reads, even where their number is the same.
        """
        encoder = self._encoder_modules()
        if encoder is not None and (layer is None or id(layer) not in encoder):
            return None
        masks = []
        for b in self.batches(source):
            mask = b.get("attention_mask") if keyword_batch(b) else None
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2 \
                    or not mask_fits_positions(b, tuple(mask.shape)):
                return None
            masks.append(mask != 0)
        return masks

    def _encoder_modules(self) -> set[int] | None:
        """The ids of an encoder-decoder model's encoder modules; None for other models.

        The first module of the model (a wrapper's too: a LightningModule holding a T5)
        whose ``config`` says ``is_encoder_decoder``; an encoder it cannot name
        (``get_encoder`` missing, or giving the model itself) holds nothing. Once a step.
        """
        if "encoder_modules" not in self._cache:
            found = None
            for m in _dist.unwrap(self.model).modules():
                if getattr(getattr(m, "config", None), "is_encoder_decoder", False):
                    get = getattr(m, "get_encoder", None)
                    encoder = get() if callable(get) else None
                    found = ({id(e) for e in encoder.modules()}
                             if isinstance(encoder, nn.Module) and encoder is not m else set())
                    break
            self._cache["encoder_modules"] = found
        return self._cache["encoder_modules"]

    def attention_mask(self, source: str, layer: nn.Module | None = None
                       ) -> torch.Tensor | None:
        """:meth:`attention_masks` joined as the captures are joined.

        ``(N, T)`` concatenated over a list probe's batches, or one entry per position
        where their lengths differ.
        """
        masks = self.attention_masks(source, layer)
        if masks is None:
            return None
        if len(masks) == 1:
            return masks[0]
        if len({m.shape[1:] for m in masks}) == 1:
            return torch.cat(masks)
        return torch.cat([m.reshape(-1) for m in masks])

    def grad_norm(self) -> float | None:
        """||grad|| of the user's gradient, cached for the step.

        Returns:
            The norm, or None when no monitored parameter has a ``.grad``.
        """
        if "grad_norm" not in self._cache:
            own = self._own()
            self._cache["grad_norm"] = gradient_norm(own[n] for n in self.names)
        return self._cache["grad_norm"]

    def loss_value(self) -> float:
        """The loss passed to the step as a Python float, read once for the step.

        A 0-d tensor's value; a non-scalar loss's mean in float64. Never through float32:
        a float64 loss of 1e39 is finite and stays so, and a mean of finite float32 values
        does not overflow in float64. On a GPU each read waits for the device, so the
        ``loss`` and ``nonfinite`` metrics share this one.
        """
        if "loss_value" not in self._cache:
            value = self.loss
            if isinstance(value, torch.Tensor):
                if value.dim() != 0:
                    value = value.detach().to(torch.float64).mean()
                value = value.item()
            self._cache["loss_value"] = float(value)
        return self._cache["loss_value"]

    def given_norm_stands_in(self) -> bool:
        """Whether the norm passed as ``step(grad_norm=...)`` stands for the gradient.

        It does where no monitored parameter has a ``.grad``, or where ``.grad`` is all
        zeros and the given norm is not finite: the monitor called after
        ``optimizer.zero_grad()`` (accelerate's loop), to None or to zeros.
        """
        given = self.given_grad_norm
        if given is None:
            return False
        norm = self.grad_norm()
        return norm is None or (norm == 0.0 and not math.isfinite(float(given)))

    def tensor_norms(self, which: str) -> torch.Tensor | None:
        """Per-tensor norms of ``"update"`` or ``"params_before"``, stacked (cached).

        Both are computed in one pass at the first call of the step and shared by the
        metrics that need them (``update``, the sentinels' per-layer ratios); each entry is
        what :func:`~landscape.params.tensor_norms` gives for that tensor alone (bitwise
        ``torch._foreach_norm``'s below 65,536 entries, accurate above).

        Args:
            which: ``"update"`` or ``"params_before"``.

        Returns:
            A 1-D tensor in the order of :attr:`names`, or None when the step has no update
            or its tensors do not share one device and dtype.
        """
        if "tensor_norms" not in self._cache:
            self._cache["tensor_norms"] = None
            if self.update is not None and self.has_params_before:
                known = self.before_norms
                update = list(self.update)
                both = update if known is not None else update + list(self.params_before)
                if stackable(both):
                    norms = tensor_norms(both)
                    n = len(update)
                    self._cache["tensor_norms"] = {
                        "update": torch.stack(norms[:n]),
                        "params_before": known if known is not None
                        else torch.stack(norms[n:]),
                    }
        cached = self._cache["tensor_norms"]
        return None if cached is None else cached[which]

    def grads(self) -> Vector | None:
        """The gradient the user's backward left in ``.grad``.

        A parameter without ``.grad`` (unused by this step's loss, e.g. a pooler the head
        does not read or an expert that got no tokens) counts as a zero gradient, as in
        ``torch.nn.utils.clip_grad_norm_``.

        Returns:
            The detached gradients (cached for the step), or None when no monitored
            parameter has one (no backward ran, or the gradients were set to None).
        """
        if "grads" not in self._cache:
            own = self._own()
            grads = [own[n].grad for n in self.names]
            if all(g is None for g in grads):
                self._cache["grads"] = None
            else:
                self._cache["grads"] = tuple(
                    torch.zeros_like(own[n]) if g is None else g.detach()
                    for n, g in zip(self.names, grads)
                )
        return self._cache["grads"]

    def _loss_ready(self) -> None:
        """Before the step's loss is first evaluated for curvature: what it needs.

        Under a process group, rank 0's buffers for the rest of the step's measurements
        (every rank builds the operator together: :func:`rank_zero_buffers`); the reason a
        loss function is missing, raised; the loss's own modules' buffers kept.
        """
        if self.loss_guard is not None and not self._buffers_shared and _dist.enabled():
            self._buffers_shared = True
            self.loss_guard.enter_context(rank_zero_buffers(self.model))
        if self.closure is None and isinstance(self.loss_fn, NoLossFunction):
            self.loss_fn()  # raises MissingInput with its reason
        self._keep_loss_state()  # the products call the loss function or closure

    def _keep_loss_state(self) -> None:
        """Keep the buffers of the modules the loss function and closure hold.

        Called before the step first calls either: a loss with a running centre, a GAN's
        discriminator with BatchNorm get their buffers back when the monitor's step ends.
        """
        if self.loss_guard is not None and not self._loss_kept:
            for module in self.loss_modules:
                self.loss_guard.enter_context(buffers_kept(module))
            self._loss_kept = True

    # -- the shared forward pass

    def _forward(self, batch: Any, params: dict[str, torch.Tensor]) -> Any:
        # a closure that only computes model(**batch).loss (the Hugging Face callback's
        # default) is not needed for a forward pass, and fails on a batch without labels
        # (or on an (inputs, targets) probe, which the model reads as any other's)
        forward_only = getattr(self.closure, "loss_of_model_output", False)
        if self.closure is not None and not forward_only:
            self._keep_loss_state()
            return stateless_closure(self.model, self.closure, params, batch)
        if keyword_batch(batch):  # the Hugging Face convention: model(**batch)
            if whole_dict_call(self.model, batch):  # forward(self, batch)
                return stateless_call(self.model, params, batch)
            try:
                return stateless_call(self.model, params, (), dict(batch))
            except TypeError:
                if not ids_and_labels(batch):  # the one batch with a positional reading
                    raise
        inputs, _ = split_batch(batch)
        return stateless_call(self.model, params, *model_call(self.model, inputs))

    def captured(self, source: str) -> Captured:
        """One no-grad forward pass on ``source`` capturing the layers the due metrics ask for.

        Args:
            source: ``"probe"`` or ``"batch"``.

        Returns:
            The capture (cached for the step), with the model's output under the name ``""``.
        """
        if source not in self._captured:
            ins, outs = self.capture_plan.get(source, (set(), set()))
            parts = []
            for batch in self.batches(source):
                # a closure may call a submodule rather than the model (a Lightning
                # training_step doing self.net(x)): its last child output stands in
                children = (last_child_output(self.model, self.output_fn)
                            if self.closure is not None
                            else contextlib.nullcontext([]))
                with torch.no_grad(), children as kept, \
                        capture(self.model, inputs=ins, outputs={"", *outs},
                                output_fn=self.output_fn) as cap:
                    self._forward(batch, self.named_params)
                if "" not in cap.outputs and kept:
                    cap.outputs[""] = kept[0]
                parts.append(cap)
            self._captured[source] = parts[0] if len(parts) == 1 else _concat(parts)
        return self._captured[source]

    def logits(self, source: str) -> torch.Tensor:
        """The model's output on ``source``; the user's ``outputs=`` for the training batch.

        Args:
            source: ``"probe"`` or ``"batch"``.

        Returns:
            The logits.

        Raises:
            MissingInput: the forward pass returned no tensor.
        """
        if source == "batch" and self.outputs is not None:
            given = self.logits_of(self.outputs)  # a tuple or ModelOutput: its logits
            if given is None:
                raise self.no_logits("outputs= holds no tensor to read logits from")
            return given.detach()
        out = self.captured(source).outputs.get("")
        if out is None:
            raise self.no_logits(
                "the model's forward returned no tensor to read logits from (a list of "
                "per-sample prediction dicts, as a detection model returns in eval mode, "
                "holds none)")
        return out

    def logits_of(self, output: Any) -> torch.Tensor | None:
        """The logits in a model's ``output``; None when there is no tensor to read.

        The monitor's ``output_fn`` reads them, by default
        :func:`~landscape.capture.output_logits` (a tensor, the ``logits`` of a mapping or
        ``ModelOutput``, else the first tensor of a tuple; none in a list of per-sample
        prediction dicts).
        """
        logits = self.output_fn(output) if self.output_fn is not None else output_logits(output)
        return logits if isinstance(logits, torch.Tensor) else None

    def no_logits(self, what: str) -> MissingInput:
        """The error for an output without logits: ``what``, and which function read it."""
        return MissingInput(what + (" (through output_fn=)" if self.output_fn is not None
                                    else ""))

    # -- curvature, shared between metrics

    def operator(self, source: str, preconditioned: bool = False,
                 group_lr: bool | str = False) -> Any:
        """The Hessian of the loss on ``source``, shared by the metrics due at this step.

        Args:
            source: ``"probe"`` or ``"batch"``.
            preconditioned: wrap it in the optimizer's preconditioner
                (:func:`landscape.curvature.preconditioned`). That Hessian normalises by
                batch statistics (``batch_statistics=True``; dropout stays off): the
                preconditioner was accumulated from train-mode gradients, and the two must
                describe one function. In eval mode a bias before a BatchNorm has curvature
                that train mode removes, while its gradient, hence Adam's preconditioner,
                is ~0: a preconditioned sharpness 10^3-10^4 times the stability threshold
                on a healthy run (docs/metrics.md, "Sharpness").
            group_lr: scale each parameter group by its learning rate relative to the
                first group's (:func:`landscape.curvature.precondition.group_learning_rates`;
                with ``preconditioned``, folded into the preconditioner); ``"moving"``: only
                leave out what the optimizer does not move (groups at rate 0, parameters it
                does not hold), unscaled.

        Returns:
            The curvature operator.
        """
        key = ("operator", source, preconditioned, group_lr)
        if key not in self._cache:
            self._loss_ready()  # a missing loss function's reason before the data's
            op = self.hessian_on(self.data(source), batch_statistics=preconditioned)
            if preconditioned:  # (which leaves out what the optimizer does not hold)
                from landscape import curvature

                op = curvature.preconditioned(op, self.optimizer, group_lr=group_lr is True)
            elif group_lr:
                from landscape.curvature.precondition import group_learning_rates

                op = group_learning_rates(op, self.optimizer, rates=group_lr is True)
            self._cache[key] = op
        return self._cache[key]

    def hessian_on(self, data: Any, *, batch_statistics: bool = False) -> Any:
        """The Hessian of the step's loss on ``data`` (not shared: a new operator).

        For a metric that needs the loss, its gradient or curvature on data of its own
        choosing, such as pieces of the batch (``landscape.batches.split(ctx.data("batch"),
        size)``, pieces of at most ``size`` samples: a gradient per piece, for the
        gradient's noise): ``data`` is one batch or a
        list of batches in the form the probe and the batch take, read by the closure or by
        ``loss_fn(model(inputs), targets)`` as the step's own data is. Its ``loss()``,
        ``gradient()`` and products leave the model, its buffers and the training
        gradients as they were (:class:`landscape.curvature.Hessian`).

        Args:
            data: a batch, or a list of batches.
            batch_statistics: normalise by the data's batch statistics (BatchNorm in train
                mode), as a preconditioned operator does (:meth:`operator`).

        Returns:
            A :class:`landscape.curvature.Hessian` over the monitored parameters.
        """
        from landscape import curvature

        self._loss_ready()
        # one batch or a list of batches, read as the metrics read it (batches()): the
        # operator's own guess takes a collated [x, y] list for two batches of a closure
        several = is_batch_list(data)
        if self.closure is None:  # loss_fn(model(x), y): a {"x": ..., "y": ...} batch too
            data = [as_pair(b) for b in data] if several else as_pair(data)
        return curvature.Hessian(
            self.model,
            None if self.closure is not None else self.loss_fn,
            data,
            single_batch=not several,
            closure=self.closure,
            params=list(self.names),
            microbatch_size=self.microbatch_size,
            batch_size=self.batch_size,
            batch_statistics=batch_statistics,
        )

    def eigen(
        self, source: str, k: int, preconditioned: bool = False, tol: float = 1e-3,
        group_lr: bool | str = False, **memory: Any,
    ) -> Any:
        """Top-``k`` eigenpairs, warm-started from the previous measurement of the same kind.

        Args:
            source: ``"probe"`` or ``"batch"``.
            k: how many eigenpairs.
            preconditioned: of the preconditioned operator (see :meth:`operator`).
            tol: relative tolerance of :func:`landscape.curvature.top_eigenvalues`.
            group_lr: of the operator scaled by the groups' learning rates (see
                :meth:`operator`).
            **memory: ``memory_budget=`` and ``memory_profile=`` of
                :func:`landscape.curvature.top_eigenvalues` (docs/curvature.md).

        Returns:
            The eigen result (a larger ``k`` computed earlier in the step is reused).
        """
        key = ("eigen", source, preconditioned) + ((("group_lr", group_lr),) if group_lr else ())
        cached = self._cache.get(key)
        if cached is not None and len(cached.values) >= k:
            return cached
        from landscape import curvature

        op = self.operator(source, preconditioned, group_lr)
        warm = self.state.get(key)
        if warm is not None and any(
                [tuple(t.shape) for t in v] != [tuple(s) for s in op.shapes]
                for v in warm.vectors):
            warm = None  # of other parameters (weights tied or replaced since): cold start
        result = curvature.top_eigenvalues(op, k=k, tol=tol, warm_start=warm, progress=False,
                                           **memory)
        self.state[key] = result
        self._cache[key] = result
        return result


def _get_params_before(self: StepContext) -> Vector | None:
    """The parameters before the optimizer step, a tuple (rebuilt on first read)."""
    value = self._params_before
    if isinstance(value, _Rebuilt):
        value = self._params_before = value.build()
    return value


def _set_params_before(self: StepContext, value: Vector | None) -> None:
    self._params_before = value


# a property over a dataclass InitVar: StepContext(params_before=...) still constructs it
StepContext.params_before = property(  # type: ignore[assignment]
    _get_params_before, _set_params_before,
    doc="The parameters before the optimizer step (a tuple; rebuilt from the update when "
        "first read), or None.")


_MOVED = ("classes_last", "ignored_past_classes", "soft_labels", "softmax_logits",
          "target_place", "without_labels")
"""Names this module exported that live in :mod:`landscape.metrics.batch_parts` now (the
others it exported, ``batch_targets``, ``each_batch``, ``inputs_in`` and ``split_batch``,
it still imports for its own use)."""


def __getattr__(name: str) -> Any:
    """The batch helpers that moved to :mod:`landscape.metrics.batch_parts`, for one release."""
    if name in _MOVED:
        from landscape import _deprecation
        from landscape.metrics import batch_parts

        _deprecation.warn_renamed(f"landscape.metrics.context.{name}",
                                  f"landscape.metrics.batch_parts.{name}", what="name")
        return getattr(batch_parts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
