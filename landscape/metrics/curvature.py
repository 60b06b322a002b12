"""Curvature metrics over the Hessian of the loss on the probe batch (landscape.curvature).

Top eigenvalues, sharpness against the optimizer's stability threshold, trace and spectral
density; definitions in docs/metrics.md and docs/curvature.md.

Every curvature metric takes ``memory_budget`` (default ``"auto"``: one training step's
memory, at least 256 MiB; docs/curvature.md, "Memory"). The step and one product's
memory are measured once per data source (:func:`landscape.curvature.memory.
profile_memory`: a training step's estimate and one whole-batch product, about three
training steps of work) and kept in the monitor's state; each
measurement is then planned from them before it runs, and refused with one line
(a ``metric_failed`` finding) when nothing fits.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Union

import torch

from landscape._checks import positive_int, positive_number
from landscape._deprecation import deprecated_alias, module_getattr, renamed_kwargs
from landscape._errors import MissingInput, PartialRow
from landscape.findings import user_stacklevel
from landscape.metrics.base import Metric, register
from landscape.metrics.context import StepContext
from landscape.schedules import every

if TYPE_CHECKING:  # pragma: no cover
    from landscape.curvature.memory import MemoryProfile

Budget = Union[int, float, str, None]

__all__ = ["HessianTrace", "Sharpness", "SpectralDensity", "TopEigenvalues"]


def _budget(memory_budget: Budget) -> Budget:
    """``memory_budget``, checked (bytes, ``"<f>x step"``, ``"auto"`` or ``None``)."""
    from landscape.curvature.memory import check_budget

    check_budget(memory_budget)
    return memory_budget


def memory_profile(ctx: StepContext, source: str) -> MemoryProfile:
    """The memory profile of the Hessian on ``source``, measured once and kept.

    Kept in the monitor's state under ``("memory_profile", source)`` and measured again
    only when the batch's number of samples changes (the fewest over the ranks under
    ``torch.distributed``: a measurement is collective, so every rank decides alike).

    Args:
        ctx: the step context.
        source: ``"probe"`` or ``"batch"``.

    Returns:
        The profile (:func:`landscape.curvature.memory.profile_memory`).
    """
    from landscape.curvature.memory import batch_rows, least_rows, profile_memory

    op = ctx.operator(source)
    key = ("memory_profile", source)
    kept = ctx.state.get(key)
    rows = batch_rows(op)
    if kept is None or kept.rows != (least_rows(op, rows) if rows is not None else None):
        kept = profile_memory(op)
        ctx.state[key] = kept
    return kept


def _budget_kwargs(ctx: StepContext, source: str, budget: Budget) -> dict[str, Any]:
    if budget is None:
        return {}
    return {"memory_budget": budget, "memory_profile": memory_profile(ctx, source)}


def _eigen(
    ctx: StepContext, source: str, k: int, tol: float, budget: Budget,
    preconditioned: bool = False, group_lr: bool | str = False,
) -> Any:
    """:meth:`StepContext.eigen` within ``budget``: the same cache and warm starts."""
    return ctx.eigen(source, k, preconditioned=preconditioned, tol=tol, group_lr=group_lr,
                     **_budget_kwargs(ctx, source, budget))


def _with_budget(config: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """``config`` with ``memory_budget`` when it is not the default ``"auto"``."""
    return config if budget == "auto" else {**config, "memory_budget": budget}


def _peak(result: Any) -> float:
    peak = getattr(result, "peak_memory", None)
    return math.nan if peak is None else float(peak)


@register
class TopEigenvalues(Metric):
    """Top-``k`` algebraically largest Hessian eigenvalues by warm-started Lanczos.

    Fields: ``eigenvalues`` (``k`` values, NaN-padded when fewer converge), ``n_matvec``
    (Hessian-vector products used) and ``peak_memory`` (the run's measured peak in bytes,
    docs/curvature.md, "Memory"). Formerly ``HessianSpectrum``, registered as ``"hessian"``.

    Args:
        k: how many eigenvalues.
        tol: relative tolerance of :func:`landscape.curvature.top_eigenvalues`.
        memory_budget: the most memory a measurement may take: bytes, ``"<f>x step"``,
            ``"auto"`` (one training step, at least 256 MiB) or ``None`` (no limit);
            docs/curvature.md, "Memory".
        **kwargs: ``schedule`` and ``data`` (:class:`~landscape.metrics.Metric`).

    Raises:
        ValueError: ``k < 1`` or a malformed ``memory_budget``.
    """

    dense_every = 5
    name = "top_eigenvalues"
    default_schedule = every(50)

    def __init__(
        self, k: int = 3, tol: float = 1e-3, memory_budget: Budget = "auto", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.k, self.tol = positive_int("k", k), positive_number("tol", tol)
        self.memory_budget = _budget(memory_budget)

    def fields(self) -> dict[str, tuple[int, ...]]:
        """``eigenvalues`` of shape ``(k,)``, the scalars ``n_matvec`` and ``peak_memory``."""
        return {"eigenvalues": (self.k,), "n_matvec": (), "peak_memory": ()}

    def config(self) -> dict[str, Any]:
        """``k``, ``tol`` and ``memory_budget`` (when not ``"auto"``)."""
        return _with_budget({"k": self.k, "tol": self.tol}, self.memory_budget)

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        """The top-``k`` eigenvalues of the Hessian on ``self.data``."""
        result = _eigen(ctx, self.data, self.k, self.tol, self.memory_budget)
        values = torch.full((self.k,), math.nan, dtype=torch.float64)
        values[: min(self.k, len(result.values))] = result.values[: self.k].double().cpu()
        return {"eigenvalues": values, "n_matvec": float(result.n_matvec),
                "peak_memory": _peak(result)}


@register
class Sharpness(Metric):
    """lambda_max against the optimizer's edge-of-stability threshold (docs/metrics.md).

    For SGD (plain, heavy-ball, Nesterov) lambda_max is the Hessian's. For Adam, AdamW,
    NAdam, RAdam, Adamax and RMSprop it is the preconditioned sharpness, the top eigenvalue
    of ``P^-1/2 H P^-1/2`` with ``P`` the diagonal the optimizer divides its step by
    (:func:`landscape.curvature.preconditioned`; Cohen et al. 2022, *Adaptive Gradient
    Methods at the Edge of Stability*, arXiv:2207.14484), which is what
    :func:`landscape.curvature.stability_threshold` bounds for them. RAdam before its
    rectification starts (``rho_t <= 5``) is SGD with EMA momentum: the Hessian's own
    lambda_max. ``ratio`` = lambda_max / threshold; a ratio at or above 1 is the edge of
    stability. ``peak_memory``: the Lanczos run's measured peak in bytes (the same run's
    when the row reuses the step's ``top_eigenvalues`` run; NaN during the warm-up).
    ``eps_dominated``: for the preconditioned sharpness, the fraction of the moving
    parameters' coordinates whose preconditioner entry is the optimizer's epsilon rather
    than their gradients' second moment (``sqrt(v_hat) < eps``; Adamax's ``u < 2 eps``):
    there ``P`` is about ``eps``, which inflates their curvature by up to ``1/eps``, so a
    large fraction says the ratio depends on ``eps`` (docs/curvature.md); NaN where
    lambda_max is not preconditioned (SGD, no optimizer, RAdam before its rectification,
    the warm-up rows).

    The two are never mixed: when the preconditioner cannot be read (an adaptive optimizer
    without state for every parameter) the row is NaN, and with an optimizer whose
    threshold is not known (e.g. Adagrad, LBFGS) lambda_max is the Hessian's and threshold
    and ratio are NaN; either way the monitor records one ``metric_failed`` finding saying
    why.

    Args:
        tol: relative tolerance of the Lanczos run for lambda_max.
        adam_warmup: the optimizer step (any of the six above) from which the row is
            measured; NaN before it (the second-moment estimate is a few-sample transient
            at first). None (default): 10, and for RMSprop, which corrects no bias (its
            average of squared gradients is ``1 - alpha^t`` of its value, 10 % at step 10
            for alpha = 0.99, so its first steps are ~3x larger),
            ``max(10, ceil(1 / (1 - alpha)))`` (100).
        memory_budget: as for :class:`TopEigenvalues` (default ``"auto"``).
        **kwargs: ``schedule`` and ``data`` (:class:`~landscape.metrics.Metric`).
    """

    dense_every = 5
    name = "sharpness"
    FIELDS = ("lambda_max", "threshold", "ratio", "peak_memory", "eps_dominated")
    default_schedule = every(50)

    def __init__(
        self, tol: float = 1e-3, adam_warmup: int | None = None, memory_budget: Budget = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tol = positive_number("tol", tol)
        self.adam_warmup = None if adam_warmup is None else int(adam_warmup)
        self.memory_budget = _budget(memory_budget)
        self._groups_said = False  # parameter groups of other settings: warned once
        self._left_out_said = False  # trainable parameters the optimizer does not hold

    def config(self) -> dict[str, Any]:
        """``tol``, ``adam_warmup`` and ``memory_budget`` (when not ``"auto"``)."""
        return _with_budget({"tol": self.tol, "adam_warmup": self.adam_warmup},
                            self.memory_budget)

    def _say_groups_differ(self, opt: torch.optim.Optimizer) -> None:
        """Warn once when the parameter groups differ in momentum, dampening or betas.

        Groups that differ in learning rate alone are exact (each scaled by its rate,
        :func:`_only_lr_differs`); otherwise no single threshold bounds them and the first
        group's is reported (docs/curvature.md, "Parameter groups with different learning
        rates").
        """
        if self._groups_said or len({s[1:] for s in _group_settings(opt)}) < 2:
            return  # (learning rates alone: each group is scaled by its own, exact)
        self._groups_said = True
        from landscape.curvature.stability import learning_rate, training_groups

        lrs = sorted({learning_rate(g.get("lr")) for g in training_groups(opt)})
        warnings.warn(
            f"landscape: sharpness: the optimizer's parameter groups differ in momentum or "
            f"betas, not only in learning rate (learning rates "
            f"{', '.join(f'{v:g}' for v in lrs)}); the threshold is the first group's, so "
            "the ratio is that group's edge of stability (a group with a larger learning "
            "rate or momentum reaches its own at a lower sharpness)",
            RuntimeWarning, stacklevel=user_stacklevel())

    def _say_left_out(self, names: list[str]) -> None:
        """Warn once that the optimizer holds only some of the trainable parameters."""
        if self._left_out_said:
            return
        self._left_out_said = True
        warnings.warn(
            f"landscape: sharpness: the optimizer does not hold {len(names)} of the model's "
            f"trainable parameter tensors ({', '.join(repr(n) for n in names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): it does not move them, so they are left "
            "out of lambda_max (docs/curvature.md); set requires_grad=False on them if "
            "they are frozen, which also saves their gradients' memory",
            RuntimeWarning, stacklevel=user_stacklevel())

    def _say_not_scaled(self, err: ValueError) -> None:
        """Warn once when the groups' learning rates cannot scale the operator."""
        if self._groups_said:
            return
        self._groups_said = True
        warnings.warn(
            f"landscape: sharpness: the parameter groups' learning rates differ but cannot "
            f"scale the Hessian ({err}); lambda_max is the Hessian's and the threshold the "
            "first training group's, so the ratio is that group's edge of stability",
            RuntimeWarning, stacklevel=user_stacklevel())

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """lambda_max, the optimizer's stability threshold, their ratio and the peak.

        Raises:
            MissingInput: an adaptive optimizer's preconditioner cannot be read, or the
                optimizer maximizes (no row).
            PartialRow: the optimizer's threshold is not known (lambda_max only).
        """
        from landscape.curvature.precondition import (
            OptimizerSettingsError,
            divides_by_preconditioner,
        )
        from landscape.curvature.stability import (
            PRECONDITIONED,
            latest_step,
            learning_rate,
            optimizer_kind,
            sharded_state,
            stability_threshold,
            training_groups,
        )

        opt = ctx.optimizer
        kind = None if opt is None else optimizer_kind(opt)
        nan = dict.fromkeys(self.FIELDS, math.nan)
        if opt is not None and any(g.get("maximize") for g in opt.param_groups):
            raise MissingInput(
                f"{type(opt).__name__}(maximize=True) climbs the loss: the sharpness that "
                "bounds its steps is the largest eigenvalue of the negated loss's Hessian, "
                "not of this one; for a sharpness, train with maximize=False on the "
                "negated loss and give the monitor that loss")
        adaptive = kind in PRECONDITIONED
        if adaptive and latest_step(opt) < _warmup(opt, kind, self.adam_warmup):
            # the second-moment estimate is a one- or few-sample transient at first: the
            # preconditioned sharpness is meaningless until it has averaged some steps.
            return nan
        pre = adaptive and divides_by_preconditioner(opt)
        outside = [] if opt is None or kind is None else _not_held(ctx, opt)
        if outside and len(outside) == len(ctx.names):
            raise MissingInput(f"the optimizer ({type(opt).__name__}) holds none of the "
                               "model's trainable parameters: no sharpness of its steps")
        if outside:
            self._say_left_out(outside)
        group_lr: bool | str = False
        if opt is not None and kind is not None and training_groups(opt):
            if _only_lr_differs(opt):
                group_lr = True  # each group scaled by its rate (what does not move: 0)
            elif outside or _frozen_groups(opt):
                group_lr = "moving"  # only what the optimizer does not move left out
        if group_lr and not pre:
            try:
                ctx.operator(self.data, group_lr=group_lr)
            except OptimizerSettingsError as err:  # a learning rate that is not a number
                group_lr = False
                self._say_not_scaled(err)
        dominated = math.nan
        if pre:
            try:
                op = ctx.operator(self.data, preconditioned=True, group_lr=group_lr)
            except OptimizerSettingsError as err:
                raise MissingInput(
                    f"no preconditioned sharpness for {type(opt).__name__}, whose threshold "
                    f"bounds it (not the Hessian's): {err}"
                ) from err
            fraction = getattr(op, "dead_fraction", None)
            dominated = math.nan if fraction is None else float(fraction)
        result = _eigen(ctx, self.data, 1, self.tol, self.memory_budget, preconditioned=pre,
                        group_lr=group_lr)
        lam = float(result.values[0])
        row = {**nan, "lambda_max": lam, "peak_memory": _peak(result),
               "eps_dominated": dominated}
        if opt is None:
            return row
        if kind is None:
            inner = sharded_state(opt)
            why = (f"no stability threshold known for {type(opt).__name__} (known: SGD, Adam, "
                   "AdamW, NAdam, RAdam, Adamax, RMSprop)") if inner is None else (
                f"ZeroRedundancyOptimizer shards {inner.__name__}'s state over the ranks, "
                "and its threshold bounds the sharpness preconditioned by all of it")
            raise PartialRow(row, MissingInput(
                f"{why}: lambda_max is the Hessian's, threshold and ratio are NaN"))
        if all(learning_rate(g.get("lr")) == 0.0 for g in opt.param_groups):
            threshold = math.inf  # the first step of a warm-up from 0
        else:
            threshold = stability_threshold(opt)
        self._say_groups_differ(opt)
        ratio = lam / threshold if threshold and not math.isnan(threshold) else math.nan
        return {**row, "threshold": threshold, "ratio": ratio}


