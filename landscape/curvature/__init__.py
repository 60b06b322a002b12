"""Curvature engine: matrix-free Hessian / GGN operators and their spectra.

```python
from landscape.curvature import Hessian, top_eigenvalues, hessian_trace, spectral_density
H = Hessian(model, loss_fn, (x, y))
eig = top_eigenvalues(H, k=5)             # algebraically largest, Lanczos
tr = hessian_trace(H, "krylov", 60)       # with a standard error
rho = spectral_density(H, lanczos_steps=80)  # SLQ
```
See docs/curvature.md for the conventions (stopping rule, warm start, error bars).
"""

from landscape.curvature._model_operator import LossWithoutGraphError
from landscape.curvature._shifted import NoGradientError
from landscape.curvature.groups import top_eigenvalues_by_group
from landscape.curvature.operator import GGN, CurvatureOperator, Hessian, MatrixOperator
from landscape.curvature.precondition import PreconditionedOperator, preconditioned
from landscape.curvature.spectrum import (
    DensityResult,
    EigenResult,
    TraceResult,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)
from landscape.curvature.stability import stability_threshold

__all__ = [
    # operators
    "GGN",
    "CurvatureOperator",
    "Hessian",
    "MatrixOperator",
    "PreconditionedOperator",
    "preconditioned",
    # spectra
    "DensityResult",
    "EigenResult",
    "TraceResult",
    "hessian_trace",
    "spectral_density",
    "top_eigenvalues",
    "top_eigenvalues_by_group",
    # edge of stability
    "stability_threshold",
    # errors
    "LossWithoutGraphError",
    "NoGradientError",
]
