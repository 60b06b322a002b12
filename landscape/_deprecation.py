"""Renamed keywords, attributes and classes: one release of ``DeprecationWarning`` aliases.

Every old name keeps working for one release and warns with a message that names the new one
(docs/vocabulary.md lists them). Three helpers cover the three kinds of rename:

* :func:`renamed_kwargs` -- a keyword argument of a function or method;
* :func:`deprecated_alias` -- warn once at the point an old attribute is read;
* :func:`module_getattr` -- a module-level ``__getattr__`` for renamed classes/functions.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["deprecated_alias", "module_getattr", "renamed_kwargs", "warn_renamed"]

F = TypeVar("F", bound=Callable[..., Any])


def warn_renamed(old: str, new: str, *, what: str = "keyword", stacklevel: int = 3) -> None:
    """Warn that ``old`` was renamed ``new``.

    Args:
        old: the old name.
        new: the name to use instead.
        what: what was renamed ("keyword", "attribute", "class", ...), for the message.
        stacklevel: passed to :func:`warnings.warn`; the default points at the caller of the
            function that calls this one.
    """
    warnings.warn(
        f"{what} {old!r} is deprecated, use {new!r} instead (removed in the next release)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """Decorator: accept old keyword names with a ``DeprecationWarning`` naming the new ones.

    Args:
        **renames: ``old="new"`` pairs.

    Returns:
        A decorator; the decorated function receives the new names only. Passing both the
        old and the new name raises ``TypeError``.

    Example:
        >>> @renamed_kwargs(n_iter="lanczos_steps")
        ... def density(lanczos_steps=80):
        ...     return lanczos_steps
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     density(n_iter=5)
        5
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__name__}() got both {old!r} (deprecated) and {new!r}"
                        )
                    warn_renamed(old, new, stacklevel=3)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def deprecated_alias(old: str, new: str) -> property:
    """A read-only property ``old`` that warns and returns the attribute ``new``.

    Args:
        old: the deprecated attribute name.
        new: the attribute it now reads.

    Returns:
        A property to assign in a class body (``params = deprecated_alias("params",
        "parameters")``).
    """

    def getter(self: Any) -> Any:
        warn_renamed(old, new, what="attribute")
        return getattr(self, new)

    return property(getter, doc=f"Deprecated alias of ``{new}``.")


def module_getattr(module: str, renames: Mapping[str, str], namespace: Mapping[str, Any]) -> Any:
    """A module ``__getattr__`` that resolves renamed names with a ``DeprecationWarning``.

    Args:
        module: the module's ``__name__``, for the error message.
        renames: ``{old: new}`` with every ``new`` defined in ``namespace``.
        namespace: the module's ``globals()``.

    Returns:
        The function to bind as the module's ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        if name in renames:
            warn_renamed(name, renames[name], what="name", stacklevel=3)
            return namespace[renames[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
