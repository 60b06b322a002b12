"""Which piecewise-linear ops a forward pass runs: where first-order products break down.

A first-order Hessian-vector product differences two gradients at ``θ ± εv``
(:mod:`landscape.curvature._first_order`). Across a kink of the gradient (ReLU and its
relatives, max-pooling: their derivative jumps) the difference picks up a jump of order
``Δg / ε`` wherever a pre-activation lies within ``ε|v|`` of the kink. In float64 the step
is tiny and such crossings are rare; in float32 it is about ``1e-3`` of each entry and a
batch of ReLU activations holds many: on a ReLU MLP of 1,476 parameters (batch 256) the
top three eigenvalues came out 30 %, 11 % and 9 % off, on a ReLU transformer layer single
products 34-66 % off along the top eigenvectors (docs/curvature.md, "Limitation: kinks").
:class:`KinkedOps` lists those ops in one forward, so the operator can say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.overrides import TorchFunctionMode

__all__ = ["KINKED", "KinkedOps"]

# torch functions (torch.*, torch.nn.functional.*, Tensor methods) whose gradient jumps
KINKED = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "rrelu", "rrelu_", "prelu",
    "hardtanh", "hardtanh_", "threshold", "threshold_", "hardswish", "hardsigmoid",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "fractional_max_pool2d", "fractional_max_pool3d",
})


class KinkedOps(TorchFunctionMode):
    """Record the names of the kinked ops (:data:`KINKED`) run inside the block.

    Use::

        with torch.no_grad(), KinkedOps() as kinks:
            model(x)
        kinks.names  # e.g. {"relu", "max_pool2d"}

    A fused kernel that hides its activation from ``__torch_function__`` is not seen;
    ``nn.TransformerEncoderLayer`` leaves its fast path while a mode is active.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        """Run ``func``; note its name when it is a kinked op."""
        name = getattr(func, "__name__", "")
        if name in KINKED:
            self.names.add(name)
        return func(*args, **(kwargs or {}))
