"""The training-loop integration: :class:`Monitor` (docs/monitor.md).

One concept per module:

- :mod:`~landscape.monitor.core`: the :class:`Monitor` itself: lifecycle, the step, the
  recording of rows, failures and findings;
- :mod:`~landscape.monitor.clock`: which optimizer steps came between two calls, and the
  step the next call will have (for the update Δθ);
- :mod:`~landscape.monitor.adaptive`: the dense window of the adaptive schedules;
- :mod:`~landscape.monitor.probe`: the default probe taken from the first batch, stored for
  a resume;
- :mod:`~landscape.monitor.arguments`: one-line errors for bad arguments, and what the run
  file's config stores of the optimizer and the metrics.
"""

from landscape.metrics.presets import MetricsLike, resolve_metrics
from landscape.monitor.arguments import unwrap_optimizer
from landscape.monitor.core import Monitor, close_monitors

__all__ = ["MetricsLike", "Monitor", "close_monitors", "resolve_metrics", "unwrap_optimizer"]