def _group_settings(opt: torch.optim.Optimizer) -> list[tuple]:
    """The settings the stability threshold reads, per parameter group that trains."""
    from landscape.curvature.stability import stability_settings, training_groups

    return [stability_settings(g) for g in training_groups(opt)]


def _not_held(ctx: StepContext, opt: torch.optim.Optimizer) -> list[str]:
    """The monitored parameters that ``opt`` does not hold (it never moves them)."""
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    own = ctx._own()
    return [n for n in ctx.names if id(own[n]) not in held]


def _frozen_groups(opt: torch.optim.Optimizer) -> bool:
    """Whether a parameter group holds parameters at learning rate 0 (they do not move)."""
    from landscape.curvature.stability import learning_rate

    return any(g.get("params") and learning_rate(g.get("lr")) == 0 for g in opt.param_groups)


def _only_lr_differs(opt: torch.optim.Optimizer) -> bool:
    """Whether the groups differ in learning rate alone: then the ratio is exact.

    Each group scaled by its rate relative to the first training group's (``group_lr``;
    a group at learning rate 0 does not move: scaled by 0) makes that group's threshold
    bound the operator; other settings (momentum, betas) that differ among the groups that
    train change the threshold itself, which one ratio cannot hold.
    """
    from landscape.curvature.stability import learning_rate

    settings = _group_settings(opt)
    rates = {learning_rate(g.get("lr")) for g in opt.param_groups if g.get("params")}
    return bool(settings) and len(rates) > 1 and len({s[1:] for s in settings}) == 1


