"""A Lightning ``Callback`` that runs a :class:`landscape.Monitor` during ``trainer.fit``.

::

    from landscape.integrations import LandscapeCallback

    cb = LandscapeCallback("run.h5", loss_fn=F.cross_entropy, metrics="standard",
                           probe=(x_val, y_val))
    Trainer(max_steps=1000, callbacks=[cb]).fit(module, loader)

What it does, hook by hook:

* ``on_train_start`` (after Lightning restored a ``ckpt_path``): builds the monitor over
  the ``LightningModule`` and the *torch* optimizer inside ``trainer.optimizers[0]``
  (wrappers are unwrapped, so the monitor's ``register_step_pre_hook``/``post_hook`` see
  Lightning's ``optimizer.step(closure)`` call), moves the probe batch to the module's
  device, and opens the run file, truncated to the restored step when resuming; every row
  and finding is also sent to ``trainer.loggers`` (``mirrors=None`` turns that off).
* ``on_train_batch_end``: when ``trainer.global_step`` advanced (an optimizer step
  happened; under gradient accumulation the other batches only collect their loss), calls
  ``monitor.step(trainer.global_step - 1, batch=batch, loss=...)``. The step index is the
  one Lightning's loggers use for that batch (0-based count of optimizer steps before
  it); the loss is ``outputs["loss"]`` summed over the accumulated batches (Lightning
  divides each by ``accumulate_grad_batches``, so the sum is their mean; a shorter window
  at the end of an epoch is rescaled to its mean). The gradients
  are still in ``.grad`` at this point (Lightning zeroes them inside the next step); with
  ``gradient_clip_val`` they are clipped there, so ``on_before_optimizer_step`` (which
  Lightning calls before clipping) keeps their norm for the ``grad_norm`` metric. A
  list batch (``default_collate`` of ``(x, y)`` samples) is passed on as a tuple: to the
  monitor a list means several batches. Several training dataloaders' combined batch is
  passed on as the list of their batches (:func:`_monitor_batch`).
* ``on_fit_end``, ``on_exception``, ``teardown``: close the run file (idempotent).

The loss function. Metrics of the ``cheap`` preset need none: the training loss comes from
``outputs["loss"]``, gradients and updates from the module, logits from ``module(x)``.
Curvature metrics (``top_eigenvalues``, ``sharpness``, ``hessian_trace``, ...) evaluate a loss on
the probe batch and need ``loss_fn`` (``loss_fn(module(x), y)``) or ``closure``; without
either they record NaN and one ``metric_failed`` finding saying so. The callback never
calls the module's ``training_step`` on its own, because that would repeat its side effects
(``self.log``, torchmetrics updates, counters). Opt in with
``closure=training_step_loss``: it calls ``training_step(batch, 0)`` with ``self.log`` and
``self.log_dict`` muted, and is right for modules whose ``training_step`` has no other side
effects (not with manual optimization, where it would step the optimizers).

Training is not changed (the monitored fit gives bitwise the parameters of the unmonitored
one on CPU; ``tests/integrations/test_lightning.py``). Under DDP every rank computes the
metrics on its own batch and only global rank 0 writes the file (the monitor checks the
``torch.distributed`` rank).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

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
from landscape.integrations.mirrors import lightning_logger_mirrors
from landscape.metrics.context import NoLossFunction
from landscape.monitor import MetricsLike, Monitor, resolve_metrics
from landscape.params import gradient_norm
from landscape.schedules import Every
from landscape.store import Run
from landscape.store.writer_status import stopped_how

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.callbacks import Callback
    except ImportError as err:
        raise ImportError(
            "landscape.integrations.lightning needs Lightning: "
            "pip install 'landscape-for-pytorch[lightning]'"
        ) from err

__all__ = ["LandscapeCallback", "training_step_loss"]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _muted_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` are no-ops inside the block.

    Instance attributes shadow the methods and are removed on exit.
    """
    names = [n for n in ("log", "log_dict") if n not in vars(module)]
    for n in names:
        object.__setattr__(module, n, _noop)
    try:
        yield
    finally:
        for n in names:
            vars(module).pop(n, None)


