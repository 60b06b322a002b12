"""The :class:`~landscape.Monitor` options the framework adapters pass through.

This module has no ``from __future__ import annotations``: ``NotRequired`` must be seen
when the class is made, or every key counts as required (``__required_keys__``), and
jsonargparse (``LightningCLI``) would ask for all of them.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from typing_extensions import NotRequired, TypedDict

__all__ = ["MONITOR_OPTIONS", "MonitorOptions"]


class MonitorOptions(TypedDict):
    """The :class:`~landscape.Monitor` keyword arguments an adapter passes through unchanged.

    The callbacks take them as ``**monitor_options: Unpack[MonitorOptions]``: an option
    left out keeps the monitor's default, and the types tell type checkers and Lightning's
    ``LightningCLI`` (jsonargparse) which options a callback accepts, so a YAML config can
    set them (docs/integrations.md, "LightningCLI"). Each key and type is the monitor's
    own (``tests/integrations/test_lightning_cli.py`` compares them).
    """

    alarms: NotRequired[bool | Sequence[Any]]
    strict: NotRequired[bool]
    warn: NotRequired[bool]
    taylor_guard: NotRequired[float | None]
    mode: NotRequired[str]
    truncate_from: NotRequired[int | None]
    flush_every: NotRequired[int]
    on_disk_full: NotRequired[str]
    distributed: NotRequired[bool | None]
    microbatch_size: NotRequired[int | None]
    batch_size: NotRequired[Callable[[Any], int | None] | None]
    probe_size: NotRequired[int | None]
    adaptive: NotRequired[bool]
    output_fn: NotRequired[Callable[[Any], torch.Tensor] | None]


MONITOR_OPTIONS = frozenset(MonitorOptions.__annotations__)
"""The names of :class:`MonitorOptions`."""