def _warmup(opt: torch.optim.Optimizer, kind: str | None, steps: int | None) -> int:
    """Steps before the preconditioned sharpness of ``opt`` is measured.

    ``steps`` when given. Otherwise 10, or for RMSprop (no bias correction: its
    squared-gradient average is ``1 - alpha^t`` of its value at step ``t``) the time
    constant ``1 / (1 - alpha)`` of that average: before it the preconditioner is a
    start-up transient, whose large first steps (``~ 1 / sqrt(1 - alpha^t)`` times the
    settled ones) put a healthy run past the threshold for a few steps (docs/metrics.md,
    "Sharpness").
    """
    if steps is not None:
        return steps
    from landscape.curvature.stability import reference_group

    alpha = float(reference_group(opt).get("alpha", 0.99)) if kind == "rmsprop" else 1.0
    return max(10, math.ceil(1.0 / (1.0 - alpha))) if 0.0 <= alpha < 1.0 else 10


@register
class HessianTrace(Metric):
    """Hessian trace with a standard error: Hutchinson deflated by a Lanczos basis by default.

    Args:
        n_matvec: budget of Hessian-vector products.
        method: any method of :func:`landscape.curvature.hessian_trace`.
        memory_budget: as for :class:`TopEigenvalues` (default ``"auto"``); the plan picks
            how many probes to multiply at once.
        **kwargs: ``schedule`` and ``data`` (:class:`~landscape.metrics.Metric`).
    """

    name = "hessian_trace"
    FIELDS = ("value", "stderr", "peak_memory")
    default_schedule = every(100)

    def __init__(
        self, n_matvec: int = 30, method: str = "krylov", memory_budget: Budget = "auto",
        **kwargs: Any,
    ) -> None:
        from landscape.curvature.trace import trace_method

        super().__init__(**kwargs)
        self.n_matvec, self.method = positive_int("n_matvec", n_matvec), method
        trace_method(method)  # a bad one fails here, not at every due step
        self.memory_budget = _budget(memory_budget)

    def config(self) -> dict[str, Any]:
        """``n_matvec``, ``method`` and ``memory_budget`` (when not ``"auto"``)."""
        return _with_budget({"n_matvec": self.n_matvec, "method": self.method},
                            self.memory_budget)

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """The trace estimate ``value``, its ``stderr`` and the run's ``peak_memory``."""
        from landscape.curvature import hessian_trace

        seed = int(ctx.state.setdefault("trace_seed", 0))
        res = hessian_trace(
            ctx.operator(self.data), method=self.method, n_matvec=self.n_matvec, seed=seed,
            progress=False, **_budget_kwargs(ctx, self.data, self.memory_budget),
        )
        return {"value": float(res.value), "stderr": float(res.stderr),
                "peak_memory": _peak(res)}


