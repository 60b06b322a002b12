"""A Hugging Face ``TrainerCallback`` running a :class:`landscape.Monitor` during training.

Use it with ``transformers.Trainer.train``::

    from landscape.integrations import LandscapeTrainerCallback

    cb = LandscapeTrainerCallback("run.h5", metrics="standard", probe=probe_batch)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()

What it does, event by event:

* ``on_train_begin``: builds the monitor over ``kwargs["model"]`` and the *torch*
  optimizer inside ``kwargs["optimizer"]`` (the Trainer's optimizer is accelerate's
  ``AcceleratedOptimizer``; step hooks on the wrapper would never fire), moves the probe
  batch to the model's device, and attaches one forward hook on the model that reads the
  training loss (below).
* ``on_pre_optimizer_step``: reads the fp16 loss scale of the step (below).
* ``on_optimizer_step`` (right after ``optimizer.step()``, *before* the Trainer zeroes the
  gradients, which it does before ``on_step_end``): calls ``monitor.step(step,
  batch=..., loss=...)`` with ``step = state.global_step`` before its increment, i.e. the
  0-based index of the optimizer step, as in :class:`~landscape.Monitor` loops and the
  Lightning adapter. The Trainer's own logs label the same step ``step + 1``. (With
  transformers < 4.42, which has no ``on_optimizer_step``, the step is recorded in
  ``on_step_end`` and the gradient metrics record NaN.)
* ``on_train_end``: removes the forward hook and closes the run file. The Trainer has no
  exception event: if ``train()`` raises, call ``callback.close()`` in the ``except`` or
  ``finally`` block, which records the exception being handled as why training stopped
  (later, in a notebook's next cell, pass ``close(how="...")``); every row appended before
  the failure is committed, and the store recovers a file that was never closed.

The loss. The Trainer does not pass the loss to callbacks. Recomputing it would cost a
forward pass per step, and its logged loss is an average over ``logging_steps`` that is
rounded. So the callback keeps a forward hook on the model that, for forward passes run in
training mode with gradients enabled (never the monitor's own evaluations, which run in
eval mode, nor the Trainer's evaluation loop), stores the detached ``outputs.loss`` and the
keyword batch. The step's loss is then exactly the loss the Trainer backpropagated: the sum
of the micro-batch losses when the Trainer normalised them by the token count of the whole
step (``num_items_in_batch`` in the model's keyword arguments; times the world size under
``average_tokens_across_devices``, as the Trainer does), their mean otherwise. A
Trainer subclass whose ``compute_loss`` does not use ``outputs.loss`` should pass ``loss=``
itself (call :meth:`record_loss` from its ``compute_loss``).

The default ``closure`` (for probe metrics such as ``top_eigenvalues``) is
``model(**batch).loss``: pass a ``probe`` dict with ``labels``.

The gradient norm. With ``max_grad_norm > 0`` the Trainer clips ``.grad`` in place before
the optimizer step and keeps its own norm before clipping to itself. In one process the
callback then keeps, after every backward, the norm of each trainable parameter's
``.grad`` (a read-only post-accumulate-grad hook per parameter, :class:`_NormBeforeClipping`)
and passes their total, divided by the fp16 loss scale, as ``grad_norm=``: the norm the
Trainer logs. Under DDP, FSDP or DeepSpeed the ``grad_norm`` rows hold the clipped norm.

Training is not changed: the hook only keeps references to tensors the Trainer already made
(``tests/integrations/test_huggingface.py`` checks the final parameters bitwise).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from landscape import distributed as _dist
from landscape._hf import counts_next_tokens, model_loss, next_token_targets, output_loss
from landscape._sums import tensor_norms
from landscape.findings import Finding, user_stacklevel
from landscape.integrations import (
    CallbackSettings,
    MonitorOptions,
    add_samples,
    chosen_mirrors,
    make_run_folder,
    move_to_device,
    reaches,
    recorded_run,
    refuse_stale_start,
    resume_options,
    unwrap_optimizer,
)
from landscape.integrations.mirrors import report_to_mirrors
from landscape.metrics import Metric, MissingInput, StepContext
from landscape.metrics.training import Logits, logit_row
from landscape.monitor import MetricsLike, Monitor, resolve_metrics
from landscape.store.writer_status import stopped_how

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "landscape.integrations.huggingface needs transformers: "
        "pip install 'landscape-for-pytorch[transformers]'"
    ) from err

__all__ = ["LandscapeTrainerCallback", "OutputEmbeddingLogits", "model_loss", "next_token_targets"]

_NOT_BATCH = ("num_items_in_batch", "return_dict", "output_hidden_states", "output_attentions")


class OutputEmbeddingLogits(Logits):
    """The ``logits`` metric for models returning a ``ModelOutput``.

    The logits are read from the output of the model's output-embedding layer
    (``get_output_embeddings()``, the language-model head) instead of the model's return
    value. Same name and fields as :class:`landscape.metrics.Logits`, so the alarm rules
    on logit growth apply.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer: str | None = None

    def setup(self, model: nn.Module) -> None:
        """Find the output-embedding layer (none: read the model's return value)."""
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        self.layer = next((n for n, m in model.named_modules() if m is head and n), None)

    def captures(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The output of the output-embedding layer."""
        return ((), ()) if self.layer is None else ((), (self.layer,))

    def config(self) -> dict[str, Any]:
        """``layer`` (``""`` when the model's return value is read)."""
        return {"layer": self.layer or ""}

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """The logit statistics of the output-embedding layer's output."""
        if self.layer is None:
            return super().compute(ctx)
        z = ctx.captured(self.data).outputs.get(self.layer)
        if z is None:
            raise MissingInput(f"layer {self.layer!r} produced no tensor output")
        return logit_row(z)


def _hf_metrics(metrics: MetricsLike) -> list[Metric]:
    """``metrics`` resolved, each plain ``logits`` metric made an :class:`OutputEmbeddingLogits`.

    The replacement keeps the schedule and data.
    """
    out: list[Metric] = []
    for m in resolve_metrics(metrics):
        if type(m) is Logits:
            m = OutputEmbeddingLogits(schedule=m.schedule, data=m.data)
        out.append(m)
    return out


def _output_loss(output: Any) -> torch.Tensor | None:
    loss = output_loss(output)  # a ModelOutput's, or a return_dict=False tuple's first
    return None if loss is None else loss.detach()


def _trainer_counts_shares(frame: Any) -> bool | None:
    """Whether the Trainer whose ``training_step`` is running adds the step's losses up.

    The Trainer's own rule for the value ``compute_loss`` returns
    (``Trainer.training_step``): it is taken as already scaled for gradient accumulation,
    and the micro-batches' values are added up, when ``loss_is_scaled_for_ga`` says so,
    else when the model accepts loss keyword arguments and the step has a
    ``num_items_in_batch`` (the batches carry labels), or when a ``compute_loss_func`` is
    set; otherwise the Trainer divides each by the accumulation steps (a mean). Read from
    the ``training_step`` frame of a ``transformers.Trainer`` among the callers of
    ``frame`` (``compute_loss``, a ``super()`` call, a helper it calls: however
    ``record_loss`` is reached); None when there is none (``record_loss`` called outside
    a Trainer's step).
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    for _ in range(64):
        if frame is None:
            return None
        if frame.f_code.co_name == "training_step":
            trainer = frame.f_locals.get("self")
            if isinstance(trainer, transformers.Trainer):
                break
        frame = frame.f_back
    else:
        return None
    fixed = getattr(trainer, "loss_is_scaled_for_ga", None)
    if fixed is not None:
        return bool(fixed)
    items = frame.f_locals.get("num_items_in_batch")
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and items is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


class _NormBeforeClipping:
    """The gradient norm of a Trainer step before the Trainer clips it (``max_grad_norm``).

    The Trainer clips ``.grad`` in place between the last backward of a step and the
    optimizer step, and no callback runs in between; its own pre-clipping norm stays in a
    local variable. A post-accumulate-grad hook on every trainable parameter keeps the norm
    of that parameter's ``.grad`` after each backward (one chunked norm,
    :func:`~landscape._sums.tensor_norms`; read-only), so after the step's last backward
    the kept norms are those of the accumulated, unclipped gradient. With fp16 the
    gradients are still multiplied by the loss scale there: :meth:`take` divides by the
    scale read before the optimizer step. One process only: under DDP the hooks would see
    each rank's gradient before the all-reduce. :meth:`watch` is called again at each step,
    so a parameter unfrozen during training (a frozen body released after a few steps) is
    hooked before its first backward.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._norms: dict[int, torch.Tensor] = {}
        self.scale: float | None = None
        self._handles: list[Any] = []
        self._watched: set[int] = set()  # id() of every hooked parameter
        self.watch()

    def watch(self) -> None:
        """Hook every parameter that requires a gradient and has no hook yet."""
        for p in self._model.parameters():
            if p.requires_grad and id(p) not in self._watched:
                self._watched.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._keeper(id(p))))

    def _keeper(self, key: int) -> Callable[[torch.Tensor], None]:
        def keep(p: torch.Tensor) -> None:
            if p.grad is not None:
                self._norms[key] = tensor_norms([p.grad.detach()])[0]
        return keep

    def take(self) -> float | None:
        """The step's norm (None when no hook fired), and forget it for the next step."""
        norms, self._norms = self._norms, {}
        scale, self.scale = self.scale, None
        if not norms:
            return None
        values = [n.double() for n in norms.values()]
        if len({n.device for n in values}) == 1:  # one read-back
            total = float(torch.stack(values).pow(2).sum().sqrt())
        else:  # a model split over devices
            total = math.sqrt(sum(float(n) ** 2 for n in values))
        return total / scale if scale else total

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles, self._norms, self._watched = [], {}, set()