def training_step_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """A closure reusing the module's ``training_step(batch, 0)``, with logging muted.

    ``self.log``/``self.log_dict`` do nothing during the call. Opt in with
    ``LandscapeCallback(closure=training_step_loss)``; other side effects of
    ``training_step`` (metric objects, counters) do happen on each evaluation.

    Args:
        module: the ``LightningModule``.
        batch: a training batch.

    Returns:
        The loss ``training_step`` returns (its ``"loss"`` when it returns a dict).

    Raises:
        TypeError: ``training_step`` returned no loss tensor.
    """
    with _muted_logging(module):
        out = module.training_step(batch, 0)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "training_step returned no loss tensor; pass loss_fn= or closure= to LandscapeCallback"
        )
    return out


def _monitor_batch(trainer: pl.Trainer, batch: Any) -> Any:
    """A training batch as the monitor reads it: one batch, or a list of several.

    ``default_collate``'s ``[x, y]`` is one batch, passed on as a tuple (to the monitor a
    list means several batches). Under several training dataloaders (``fit(module, [dl1,
    dl2])`` or ``{"a": dl1, "b": dl2}``) Lightning's batch holds one batch of each, in the
    loaders' structure: they are passed on as a list of batches (read as ``(inputs,
    targets)`` they were ``inputs = [x1, y1]``, and every forward of the monitor failed).
    """
    loaders = getattr(trainer, "train_dataloader", None)
    # (one loader given in a list or a dict too: fit(m, [dl]) hands over [[x, y]])
    if isinstance(loaders, Mapping) and isinstance(batch, Mapping) and loaders \
            and set(batch) <= set(loaders):
        return [_monitor_batch_of_one(b) for b in batch.values()]
    if isinstance(loaders, (list, tuple)) and loaders \
            and isinstance(batch, (list, tuple)) and len(batch) == len(loaders):
        return [_monitor_batch_of_one(b) for b in batch]
    return _monitor_batch_of_one(batch)


def _monitor_batch_of_one(batch: Any) -> Any:
    """``default_collate``'s ``[x, y]`` as the one batch it is: a tuple."""
    return tuple(batch) if isinstance(batch, list) else batch


def _as_trained(trainer: pl.Trainer, batch: Any) -> Any:
    """``batch`` converted as the precision plugin converts training inputs.

    ``precision="bf16-true"`` (or ``"16-true"``) trains the module in that dtype and casts
    each batch's floating-point tensors to it; a float32 probe would fail every metric.
    """
    convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
    return batch if convert is None else convert(batch)


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    return None


