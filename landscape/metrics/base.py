"""The metric plugin interface and its registry.

A :class:`Metric` names its output fields (name -> per-row shape) before step 0, says when
it is due (a :mod:`landscape.schedules` schedule) and on which data (the fixed ``probe``
batch or the current training ``batch``), and computes one row from a per-step
:class:`~landscape.metrics.context.StepContext` that shares work between the metrics due at
the same step (one gradient, one Lanczos run, one feature capture).

Writing your own metric takes a few lines::

    @ls.metrics.register
    class WeightNorm(ls.metrics.Metric):
        name = "weight_norm"
        FIELDS = ("value",)

        def compute(self, ctx):
            return {"value": ls.params.norm(ctx.params).item()}

The registry refuses to replace an existing name silently (pass ``replace=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, TypeVar

from torch import nn

from landscape.schedules import Schedule, every, parse

if TYPE_CHECKING:  # pragma: no cover
    from landscape.metrics.context import StepContext

__all__ = ["DATA_SOURCES", "Metric", "available", "create", "register"]

DATA_SOURCES = ("probe", "batch")


class Metric:
    """Base class of every metric plugin.

    Class attributes a subclass sets: ``name`` (the group under ``/metrics/`` in the run
    file), ``FIELDS`` (names of scalar fields; override :meth:`fields` for vector
    fields or shapes that depend on the model), ``default_schedule``, ``default_data``,
    and ``needs_update = True`` when it uses the optimizer's actual step Δθ.
    """

    name: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[str, ...]] = ()
    default_schedule: ClassVar[Schedule] = every(1)
    default_data: ClassVar[str] = "probe"
    needs_update: ClassVar[bool] = False

    def __init__(self, schedule: Schedule | str | int | None = None, data: str | None = None):
        self.schedule: Schedule = (
            self.default_schedule if schedule is None else parse(schedule)
        )
        self.data = self.default_data if data is None else data
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")

    # -- declared before step 0

    def setup(self, model: nn.Module) -> None:
        """Resolve anything that depends on the model (layer names, shapes). Called once."""

    def fields(self) -> dict[str, tuple[int, ...]]:
        return {k: () for k in self.FIELDS}

    def params(self) -> dict[str, Any]:
        """JSON-able settings stored with the metric in the run file."""
        return {}

    def captures(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Module names whose (inputs, outputs) this metric reads from the shared capture."""
        return (), ()

    # -- per due step

    def compute(self, ctx: StepContext) -> Mapping[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule}, data={self.data!r})"


_REGISTRY: dict[str, type[Metric]] = {}
M = TypeVar("M", bound=type[Metric])


def register(cls: M | None = None, *, replace: bool = False) -> Any:
    """Class decorator adding a metric to the registry under ``cls.name``.

    Registering a second class under an existing name raises ``ValueError`` unless
    ``replace=True``: a plugin never silently shadows another one.
    """

    def add(c: M) -> M:
        if not (isinstance(c, type) and issubclass(c, Metric)):
            raise TypeError(f"register expects a Metric subclass, got {c!r}")
        if not c.name or "/" in c.name:
            raise ValueError(f"{c.__name__}.name must be a non-empty name without '/'")
        old = _REGISTRY.get(c.name)
        if old is not None and old is not c and not replace:
            raise ValueError(
                f"a metric named {c.name!r} is already registered ({old.__module__}."
                f"{old.__qualname__}); pass replace=True to replace it"
            )
        _REGISTRY[c.name] = c
        return c

    return add if cls is None else add(cls)


def available() -> list[str]:
    """Names of every registered metric."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Metric:
    """Instantiate the registered metric ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**kwargs)