def _on_device_of(batch: Any, module: nn.Module) -> bool:
    """Whether ``batch``'s first tensor is on the device of ``module``'s first parameter.

    True when either has none (nothing to tell apart).
    """
    from landscape.capture import first_tensor

    tensor = first_tensor(batch)
    param = next(module.parameters(), None)
    return tensor is None or param is None or tensor.device == param.device


def _clips_in_one_process(args: Any) -> bool:
    """Whether the Trainer clips ``.grad`` in one process (the hooks see it whole).

    ``max_grad_norm > 0``, no DDP, FSDP or DeepSpeed, and a Trainer with
    ``on_pre_optimizer_step`` (transformers >= 4.42).
    """
    clip = getattr(args, "max_grad_norm", None)
    return (
        isinstance(clip, (int, float)) and clip > 0
        and hasattr(TrainerCallback, "on_pre_optimizer_step")
        and int(getattr(args, "world_size", 1) or 1) == 1 and _dist.world_size() == 1
        and not getattr(args, "deepspeed", None) and not getattr(args, "fsdp", None)
    )


class LandscapeTrainerCallback(CallbackSettings, TrainerCallback):
    """Record landscape diagnostics of a ``transformers.Trainer`` run.

    Args:
        path: the HDF5 run file (``None``: in memory; read it with ``callback.run()``).
        loss_fn: ``loss_fn(model(x), y)`` for models called on ``(x, y)`` tuples; most
            Trainer models take keyword batches and use the default ``closure``.
        metrics: a preset name, metric names or :class:`~landscape.metrics.Metric`
            instances (default ``"cheap"``), as for :class:`~landscape.Monitor`.
        probe: a fixed batch for the probe metrics, e.g. ``{"input_ids": ids,
            "labels": ids}`` (moved to the model's device).
        closure: ``closure(model, batch) -> loss``; default :func:`model_loss`.
        every_n_steps: record only on optimizer steps that are multiples of ``n``.
        on_finding: called with each :class:`~landscape.Finding` as it is raised.
        stop_on: ``None`` (default) or a severity: a finding at least that severe sets
            ``control.should_training_stop``.
        config: extra JSON-able configuration stored in the run file.
        mirrors: ``"auto"`` (default): mirror every row and finding to what the Trainer's
            ``report_to`` names (``tensorboard``: the Trainer's TensorBoard directory;
            ``wandb``, ``mlflow``: the runs the Trainer's callbacks started; see
            :func:`~landscape.integrations.mirrors.report_to_mirrors`); ``None``: none; or
            a list of mirrors (:mod:`landscape.integrations.mirrors`).
        **monitor_options: ``alarms``, ``strict``, ``warn``, ``taylor_guard``, ``mode``,
            ``truncate_from``, ``flush_every``, ``on_disk_full``, ``microbatch_size``,
            ``batch_size``, ``probe_size``, ``adaptive``, ``distributed``
            (:class:`~landscape.integrations.MonitorOptions`), passed to
            :class:`~landscape.Monitor`; one left out keeps the monitor's default. Resumed from a
            checkpoint (``state.global_step`` > 0 when training starts), the run file is truncated
            to the checkpoint's step unless ``truncate_from`` or ``mode`` says otherwise.
    """

    def __init__(
        self,
        path: str | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        metrics: MetricsLike = None,
        probe: Any = None,
        closure: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        every_n_steps: int = 1,
        on_finding: Callable[[Finding], None] | None = None,
        stop_on: str | None = None,
        config: dict[str, Any] | None = None,
        mirrors: Any = "auto",
        **monitor_options: Unpack[MonitorOptions],
    ) -> None:
        if closure is None and loss_fn is None:
            closure = model_loss
        self._configure(path, loss_fn, closure, _hf_metrics(metrics), probe, every_n_steps,
                        on_finding, stop_on, config, monitor_options, mirrors)
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []
        # the Trainer passed num_items_in_batch to the model in this step: it normalised each
        # micro-batch's loss by the whole step's token count (their sum is the step's loss)
        self._token_normalised = False
        self._batch: Any = None
        self._explicit_losses: list[torch.Tensor] = []  # record_loss() values of the step
        self._explicit_share: bool | None = None
        self._closed = True
        self._busy = False
        self._world = 1
        self._recorded: int | None = None
        self._unclipped: _NormBeforeClipping | None = None
        self._wrapped_optimizer: Any = None
        self._count_lock = threading.Lock()
        self._samples: int | None = 0  # the step's samples so far (None: one not known)

    # ------------------------------------------------------------------ events

    # -- given to a Lightning Trainer by mistake: one clear error instead of its missing hooks

    state_key = "LandscapeTrainerCallback"  # Lightning names a callback's hooks by it

    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's first hook: this callback is for ``transformers.Trainer``.

        Raises:
            TypeError: naming the Lightning callback to use instead.
        """
        raise TypeError(
            "LandscapeTrainerCallback is the Hugging Face Trainer's callback; for a Lightning "
            "Trainer use landscape.integrations.lightning.LandscapeCallback")

    def on_exception(self, *args: Any, **kwargs: Any) -> None:
        """Lightning calls it after the error :meth:`setup` raised: nothing to do."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build and start the monitor; attach the forward hook that reads the loss."""
        self._close(None)  # a previous train()'s monitor, if not closed
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise ValueError("LandscapeTrainerCallback: the Trainer passed no model")
        optimizer = unwrap_optimizer(kwargs.get("optimizer"))
        device = next(model.parameters()).device
        probe = None if self.probe is None else move_to_device(self.probe, device)
        config = {
            "integration": "transformers",
            "transformers_version": transformers.__version__,
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "every_n_steps": self.every_n_steps,
            **self.config,
        }
        zero = bool(getattr(state, "is_world_process_zero", True))
        mirrors = chosen_mirrors(
            self.mirrors,
            lambda: report_to_mirrors(getattr(args, "report_to", None), args) if zero else [],
        )
        options = resume_options(self.monitor_options, self.path, int(state.global_step))
        make_run_folder(self.path)
        if "batch_size" not in options and counts_next_tokens(
                model, self.closure, options.get("distributed")):
            options["batch_size"] = next_token_targets  # a token mean over padded batches
        self.monitor = Monitor(
            model, self.loss_fn, self.path, optimizer=optimizer, metrics=self.metrics,
            probe=probe, closure=self.closure, config=config, on_finding=self._found,
            mirrors=mirrors, **options,
        )
        self.monitor.no_loss_reason = (
            "the model returned no loss in this step (the Trainer computed it outside the "
            "model: compute_loss_func=, label_smoothing_factor, a compute_loss of your own): "
            "call callback.record_loss(loss) where the loss is computed; until then the "
            "'loss' rows are NaN and loss_spike sees nothing")
        self.monitor.start()
        # this run's findings: those the file holds (a resume: none past its step), not a
        # previous train()'s, which this object kept (they disagreed with the run file)
        self.findings = list(self.monitor.findings)
        refuse_stale_start(self.monitor, int(state.global_step), type(self).__name__,
                           self.path)
        self._closed = False
        self._world = (
            int(getattr(args, "world_size", 1) or 1)
            if getattr(args, "average_tokens_across_devices", False) else 1
        )
        self._reset_step()
        self._recorded = int(state.global_step) - 1
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)
        self._wrapped_optimizer = kwargs.get("optimizer")
        if _clips_in_one_process(args):
            self._unclipped = _NormBeforeClipping(model)
        elif (getattr(args, "max_grad_norm", None) or 0) > 0 and zero:  # said once per job
            logging.getLogger("landscape").warning(
                "landscape: LandscapeTrainerCallback: with max_grad_norm=%s under DDP, FSDP "
                "or DeepSpeed the grad_norm rows hold the clipped norm (at most %s): "
                "grad_norm_spike cannot see a spike that clipping cut (docs/integrations.md)",
                args.max_grad_norm, args.max_grad_norm)
        # the Trainer switches label smoothing off for multi-label classification
        multi_label = getattr(getattr(model, "config", None), "problem_type",
                              None) == "multi_label_classification"
        if getattr(args, "label_smoothing_factor", 0) and not multi_label \
                and self.probe is None and zero:
            # (the loss: a warning at the first step that records none, if it comes)
            warnings.warn(
                "landscape: with label_smoothing_factor the Trainer pops the batch's labels "
                "before the model sees them, so the default probe (cut from a training "
                "batch) has none: the sentinels' probe_loss is NaN (taylor_forecast then "
                "warns without the probe loss's confirmation) and the metrics that need "
                "labels (curvature, collapse) cannot run; give probe= with labels",
                RuntimeWarning, stacklevel=user_stacklevel())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the step's losses afresh; hook the parameters unfrozen since the last step."""
        self._explicit_losses = []  # nothing an evaluation between two steps recorded
        self._explicit_share = None
        if self._unclipped is not None:
            self._unclipped.watch()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                              **kwargs: Any) -> None:
        """Read the fp16 loss scale of this step (the optimizer step may change it)."""
        scaler = getattr(self._wrapped_optimizer, "scaler", None)
        if self._unclipped is not None and scaler is not None and scaler.is_enabled():
            self._unclipped.scale = float(scaler.get_scale())

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the step that the optimizer just took."""
        self._step(int(state.global_step), control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the step if ``on_optimizer_step`` did not (transformers < 4.42)."""
        # transformers < 4.42 has no on_optimizer_step: record here (the gradients are gone)
        if self._recorded != state.global_step - 1:
            self._step(int(state.global_step) - 1, control)

    def _step(self, step: int, control: Any) -> None:
        if self.monitor is None or self._closed:
            return
        loss = self._step_loss()  # None: the loss metric's finding says what to do
        batch = self._batch
        grad_norm = None if self._unclipped is None else self._unclipped.take()
        samples = self._samples or None
        self._reset_step()
        self._recorded = step
        self._busy = True
        try:
            found = self.monitor.step(step, batch=batch, loss=loss, grad_norm=grad_norm,
                                      samples=samples)
        finally:
            self._busy = False
        if reaches(found, self.stop_on):
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush the run file with every checkpoint (a resumed job keeps the rows to it)."""
        if self.monitor is not None:
            self.monitor.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the forward hook and close the run file: training finished.

        Not :meth:`close`, which reads an exception being handled: a ``train()`` called
        inside an ``except`` block (a retry after an error) finished all the same.
        """
        self._close(None)

    # ------------------------------------------------------------------ the loss

    def record_loss(self, loss: torch.Tensor | float, *, share: bool | None = None) -> None:
        """Give a micro-batch's loss explicitly (from a custom ``compute_loss``).

        ``compute_loss`` runs once per micro-batch: call this each time. The step's loss is
        the sum of the values given during the step when each is its micro-batch's share of
        the step's loss (a token-loss sum divided by the step's ``num_items_in_batch``;
        times the world size under ``average_tokens_across_devices``, as for the model's
        own losses), else their mean. By default (``share=None``) they are counted as the
        Trainer counts what its ``compute_loss`` returns: called during a Trainer's
        ``training_step`` (from ``compute_loss``, a ``compute_loss_func``, or anything they
        call), as that Trainer decides (``loss_is_scaled_for_ga``, else the model accepts
        loss keyword arguments and the step has a ``num_items_in_batch``, or a
        ``compute_loss_func`` is set: added up; otherwise averaged, the Trainer dividing by
        the accumulation steps), whether or not the ``compute_loss`` passes
        ``num_items_in_batch`` on to the model; from anywhere else, added up when the
        Trainer passed ``num_items_in_batch`` to the model in the step. (A transformers
        version whose label smoother does not normalise by the token count gives k times
        the mean under accumulation k, in the Trainer's own log too.) ``share=True`` or
        ``False`` says it. Given values replace what the forward hook read for the step.

        Calls without gradients (the Trainer's evaluation runs ``compute_loss`` too) are
        ignored. Under ``average_tokens_across_devices`` give the value before the Trainer's
        own scaling (the model's ``outputs.loss``, not ``super().compute_loss()``'s result,
        which the Trainer has multiplied by the number of processes): the callback applies
        the world size itself.

        Args:
            loss: a micro-batch's loss.
            share: the values of a step add up to its loss (True), average to it (False),
                or, None, as the Trainer counts them (above).
        """
        if self._closed or not torch.is_grad_enabled():
            return  # an evaluation loop's compute_loss (no gradients), or no training
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._explicit_losses.append(value)
        self._explicit_share = share if share is not None else _trainer_counts_shares(
            sys._getframe(1))

    def _record(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._busy or not module.training or not torch.is_grad_enabled():
            return  # evaluation loops and the monitor's own (eval-mode) passes
        loss = _output_loss(output)
        if loss is not None:
            self._losses.append(loss)
        # (also without a loss: label smoothing pops the labels, the model returns none)
        self._token_normalised = kwargs.get("num_items_in_batch") is not None
        if kwargs:
            batch = {k: v for k, v in kwargs.items() if k not in _NOT_BATCH}
        elif len(args) == 1:
            batch = args[0]
        else:  # model(a, b): no batch to keep, and its samples are not known
            self._samples = None
            return
        with self._count_lock:  # DataParallel runs this hook in one thread per replica
            self._samples = add_samples(self._samples, batch)  # every micro-batch
            # DataParallel's replicas share this hook: the batch kept is the slice on the
            # device of the monitored model, which the batch metrics call
            watched = getattr(self.monitor, "model", None)
            watched = module if watched is None else watched  # (a Sequential may be falsy)
            if self._batch is None or _on_device_of(batch, watched):
                self._batch = batch

    def _step_loss(self) -> Any:
        given = bool(self._explicit_losses)
        values = self._explicit_losses if given else self._losses
        if not values:
            return None
        # (on one device: DataParallel's replicas return theirs on their own GPUs; in
        # float64, but MPS has none: float32 there, widened on the host, one transfer)
        device = values[0].device
        wide = torch.float32 if device.type == "mps" else torch.float64
        losses = torch.stack([v.detach().to(wide).mean().to(device) for v in values]
                             ).to("cpu", torch.float64)
        share = self._explicit_share if given else None
        if self._token_normalised if share is None else share:
            return losses.sum() * self._world  # each: its token-loss sum / the step's tokens
        return losses.mean()

    def _reset_step(self) -> None:
        self._samples = 0
        self._losses = []
        self._token_normalised = False
        self._batch = None
        self._explicit_losses = []
        self._explicit_share = None

    # ------------------------------------------------------------------ access

    def close(self, how: str | None = None) -> None:
        """Remove the forward hook and the monitor's optimizer hooks; close the run file.

        The Trainer has no hook for a ``train()`` that raises: call this in the ``except``
        block (or ``finally``). Called while an exception is being handled, it records that
        exception as why training stopped, so ``landscape check --require-finished`` fails
        the run, as the Lightning callback's ``on_exception`` does.

        Args:
            how: why training stopped (:meth:`Monitor.close`); None: the exception being
                handled, if any, else a finished run.
        """
        if how is None:
            how = stopped_how(sys.exc_info()[1])
        self._close(how)

    def _close(self, how: str | None) -> None:
        """:meth:`close` with the reason given (None at the Trainer's ``on_train_end``)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._unclipped is not None:
            self._unclipped.remove()
            self._unclipped = None
        self._wrapped_optimizer = None
        if self.monitor is not None:
            self.monitor.close(how=how)
        self._closed = True
        self._batch = None
        self._losses = []

    def run(self) -> Any:
        """The recorded :class:`~landscape.Run` (also after training, for in-memory runs)."""
        return recorded_run(self.monitor, self._closed, "LandscapeTrainerCallback")

    def _found(self, finding: Finding) -> None:
        self.findings.append(finding)
        if self.on_finding is not None:
            self.on_finding(finding)