class LandscapeCallback(CallbackSettings, Callback):
    """Record landscape diagnostics of a ``LightningModule`` during ``trainer.fit``.

    Args:
        path: the HDF5 run file (``None``: in memory; read it with ``callback.run()``).
        loss_fn: ``loss_fn(module(x), y)`` for ``(x, y)`` batches, for the metrics that
            evaluate a loss on the probe (see the module docstring).
        metrics: a preset name, metric names or :class:`~landscape.metrics.Metric`
            instances (default ``"cheap"``), as for :class:`~landscape.Monitor`.
        probe: a fixed batch for the probe metrics (moved to the module's device).
        closure: ``closure(module, batch) -> loss`` for batches that are not ``(x, y)``;
            :func:`training_step_loss` reuses the module's ``training_step``.
        every_n_steps: record only on optimizer steps that are multiples of ``n`` (each
            metric's schedule is intersected with ``every(n)``).
        on_finding: called with each :class:`~landscape.Finding` as it is raised.
        stop_on: ``None`` (default) or a severity (``"warning"``, ``"error"``): a finding
            at least that severe sets ``trainer.should_stop`` and training ends after the
            current step.
        config: extra JSON-able configuration stored in the run file.
        mirrors: ``"auto"`` (default): every row and finding also goes to each of
            ``trainer.loggers`` (``log_metrics``;
            :class:`~landscape.integrations.mirrors.LightningLoggerMirror`); ``None``:
            nowhere else; or a list of mirrors (:mod:`landscape.integrations.mirrors`).
        **monitor_options: ``alarms``, ``strict``, ``warn``, ``taylor_guard``, ``mode``,
            ``truncate_from``, ``flush_every``, ``on_disk_full``, ``microbatch_size``,
            ``batch_size``, ``probe_size``, ``adaptive``, ``distributed``
            (:class:`~landscape.integrations.MonitorOptions`), passed to
            :class:`~landscape.Monitor`; one left out keeps the monitor's default. A fit resumed
            from a checkpoint (``ckpt_path``) truncates the run file to the checkpoint's step unless
            ``truncate_from`` or ``mode`` says otherwise.
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
        super().__init__()
        self._configure(path, loss_fn, closure, resolve_metrics(metrics), probe, every_n_steps,
                        on_finding, stop_on, config, monitor_options, mirrors)
        self._seen_global_step = 0
        self._pending: list[torch.Tensor] = []
        self._pending_samples: int | None = 0  # the window's samples (None: not known)
        self._told: set[str] = set()  # the INFO notes said, each once per callback
        self._told_unreachable = False  # every_n_steps that no recorded step can meet
        self._last_advance: int | None = None  # global_step's advance at the last step
        self._created = time.time()  # run() reads only a file written since (ddp_spawn)
        self._grad_norm: float | None = None  # before clipping, from on_before_optimizer_step
        # manual optimization: the watched gradient's norm after the latest backward (the
        # module may clip it before it steps), and whether the watched optimizer stepped
        self._backward_norm: float | None = None
        self._watched_stepped = False
        self._closed = True

    # ------------------------------------------------------------------ lifecycle

    def on_init_end(self, *args: Any, **kwargs: Any) -> None:
        """The Hugging Face Trainer's first event (Lightning 2 has no such hook).

        Raises:
            TypeError: this callback is Lightning's; naming the Trainer's.
        """
        raise TypeError(
            "LandscapeCallback is Lightning's callback; for a Hugging Face Trainer use "
            "landscape.integrations.huggingface.LandscapeTrainerCallback")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close what a previous fit left open (the monitor starts in ``on_train_start``)."""
        self.close()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build and start the monitor over ``pl_module`` and its first optimizer.

        This runs after Lightning restored a checkpoint (``ckpt_path``), so
        ``trainer.global_step`` is the step training resumes at.
        """
        self.close()
        loss_fn, closure = self.loss_fn, self.closure
        if loss_fn is None and closure is None:
            loss_fn = NoLossFunction("LandscapeCallback (e.g. closure=landscape.integrations."
                                     "lightning.training_step_loss)")
        if closure is training_step_loss and not pl_module.automatic_optimization:
            raise ValueError(
                "LandscapeCallback: closure=training_step_loss would step the optimizers of a "
                "module with manual optimization; pass loss_fn= or another closure="
            )
        optimizers = trainer.optimizers
        optimizer = unwrap_optimizer(optimizers[0]) if optimizers else None
        probe = None if self.probe is None else _as_trained(
            trainer, move_to_device(self.probe, pl_module.device))
        config = {
            "integration": "lightning",
            "lightning_version": pl.__version__,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "every_n_steps": self.every_n_steps,
            **self.config,
        }
        mirrors = chosen_mirrors(
            self.mirrors,
            lambda: lightning_logger_mirrors(trainer.loggers) if trainer.is_global_zero else [],
        )
        # fast_dev_run: Lightning's smoke test, which logs and saves nothing; its rows stay
        # in memory, so the real fit that follows starts the file
        path = None if trainer.fast_dev_run else self.path
        if trainer.fast_dev_run and self.path is not None:
            logging.getLogger("landscape").info(
                "landscape: LandscapeCallback: fast_dev_run: the rows stay in memory, "
                "%s is not written", self.path)
        options = resume_options(self.monitor_options, path, int(trainer.global_step))
        make_run_folder(path)
        self.monitor = Monitor(
            pl_module, loss_fn, path, optimizer=optimizer, metrics=self.metrics,
            probe=probe, closure=closure, config=config, on_finding=self._found,
            mirrors=mirrors, **options,
        )
        self.monitor.no_loss_reason = (
            "training_step returned no loss: return the loss, or {'loss': loss, ...} "
            "(with manual optimization too), for the 'loss' rows (NaN until then)")
        # steps that advance by k per batch miss schedules: _refuse_unreachable_steps
        # says which and why, in Lightning's terms
        self.monitor.say_missed_schedules = False
        self.monitor.start()
        # this fit's findings: those the file holds (a resume: none past its step), not a
        # previous fit's (fast_dev_run's smoke test), which this object kept
        self.findings = list(self.monitor.findings)
        refuse_stale_start(
            self.monitor, int(trainer.global_step), type(self).__name__, path,
            fresh_note="; a fit given ckpt_path that starts at step 0 restored no checkpoint: "
            "ckpt_path='last' looks in the folder of the logger's new version only (a new "
            "Trainer logs to version_N+1), so give the checkpoint's path or a fixed "
            "ModelCheckpoint(dirpath=...)")
        self._closed = False
        self._seen_global_step = trainer.global_step
        self._pending = []
        self._pending_samples = 0
        self._grad_norm = self._backward_norm = None  # (a failed fit's, not this one's)
        self._watched_stepped = False

    def _watched_norm(self) -> float | None:
        """The norm of the watched (first) optimizer's gradient, over the parameters it holds.

        With several optimizers, the others' parameters hold gradients of their own steps.
        """
        held = {id(p): p for g in self.monitor.optimizer.param_groups for p in g["params"]
                if p.requires_grad}
        return gradient_norm(held.values())

    def _records_grad_norm(self) -> bool:
        return self.monitor is not None and self.monitor.optimizer is not None and any(
            m.name == "grad_norm" for m in self.monitor.metrics)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With manual optimization, keep the gradient's norm before the module clips it.

        The module clips between ``manual_backward`` and ``opt.step()``
        (``self.clip_gradients(opt, ...)``, Lightning's way under manual optimization), so
        ``on_before_optimizer_step`` sees the clipped gradient; the norm after the latest
        backward is the step's before clipping (accumulated over its backward passes).
        """
        if not pl_module.automatic_optimization and self._records_grad_norm():
            norm = self._watched_norm()
            # under a GradScaler (precision="16-mixed") the gradients are still scaled:
            # Lightning unscales them only inside the optimizer step
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if norm is not None and scaler is not None and scaler.is_enabled():
                norm = norm / float(scaler.get_scale())
            self._backward_norm = norm

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Keep the gradient norm before Lightning clips it, or before manual code zeroes it.

        With ``gradient_clip_val`` the ``.grad`` the monitor sees later is clipped; with
        manual optimization the module may zero it right after ``opt.step()``
        (``opt.step(); opt.zero_grad()``), before ``on_train_batch_end``, and may have
        clipped it before (the norm after its latest backward is taken then). Only for the
        watched (first) optimizer, over the parameters it holds, and only when the
        ``grad_norm`` metric is recorded.
        """
        if self.monitor is None or unwrap_optimizer(optimizer) is not self.monitor.optimizer:
            return
        self._watched_stepped = True
        if not (trainer.gradient_clip_val or not pl_module.automatic_optimization) \
                or not self._records_grad_norm():
            return
        manual = not pl_module.automatic_optimization
        norm, self._backward_norm = self._backward_norm, None
        self._grad_norm = norm if manual and norm is not None else self._watched_norm()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record one monitor step after each optimizer step, with the step's summed loss."""
        if self.monitor is None:
            return
        batch = _monitor_batch(trainer, batch)
        loss = _loss_of(outputs)
        if loss is not None:
            self._pending.append(loss)
        # every batch of an accumulation window counts, but one whose training_step returned
        # None under automatic optimization: Lightning skipped its backward
        if loss is not None or not pl_module.automatic_optimization:
            self._pending_samples = add_samples(self._pending_samples, batch)
        if trainer.global_step == self._seen_global_step:
            return  # accumulating gradients: no optimizer step yet
        self._refuse_unreachable_steps(trainer.global_step - self._seen_global_step)
        self._seen_global_step = trainer.global_step
        pending, self._pending = self._pending, []
        samples, self._pending_samples = self._pending_samples or None, 0
        watched, self._watched_stepped = self._watched_stepped, False
        current = unwrap_optimizer(trainer.optimizers[0]) if trainer.optimizers else None
        if not pl_module.automatic_optimization and not watched \
                and current is self.monitor.optimizer:  # (a replaced one: the monitor warns)
            # only the other optimizers stepped (a GAN's second network): no step of the
            # watched one, whose gradient, update and learning rate the row would report
            self._grad_norm = self._backward_norm = None
            self._say_once("the watched (first) optimizer did not step at step %d, only the "
                           "others", trainer.global_step - 1)
            return
        if not pending and pl_module.automatic_optimization:
            # every training_step of the step returned None, Lightning's way to skip a
            # batch: no backward, nothing trained, nothing to record
            self._say_once("training_step returned None at step %d (a skipped batch)",
                           trainer.global_step - 1)
            return
        if not pending:
            step_loss = None  # the loss metric's finding says what to do (no_loss_reason)
        elif pl_module.automatic_optimization:
            # each batch's loss is already divided by accumulate_grad_batches, also in the
            # shorter window that ends an epoch: rescale so the sum is the mean there too
            # (in float64 on the host, as the Hugging Face callback sums: bf16-true losses
            # summed in bfloat16 lost 0.2 %; MPS has no float64)
            step_loss = torch.stack(pending).to("cpu", torch.float64).sum() * (
                trainer.accumulate_grad_batches / len(pending))
        else:
            step_loss = torch.stack(pending).to("cpu", torch.float64).mean()
        grad_norm, self._grad_norm = self._grad_norm, None
        found = self.monitor.step(trainer.global_step - 1, batch=batch, loss=step_loss,
                                  grad_norm=grad_norm, samples=samples)
        if reaches(found, self.stop_on):
            trainer.should_stop = True

    def _say_once(self, what: str, step: int) -> None:
        """An INFO line that ``what`` happened at ``step`` and gets no row, once per kind."""
        if what in self._told:
            return
        self._told.add(what)
        logging.getLogger("landscape").info(
            "landscape: LandscapeCallback: " + what + ": no row is recorded for such steps",
            step)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Flush the run file with every checkpoint (a resumed job keeps the rows to it)."""
        if self.monitor is not None:
            self.monitor.flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the run file."""
        self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the run file, every row appended before the failure kept, saying why.

        The reason (``closed_how``) makes ``landscape check --require-finished`` fail it.
        """
        self.close(how=stopped_how(exception))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the run file."""
        self.close()

    def _refuse_unreachable_steps(self, advance: int) -> None:
        """Warn once when ``every_n_steps`` can never meet the steps recorded.

        With k optimizers stepping per batch (manual optimization) ``global_step``
        advances by k, and the rows fall on steps k-1, 2k-1, ...: none is a multiple of an
        ``every_n_steps`` that shares a factor with k, and the run would stay empty.
        """
        n = self.every_n_steps
        last, self._last_advance = self._last_advance, advance
        # twice the same advance: optimizers that step at different rates (a GAN's
        # discriminator every batch, its generator every other) do reach every residue
        if (last == advance > 1 and n > 1 and math.gcd(n, advance) > 1
                and not self._told_unreachable):
            self._told_unreachable = True
            warnings.warn(
                f"landscape: LandscapeCallback: trainer.global_step advances by {advance} per "
                f"batch ({advance} optimizer steps), so the rows fall on steps {advance - 1}, "
                f"{2 * advance - 1}, ...: none is a multiple of every_n_steps={n}, and "
                f"nothing will be recorded; pass an every_n_steps with no factor in common "
                f"with {advance}", RuntimeWarning, stacklevel=user_stacklevel())
        if last == advance > 1 and not self._told_unreachable and self.monitor is not None:
            # the same for a metric's own every(m) schedule (the presets' every(10), ...)
            never = [f"{m.name} ({m.schedule.describe()})" for m in self.monitor.metrics
                     if isinstance(m.schedule, Every) and m.schedule.n > 1
                     and (advance - 1 - m.schedule.start) % math.gcd(m.schedule.n, advance)]
            if never:
                self._told_unreachable = True
                warnings.warn(
                    f"landscape: LandscapeCallback: trainer.global_step advances by {advance} "
                    f"per batch ({advance} optimizer steps), so the rows fall on steps "
                    f"{advance - 1}, {2 * advance - 1}, ...: {', '.join(never)} will never "
                    "run on their own schedules (only inside the adaptive dense windows the "
                    f"sentinels open); give them schedules with no factor in common with "
                    f"{advance} (metrics=[create(name, schedule=...)])", RuntimeWarning,
                    stacklevel=user_stacklevel())

    # ------------------------------------------------------------------ access

    def close(self, how: str | None = None) -> None:
        """Remove the monitor's optimizer hooks and close the run file (idempotent).

        Args:
            how: why training stopped, when it did not finish (:meth:`Monitor.close`).
        """
        if self.monitor is not None:
            self.monitor.close(how=how)
        self._closed = True

    def run(self) -> Any:
        """The recorded :class:`~landscape.Run` (also after the fit, for in-memory runs).

        Under ``strategy="ddp_spawn"`` the fit runs in spawned processes and this object,
        in the launching process, never holds the monitor: the file rank 0 wrote is read
        (a file last written before this callback was made is an older run's, not read).
        """
        if (self.monitor is None and self.path is not None and os.path.exists(self.path)
                and os.path.getmtime(self.path) >= self._created - 1.0):
            return Run.open(self.path)
        return recorded_run(self.monitor, self._closed, "LandscapeCallback")

    def _found(self, finding: Finding) -> None:
        self.findings.append(finding)
        if self.on_finding is not None:
            self.on_finding(finding)
