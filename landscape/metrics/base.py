"""The metric plugin interface and its registry.

A :class:`Metric` names its output fields (name -> per-row shape) before step 0, says when
it is due (a :mod:`landscape.schedules` schedule) and on which data (the fixed ``probe``
batch or the current training ``batch``), and computes one row from a per-step
:class:`~landscape.metrics.context.StepContext` that shares work between the metrics due at
the same step (one gradient, one Lanczos run, one feature capture).

A metric's name is its registry name: the group under ``/metrics/`` in the run file and
the name presets, the command line and config files use. It is the snake_case of the
class name (``TopEigenvalues`` is ``"top_eigenvalues"``; docs/vocabulary.md). Writing your
own metric takes a few lines (docs/monitor.md)::

    @ls.metrics.register
    class WeightNorm(ls.metrics.Metric):
        name = "weight_norm"
        FIELDS = ("value",)
        default_data = "batch"  # reads no data: no probe needed

        def compute(self, ctx):
            return {"value": ls.params.norm(ctx.parameters).item()}

The registry refuses to replace an existing name silently (pass ``replace=True``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import nn

from landscape._deprecation import warn_renamed
from landscape._names import RENAMED_METRICS
from landscape.schedules import Schedule, every, parse
from landscape.store.format import component_names, plain_name

if TYPE_CHECKING:  # pragma: no cover
    from landscape.metrics.context import StepContext

__all__ = [
    "DATA_SOURCES",
    "Metric",
    "available",
    "canonical_name",
    "component_names",
    "create",
    "register",
    "snake_case",
]

DATA_SOURCES = ("probe", "batch")


def snake_case(class_name: str) -> str:
    """The snake_case of a class name (``"TopEigenvalues"`` -> ``"top_eigenvalues"``).

    Args:
        class_name: a class name.

    Returns:
        The lower-case name with ``_`` before each inner capital.
    """
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", class_name).lower()


def canonical_name(name: str, *, stacklevel: int = 3) -> str:
    """The current name of metric ``name``, warning once per use if ``name`` was renamed.

    Args:
        name: a metric name, current or old (``"hessian"``, ``"taylor"``).
        stacklevel: passed on to the ``DeprecationWarning`` (default: the caller's caller).

    Returns:
        ``name`` itself, or the new name of an old one (``docs/vocabulary.md``).
    """
    new = RENAMED_METRICS.get(name)
    if new is None:
        return name
    warn_renamed(name, new, what="metric name", stacklevel=stacklevel + 1)
    return new


_DERIVED_NAMES: set[str] = set()
"""The names :class:`Metric` made from a class name (``Metric.__init_subclass__``)."""


class Metric:
    """Base class of every metric: computes named fields at scheduled steps.

    One row per due step is written to ``/metrics/<name>`` of the run file. Class
    attributes a subclass sets: ``name`` (the registry name; unset, the snake_case of the
    class name),
    ``FIELDS`` (names of scalar fields; override :meth:`fields` for vector fields or
    shapes that depend on the model), ``CONTEXT_FIELDS`` (those of ``FIELDS`` that record
    the conditions of a row, such as the batch's size, rather than a measurement: stored
    like the others, left out of the default plots), ``default_schedule``,
    ``default_data``, and ``needs_update = True`` when it uses the optimizer's actual step
    Δθ. Settings recorded
    in the run file come from :meth:`config`. See docs/monitor.md.

    Args:
        schedule: when the metric runs (``every(10)``, ``"every(10)"``, an int ``n`` for
            ``every(n)``); ``None`` for the class's ``default_schedule``.
        data: ``"probe"`` (the monitor's fixed batch) or ``"batch"`` (the current training
            batch); ``None`` for the class's ``default_data``.

    Raises:
        ValueError: ``data`` is not one of :data:`DATA_SOURCES`.

    Example:
        >>> import landscape as ls
        >>> class WeightNorm(ls.metrics.Metric):
        ...     name = "weight_norm"
        ...     FIELDS = ("value",)
        ...     default_data = "batch"  # reads no data: a monitor keeps no probe for it
        ...
        ...     def compute(self, ctx):
        ...         return {"value": ls.params.norm(ctx.parameters).item()}
        >>> WeightNorm(schedule=ls.every(5))
        WeightNorm(schedule=every(5), data='batch')
    """

    name: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[str, ...]] = ()
    CONTEXT_FIELDS: ClassVar[tuple[str, ...]] = ()
    default_schedule: ClassVar[Schedule] = every(1)
    default_data: ClassVar[str] = "probe"
    needs_update: ClassVar[bool] = False
    #: while the monitor's sentinels have moved (``Monitor(adaptive=True)``), the metric is
    #: also due every ``dense_every`` steps (None: only on its schedule)
    dense_every: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # no name set, or only one made from a base class's name: the snake_case of its own
        # (a subclass of a class that sets its name, as a built-in one, keeps that name)
        if "name" not in vars(cls) and (not cls.name or cls.name in _DERIVED_NAMES):
            cls.name = snake_case(cls.__name__.lstrip("_"))
            _DERIVED_NAMES.add(cls.name)

    def __init__(self, schedule: Schedule | str | int | None = None, data: str | None = None):
        self.schedule: Schedule = (
            self.default_schedule if schedule is None else parse(schedule)
        )
        self.data = self.default_data if data is None else data
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")

    # -- declared before step 0

    def setup(self, model: nn.Module) -> None:
        """Resolve anything that depends on the model (layer names, shapes). Called once.

        Args:
            model: the monitored model.
        """

    def fields(self) -> dict[str, tuple[int, ...]]:
        """The fields of one row and their shapes (``()`` for a scalar).

        Returns:
            ``{field name: shape}``; by default every name in ``FIELDS`` as a scalar.

        Raises:
            TypeError: ``FIELDS`` is a string (``("value",)`` missing its comma).
        """
        _check_fields_declaration(type(self))
        return {k: () for k in self.FIELDS}

    def config(self) -> dict[str, Any]:
        """The metric's settings, recorded with it in the run file.

        Returns:
            A JSON-able dict (empty by default). A subclass written against the old API
            that overrides ``params()`` instead still works, with a ``DeprecationWarning``.
        """
        if type(self).params is not Metric.params:
            warn_renamed(f"{type(self).__name__}.params()", "config()", what="method")
            return dict(self.params())
        return {}

    def params(self) -> dict[str, Any]:
        """Deprecated alias of :meth:`config`.

        Returns:
            :meth:`config`.
        """
        warn_renamed("Metric.params()", "Metric.config()", what="method")
        return self.config()

    def captures(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Module names whose (inputs, outputs) this metric reads from the shared capture.

        Returns:
            ``(input module names, output module names)``; both empty by default.
        """
        return (), ()

    # -- per due step

    def compute(self, ctx: StepContext) -> Mapping[str, Any]:  # pragma: no cover - abstract
        """One row at a due step.

        Args:
            ctx: the step's shared context.

        Returns:
            ``{field name: value}`` for every field of :meth:`fields`.

        Raises:
            MissingInput: the step lacks something the metric needs (the monitor records
                a NaN row and one ``metric_failed`` finding).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define compute(ctx)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule}, data={self.data!r})"


def same_definition(a: type, b: type) -> bool:
    """Whether two classes are one definition.

    The same class, or the same module and qualified name: a notebook cell run again,
    ``importlib.reload``.
    """
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _check_fields_declaration(cls: type) -> None:
    """Refuse ``FIELDS = "value"``: a string, where ``("value",)`` was meant (TypeError)."""
    if isinstance(cls.FIELDS, str):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}.FIELDS must be a tuple of field names, got the "
                        f"string {cls.FIELDS!r} (write ({cls.FIELDS!r},))")  # type: ignore


_REGISTRY: dict[str, type[Metric]] = {}
M = TypeVar("M", bound=type[Metric])


def register(cls: M | None = None, *, replace: bool = False) -> Any:
    """Class decorator adding a metric to the registry under ``cls.name``.

    Args:
        cls: the :class:`Metric` subclass (omitted when called as ``register(replace=True)``).
        replace: allow replacing another class registered under the same name.

    Returns:
        ``cls`` itself, or the decorator when ``cls`` is omitted.

    Raises:
        TypeError: ``cls`` is not a :class:`Metric` subclass.
        ValueError: ``cls.name`` is empty or holds ``/``; or another class has that name
            and ``replace`` is false: a plugin never silently shadows another one.
    """

    def add(c: M) -> M:
        if not (isinstance(c, type) and issubclass(c, Metric)):
            raise TypeError(f"register expects a Metric subclass, got {c!r}")
        if not plain_name(c.name):
            raise ValueError(f"{c.__name__}.name must be a non-empty name without '/', not "
                             "'.' or '..'")
        _check_fields_declaration(c)
        old = _REGISTRY.get(c.name)
        # the same class defined again (a notebook cell re-run, importlib.reload) replaces
        # its earlier definition; another class of that name is refused
        if old is not None and not replace and not same_definition(old, c):
            raise ValueError(
                f"a metric named {c.name!r} is already registered ({old.__module__}."
                f"{old.__qualname__}); pass replace=True to replace it"
            )
        _REGISTRY[c.name] = c
        return c

    return add if cls is None else add(cls)


def available() -> list[str]:
    """Names of every registered metric.

    Returns:
        The sorted metric names.
    """
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Metric:
    """Instantiate the registered metric ``name`` (for the command line and config files).

    In code, instantiate the class: ``ls.metrics.Sharpness(schedule=ls.every(15))``.

    Args:
        name: a metric name; an old name (``"hessian"``) warns and gives the renamed metric.
        **kwargs: passed to the metric's class.

    Returns:
        The metric.

    Raises:
        ValueError: no metric has that name.
    """
    name = canonical_name(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**kwargs)
