"""Shared plumbing for the pure metric functions: result types, validation, precision.

Conventions (docs/metrics.md, "Conventions shared by every function"):

* Small dense eigenproblems run in float64 with symmetric solvers. Inputs in
  float16/bfloat16/float32 are upcast; results live on the input's device.
* Failure policy: a degenerate input gives NaN plus a machine-readable ``reason``;
  with ``strict=True`` the function raises :class:`MetricError` (a ``ValueError``) instead.
* Malformed arguments (wrong shape, label out of range) always raise ``ValueError``
  naming the argument, whatever ``strict`` says.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from landscape._checks import integer_dtype
from landscape._errors import MetricError

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """Base of every result: named fields plus ``reason`` (None when the value is valid).

    ``as_dict()`` flattens to plain Python values for storage: 0-d tensors become floats,
    ``None`` fields (not computed) are left out, larger tensors are kept as tensors.
    """

    @property
    def ok(self) -> bool:
        return getattr(self, "reason", None) is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() == 0:
                v = float(v.item())
            out[f.name] = v
        return out


@dataclasses.dataclass(frozen=True)
class Scalar(MetricResult):
    """One number (a 0-d tensor on the input's device) plus a failure ``reason``.

    ``float(result)`` gives the value as a Python float.
    """

    value: torch.Tensor
    reason: str | None = None

    def __float__(self) -> float:
        return float(self.value.item())

    def item(self) -> float:
        return float(self.value.item())


def fail(reason: str, message: str, strict: bool) -> str:
    """Raise when strict, else return ``reason`` for the caller to attach to a NaN."""
    if strict:
        raise MetricError(reason, message)
    return reason


def scalar(value: float | torch.Tensor, device: torch.device, reason: str | None = None) -> Scalar:
    t = torch.as_tensor(value, dtype=torch.float64)
    return Scalar(t.to(device), reason)


def nan_scalar(device: torch.device, reason: str) -> Scalar:
    return Scalar(torch.tensor(NAN, dtype=torch.float64, device=device), reason)


def as_float_tensor(
    x: Any,
    name: str,
    ndim: int | None = None,
    min_ndim: int | None = None,
    non_empty: bool = False,
) -> torch.Tensor:
    """Validate a floating tensor argument (shape and dtype); returns it detached.

    The metrics are diagnostics: they never build an autograd graph on their inputs, so
    features captured with ``requires_grad`` cost no extra memory and leak no graph.
    ``non_empty=True`` also rejects a tensor with a dimension of size 0.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if non_empty and x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x.detach()


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite (NaN/inf features come from a diverged run)."""
    return bool(torch.isfinite(x).all())


def f64(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float64 (no copy when already float64)."""
    return x.to(torch.float64)


def scale_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-D ``x`` scaled by powers of two to a largest |entry| in [0.5, 1).

    Returns a new tensor.

    Before an L2 normalisation: the squares of a row's entries overflow above ~1.8e19 in
    float32 (~1.3e154 in float64) and underflow below ~1e-19 (~1e-154), which made such
    rows infinite or zero. A power of two scales exactly, so a row that did not over- or
    underflow normalises to the very same bits. Zero rows stay zero; the factor is capped
    at the dtype's largest power of two, so a row of subnormals ends up with a largest
    entry of at least 2^-22 (float32), still far from underflow when squared.
    """
    if x.numel() == 0:
        return x.clone()  # always a new tensor: callers may divide it in place
    _, exp = torch.frexp(x.abs().amax(dim=1))
    k = (-exp).clamp(max=math.frexp(torch.finfo(x.dtype).max)[1] - 1)  # 2^k stays finite
    return torch.ldexp(x, k[:, None])


def _check_integer(x: Any, name: str) -> torch.Tensor:
    """``x`` must be a tensor of an integer dtype (not bool, float or complex)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not integer_dtype(x.dtype):
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def check_targets(
    targets: Any, n: int, num_classes: int, name: str = "targets"
) -> torch.Tensor:
    """Validate integer class-index targets; returns them flat, as int64.

    ``n`` entries (any shape), each in ``[0, num_classes)`` or negative (an
    ``ignore_index`` such as -100, which the caller handles).
    """
    y = _check_integer(targets, name)
    if y.numel() != n:
        raise ValueError(f"{name} must have {n} entries (one per sample), got shape "
                         f"{tuple(y.shape)}")
    y = y.reshape(-1).long()
    if n and int(y.max()) >= num_classes:
        raise ValueError(f"{name} must be in [0, {num_classes}) or negative (ignored), got "
                         f"maximum {int(y.max())}")
    return y


def check_labels(
    labels: Any, n: int, num_classes: int | None = None, name: str = "labels"
) -> torch.Tensor:
    """Validate integer class labels of length ``n`` (values in ``[0, num_classes)``)."""
    labels = _check_integer(labels, name)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if n > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise ValueError(f"{name} must be non-negative, got minimum {lo}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(
                f"{name} must be < {num_classes} (number of classes), got maximum {hi}"
            )
    return labels.long()


def safe_log_term(p: torch.Tensor) -> torch.Tensor:
    """Elementwise p*log(p) with 0*log(0) := 0."""
    return torch.where(
        p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)
    )