@register
class SpectralDensity(Metric):
    """Stochastic Lanczos quadrature nodes and weights (Ghorbani et al. 2019).

    One row of ``lanczos_steps`` per probe vector (NaN-padded when Lanczos stops early);
    smooth them with :func:`landscape.curvature.spectral_density`'s convention to plot a
    density. The run costs ``lanczos_steps × n_probes`` Hessian-vector products;
    ``peak_memory`` is its measured peak in bytes.

    Args:
        lanczos_steps: Lanczos steps per probe vector (formerly ``n_iter``, which still
            works with a ``DeprecationWarning``).
        n_probes: probe vectors.
        memory_budget: as for :class:`TopEigenvalues` (default ``"auto"``); the plan picks
            how many probes run in lock step, and a local basis when the whole one does
            not fit.
        reorthogonalize: ``"auto"``, ``"full"`` or ``"local"``
            (:func:`landscape.curvature.spectral_density`).
        **kwargs: ``schedule`` and ``data`` (:class:`~landscape.metrics.Metric`).

    Raises:
        ValueError: an unknown ``reorthogonalize`` or a malformed ``memory_budget``.
    """

    name = "spectral_density"
    default_schedule = every(200)

    @renamed_kwargs(n_iter="lanczos_steps")
    def __init__(
        self, lanczos_steps: int = 30, n_probes: int = 2, memory_budget: Budget = "auto",
        reorthogonalize: str = "auto", **kwargs: Any,
    ) -> None:
        from landscape.curvature.spectrum import check_reorthogonalize

        super().__init__(**kwargs)
        self.lanczos_steps = positive_int("lanczos_steps", lanczos_steps)
        self.n_probes = positive_int("n_probes", n_probes)
        self.memory_budget = _budget(memory_budget)
        self.reorthogonalize = check_reorthogonalize(reorthogonalize)

    n_iter = deprecated_alias("n_iter", "lanczos_steps")

    def fields(self) -> dict[str, tuple[int, ...]]:
        """``nodes`` and ``weights`` of shape ``(n_probes, lanczos_steps)``, ``peak_memory``."""
        shape = (self.n_probes, self.lanczos_steps)
        return {"nodes": shape, "weights": shape, "peak_memory": ()}

    def config(self) -> dict[str, Any]:
        """``lanczos_steps``, ``n_probes``; ``memory_budget``, ``reorthogonalize`` if set."""
        config = {"lanczos_steps": self.lanczos_steps, "n_probes": self.n_probes}
        if self.reorthogonalize != "auto":
            config["reorthogonalize"] = self.reorthogonalize
        return _with_budget(config, self.memory_budget)

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        """The quadrature nodes and weights on ``self.data``."""
        from landscape.curvature import spectral_density

        # positional: the keyword is n_iter before the curvature rename, lanczos_steps after
        res = spectral_density(ctx.operator(self.data), self.lanczos_steps, self.n_probes,
                               reorthogonalize=self.reorthogonalize, progress=False,
                               **_budget_kwargs(ctx, self.data, self.memory_budget))
        out: dict[str, Any] = {"peak_memory": _peak(res)}
        for key in ("nodes", "weights"):
            table = torch.full((self.n_probes, self.lanczos_steps), math.nan, dtype=torch.float64)
            got = torch.as_tensor(getattr(res, key), dtype=torch.float64).reshape(self.n_probes, -1)
            table[:, : got.shape[1]] = got[:, : self.lanczos_steps]
            out[key] = table
        return out


__getattr__ = module_getattr(__name__, {"HessianSpectrum": "TopEigenvalues"}, globals())
