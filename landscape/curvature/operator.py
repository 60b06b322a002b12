"""Matrix-free curvature operators: the loss Hessian and the generalised Gauss-Newton matrix.

Every operator is a symmetric linear map on parameter-space vectors (tuples of tensors in
parameter order; docs/curvature.md, "Operators") with ``matvec``, batched ``matmat`` and a
product counter, so the eigen, trace and density routines of
:mod:`landscape.curvature.spectrum` work on any of them. This module gathers them:

* :class:`CurvatureOperator`, the interface, and :class:`MatrixOperator`, an explicit
  matrix (:mod:`landscape.curvature.base`);
* :class:`ModelOperator` and its :class:`OperatorOptions`, the machinery shared by the
  model operators (:mod:`landscape.curvature._model_operator`);
* :class:`Hessian` (:mod:`landscape.curvature.hessian`) and :class:`GGN`
  (:mod:`landscape.curvature.ggn`), which write their products only.

All evaluation goes through :mod:`landscape.isolation`: parameters are substituted with
``functional_call`` (cloned buffers, so BatchNorm statistics stay put), RNG state, module
modes, ``requires_grad`` and ``.grad`` are restored after every product, attention runs on
the SDPA math backend while differentiating, and no graph outlives a call.
"""

from __future__ import annotations

from landscape.curvature._model_operator import (
    Closure,
    Forward,
    LossFn,
    ModelOperator,
    OperatorOptions,
)
from landscape.curvature.base import CurvatureOperator, MatrixOperator
from landscape.curvature.ggn import GGN
from landscape.curvature.hessian import Hessian

__all__ = [
    "GGN",
    "Closure",
    "CurvatureOperator",
    "Forward",
    "Hessian",
    "LossFn",
    "MatrixOperator",
    "ModelOperator",
    "OperatorOptions",
]
