"""Directions in parameter space for loss-landscape plots (Li et al. 2018, arXiv:1712.09913).

A :class:`Directions` object holds one or two parameter-space vectors (docs/conventions.md) keyed by
parameter name, plus the metadata that produced them (kind, seed, normalization, ignore
policy). Sources:

* :func:`random_directions` -- Gaussian directions with filter (default), layer or weight
  normalization (Li et al. 2018, Sec. 4; docs/surfaces.md).
* :func:`landscape.surface.pca.pca_directions` -- principal components of a trajectory.
* :func:`eigen_directions` -- top Hessian eigenvectors from :mod:`landscape.curvature`.
* :func:`as_directions` -- user-supplied vectors (interpolation uses ``theta_b - theta_a``).

Directions are stored with every surface (``arrays/directions`` plus their names and shapes
in the surface attributes) and rebuilt with :meth:`Directions.from_surface`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape import distributed as _dist
from landscape._errors import LandscapeError
from landscape.params import ParamSpec, Vector, flatten, gaussian_like, select_named_parameters

NORMALIZATIONS = ("filter", "layer", "weight", "none")
IGNORES = ("biasbn", "none")
_EPS = 1e-10  # as in Li et al.'s reference code (net_plotter.normalize_direction)


def _sums_and_squares(vectors: Sequence[Vector]) -> list[float]:
    """``[sum, squared norm]`` of each vector, flattened, in float64."""
    out: list[float] = []
    for v in vectors:
        f = flatten(v).detach().to(torch.float64)
        out += [float(f.sum()), float(f.dot(f))]
    return out


@dataclass
class Directions:
    """One or two directions ``delta`` (and ``eta``) over the named parameters ``names``.

    ``vectors[k][m]`` is the component of direction ``k`` for parameter ``names[m]``; the
    tensors have the parameters' shapes, dtype and device. ``attrs`` is JSON-able metadata
    stored with the surface (kind, seed, normalization, ignore, ...).

    ``buffer_names``/``buffer_vectors`` optionally move floating-point buffers too (the
    reference code's ``dir_type='states'``, used when interpolating between checkpoints so
    that BatchNorm statistics follow the weights); ``buffer_vectors[k][m]`` belongs to
    ``buffer_names[m]``.
    """

    names: tuple[str, ...]
    vectors: tuple[Vector, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    buffer_names: tuple[str, ...] = ()
    buffer_vectors: tuple[Vector, ...] = ()

    def __post_init__(self) -> None:
        if len(self.vectors) not in (1, 2):
            raise ValueError(f"directions: expected 1 or 2 vectors, got {len(self.vectors)}")
        for v in self.vectors:
            if len(v) != len(self.names):
                raise ValueError(
                    f"directions: a vector has {len(v)} tensors for {len(self.names)} names"
                )
        if self.buffer_vectors and len(self.buffer_vectors) != len(self.vectors):
            raise ValueError("directions: buffer_vectors needs one entry per direction")

    @property
    def kind(self) -> str:
        """How the directions were made (``"random"``, ``"pca"``, ``"eigen"``, ...)."""
        return str(self.attrs.get("kind", "custom"))

    @property
    def ndim(self) -> int:
        """Number of directions: 1 for a line, 2 for a plane."""
        return len(self.vectors)

    def as_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Direction ``k`` as ``{parameter name: tensor}``."""
        return dict(zip(self.names, self.vectors[k]))

    def flat(self, k: int) -> np.ndarray:
        """Direction ``k`` flattened in parameter order, as numpy (float32 or float64)."""
        f = flatten(self.vectors[k]).detach()
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        return f.to("cpu", dtype).numpy()

    def fingerprint(self) -> list[float]:
        """Sum and squared norm of each direction (float64), compared on resume."""
        return _sums_and_squares(self.vectors)

    def buffer_fingerprint(self) -> list[float]:
        """Sum and squared norm of each buffer direction (empty without), compared on resume."""
        return _sums_and_squares(self.buffer_vectors)

    # -- storage

    def storage(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(attrs, arrays)`` to store with a surface; inverse of :meth:`from_surface`."""
        attrs = {
            "directions": dict(self.attrs),
            "direction_names": list(self.names),
            "direction_shapes": [list(t.shape) for t in self.vectors[0]],
            "direction_fingerprint": self.fingerprint(),
            "buffer_direction_fingerprint": self.buffer_fingerprint(),
        }
        arrays = {"directions": np.stack([self.flat(k) for k in range(self.ndim)])}
        if self.buffer_names:
            attrs["buffer_names"] = list(self.buffer_names)
            attrs["buffer_shapes"] = [list(t.shape) for t in self.buffer_vectors[0]]
            arrays["buffer_directions"] = np.stack(
                [flatten(v).detach().to("cpu", torch.float64).numpy() for v in self.buffer_vectors]
            )
        return attrs, arrays

    @classmethod
    def from_surface(cls, surface: Any, model: nn.Module | None = None) -> Directions:
        """Rebuild the directions stored with a surface (a ``SurfaceData``).

        With ``model`` the tensors take the dtype and device of its parameters.
        """
        attrs, arrays = surface.attrs, surface.arrays
        if "directions" not in arrays or "direction_names" not in attrs:
            raise LandscapeError(f"surface {surface.name!r} has no stored directions")
        names = tuple(attrs["direction_names"])
        shapes = [tuple(s) for s in attrs["direction_shapes"]]
        params = dict(model.named_parameters()) if model is not None else {}

        def split(flat: np.ndarray, names: Sequence[str], shapes: Sequence[tuple]) -> Vector:
            sizes = [math.prod(s) for s in shapes]
            parts = np.split(np.asarray(flat), np.cumsum(sizes)[:-1])
            out = []
            for n, p, s in zip(names, parts, shapes):
                t = torch.from_numpy(np.ascontiguousarray(p)).reshape(s)
                ref = params.get(n)
                out.append(t.to(ref.device, ref.dtype) if ref is not None else t)
            return tuple(out)

        vectors = tuple(split(row, names, shapes) for row in arrays["directions"])
        bnames: tuple[str, ...] = tuple(attrs.get("buffer_names", ()))
        bvectors: tuple[Vector, ...] = ()
        if bnames:
            bshapes = [tuple(s) for s in attrs["buffer_shapes"]]
            bvectors = tuple(split(row, bnames, bshapes) for row in arrays["buffer_directions"])
        return cls(names, vectors, dict(attrs.get("directions", {})), bnames, bvectors)


# --------------------------------------------------------------------------- normalization


def normalize_direction(
    direction: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    normalization: str = "filter",
    ignore: str = "biasbn",
) -> Vector:
    """Rescale a direction relative to the weights (Li et al. 2018, Sec. 4, Eq. (1)).

    * ``"filter"``: for every tensor with ``dim >= 2`` and every slice ``j`` along dim 0 (an
      output channel of a convolution, a row of a linear layer or embedding),
      ``d_j <- d_j * ||theta_j|| / (||d_j|| + 1e-10)``.
    * ``"layer"``: the whole tensor, ``d <- d * ||theta|| / (||d|| + 1e-10)``.
    * ``"weight"``: ``d <- d * theta`` elementwise.
    * ``"none"``: unchanged.

    Tensors with ``dim <= 1`` (biases, normalization gains and shifts): ``ignore="biasbn"``
    sets ``d <- 0``; ``ignore="none"`` sets ``d <- theta`` under any normalization other than
    ``"none"`` (the reference code's behaviour, docs/surfaces.md) and leaves ``d`` as drawn
    under ``"none"``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be one of {IGNORES}, got {ignore!r}")
    if len(direction) != len(weights):
        raise ValueError(f"direction has {len(direction)} tensors, weights {len(weights)}")
    out = []
    for d, w in zip(direction, weights):
        d = d.detach()
        w = _whole(w.detach(), d.dim() > 1 or ignore == "none", normalization)
        if d.shape != w.shape:
            raise ValueError(f"direction shape {tuple(d.shape)} != weight shape {tuple(w.shape)}")
        if d.dim() <= 1:
            if ignore == "biasbn":
                out.append(torch.zeros_like(d))
            else:
                out.append(d.clone() if normalization == "none" else w.clone())
            continue
        # the norms and their ratio in float32 at least: in float16 the guard 1e-10 is 0,
        # and a zero row of a direction gave 0 * inf = NaN
        wide = torch.promote_types(d.dtype, torch.float32)
        if normalization == "filter":
            d2 = d.reshape(d.shape[0], -1)
            factor = _row_norms(w.reshape(w.shape[0], -1), wide) / (_row_norms(d2, wide) + _EPS)
            out.append((d2 * factor).to(d.dtype).reshape(d.shape))
        elif normalization == "layer":
            factor = _row_norms(w.reshape(1, -1), wide) / (_row_norms(d.reshape(1, -1), wide)
                                                          + _EPS)
            out.append((d * factor.reshape(())).to(d.dtype))
        elif normalization == "weight":
            out.append(d * w)
        else:
            out.append(d.clone())
    return tuple(out)


def _row_norms(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Euclidean norm of each row of ``x`` ``(m, n)``, ``(m, 1)`` in ``dtype``.

    As ``norm(dim=1, dtype=dtype)``, except for a finite row whose sum of squares
    overflows (a float32 norm above 1.8e19: weights of 2e19 that a high learning rate
    left, which the surface refused as "directions are not finite"): that row is divided
    by its largest magnitude first. Other rows are bitwise what they were, so a surface
    begun before resumes (its directions' fingerprint is compared); no float64 copy (MPS
    has none, and a bfloat16 embedding of 128k x 4096 would take 4 GB more).
    """
    norms = x.norm(dim=1, keepdim=True, dtype=dtype)
    over = (torch.isinf(norms) & torch.isfinite(x).all(dim=1, keepdim=True)).squeeze(1)
    if bool(over.any()):  # (once per parameter of a direction: one host read)
        rows = x[over].to(dtype)
        top = rows.abs().amax(dim=1, keepdim=True)
        norms = norms.clone()
        norms[over] = (rows / top).norm(dim=1, keepdim=True) * top
    return norms


def _whole(w: torch.Tensor, needed: bool, normalization: str) -> torch.Tensor:
    """``w`` as a whole tensor: an FSDP2 shard (DTensor) is gathered when its values are needed.

    One parameter at a time (:func:`landscape.distributed.full_tensor`), so a sharded model is
    never gathered at once; the decision depends on shapes and options only, the same on
    every rank, so all ranks enter the same gathers.
    """
    if not _dist.is_sharded(w):
        return w
    if needed and normalization != "none":
        return _dist.full_tensor(w)
    return torch.zeros(w.shape, dtype=w.dtype, device=w.device)  # only the shape is read


def select(model: nn.Module, params: ParamSpec = None) -> dict[str, nn.Parameter]:
    """Return the trainable parameters picked by ``params`` (at least one).

    ``params`` holds names, globs or modules; see
    :func:`landscape.params.select_named_parameters`.
    """
    named = select_named_parameters(model, params)
    if not named:
        raise LandscapeError("model has no trainable parameters to perturb (every parameter "
                             "has requires_grad=False: model.requires_grad_(True) first)")
    return named


def random_directions(
    model: nn.Module,
    n: int = 2,
    *,
    seed: int = 0,
    normalization: str = "filter",
    ignore: str = "biasbn",
    params: ParamSpec = None,
) -> Directions:
    """``n`` (1 or 2) Gaussian directions, normalized per :func:`normalize_direction`.

    Li et al. 2018 (arXiv:1712.09913), Sec. 4: ``d ~ N(0, I)`` with the shapes of the
    parameters, then filter-normalized. Each parameter's entries are drawn on the CPU in
    float32 from a generator of its own, seeded by ``seed`` and the parameter's position
    in the model's ``named_parameters()`` (:data:`DRAW`), first ``delta`` then ``eta``. So a
    parameter's direction is the same on every device, in every dtype, whichever other
    parameters are frozen and whatever ``params`` selects, and costs nothing for the
    parameters left fixed. ``params`` restricts the directions to some trainable
    parameters; the others, and frozen ones, stay fixed.

    On an FSDP2 (``fully_shard``) model the directions are drawn at the parameters' global
    shapes, hence identical to the single-process draw, and each weight is gathered for its
    normalization one parameter at a time (every rank must call this; docs/distributed.md).
    """
    if n not in (1, 2):
        raise ValueError(f"n must be 1 or 2, got {n}")
    named = select(model, params)
    weights = tuple(p.detach() for p in named.values())
    # positions in the model itself (a DDP wrapper's names carry "module."); tied weights
    # once, under their first name
    position = {id(p): i for i, p in enumerate(_dist.unwrap(model).parameters())}
    generators = [_generator(int(seed), position[id(p)]) for p in named.values()]
    vectors = tuple(
        normalize_direction(tuple(gaussian_like((w,), g)[0] for w, g in zip(weights, generators)),
                            weights, normalization, ignore)
        for _ in range(n)
    )
    attrs = {"kind": "random", "seed": int(seed), "normalization": normalization,
             "ignore": ignore, "distribution": "gaussian", "draw": DRAW}
    return Directions(tuple(named), vectors, attrs)


DRAW = "per-parameter"
"""How :func:`random_directions` draws, stored with a surface's directions: one generator
per parameter, seeded by ``numpy.random.SeedSequence([seed mod 2**64, position])`` (a
negative seed as its 64-bit pattern). Surfaces begun before it (no ``draw`` attribute)
drew from one generator over the selected parameters in their own dtype, other numbers:
resuming one is refused, and the error says why."""


def _generator(seed: int, position: int) -> torch.Generator:
    """The generator of the parameter at ``position``: independent of every other's."""
    # (a negative seed, which torch.manual_seed takes, as its 64-bit pattern)
    state = np.random.SeedSequence([seed % 2**64, position]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def as_directions(
    model: nn.Module,
    vectors: Sequence[Mapping[str, torch.Tensor] | Sequence[torch.Tensor]] | Directions,
    *,
    normalization: str = "none",
    ignore: str = "none",
    kind: str = "custom",
) -> Directions:
    """User-given directions (dicts name -> tensor, or tuples in trainable-parameter order).

    A dict may name a subset of the trainable parameters; the others are not moved.
    ``normalization``/``ignore`` are applied as in :func:`normalize_direction` (default: as
    given).
    """
    if isinstance(vectors, Directions):
        return vectors
    vectors = list(vectors)
    if len(vectors) not in (1, 2):
        raise ValueError(f"directions: expected 1 or 2 vectors, got {len(vectors)}")
    named = select(model, None)
    if all(isinstance(v, Mapping) for v in vectors):
        names: list[str] = []
        for v in vectors:
            unknown = [k for k in v if k not in named]
            if unknown:
                raise ValueError(f"directions name unknown or frozen parameters: {unknown}")
            names += [k for k in v if k not in names]
        names = [k for k in named if k in names]
        raw = [tuple(v.get(k, torch.zeros(named[k].shape, dtype=named[k].dtype,
                                          device=named[k].device)) for k in names)
               for v in vectors]
    else:
        names = list(named)
        raw = [tuple(v) for v in vectors]
    weights = tuple(named[k].detach() for k in names)
    out = []
    for v in raw:
        if len(v) != len(weights):
            raise ValueError(f"directions: a vector has {len(v)} tensors, expected {len(weights)}")
        v = tuple(torch.as_tensor(t).to(w.device, w.dtype) for t, w in zip(v, weights))
        out.append(normalize_direction(v, weights, normalization, ignore))
    attrs = {"kind": kind, "normalization": normalization, "ignore": ignore}
    return Directions(tuple(names), tuple(out), attrs)


# --------------------------------------------------------------------------- Hessian


def eigen_directions(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    n: int = 2,
    *,
    params: ParamSpec = None,
    normalization: str = "none",
    ignore: str = "none",
    closure: bool | None = None,
    eval_mode: bool = True,
    distributed: bool | None = None,
    batch_size: Callable[[Any], int | None] | None = None,
    **kwargs: Any,
) -> Directions:
    """The top-``n`` (algebraically largest) Hessian eigenvectors as directions.

    Uses :class:`landscape.curvature.Hessian` and :func:`landscape.curvature.top_eigenvalues`
    (Lanczos) over ``data``; ``kwargs`` go to ``top_eigenvalues`` (``tol``, ``seed``, ...).
    ``closure=True`` (the default for a dict batch) means ``loss_fn(model, batch)``. By
    default the vectors are unit-norm in raw parameter units, so that along direction ``k``
    the loss is ``L(alpha) ~ L(0) + alpha^2 lambda_k / 2`` near a minimum (Li et al. 2018,
    Sec. 6 relate such curvature to the plots); ``normalization="filter"`` rescales them like
    random directions. The eigenvalues are stored in ``attrs["eigenvalues"]``.
    ``distributed``: the Hessian's (``False``: this rank's data alone, no all-reduce; the
    grid's setting when a surface asks for ``directions="eigen"``). ``batch_size``: each
    batch's weight (the Hessian's argument; the grid's when a surface asks for them).
    """
    if n not in (1, 2):
        raise ValueError(f"n must be 1 or 2, got {n}")
    from landscape.curvature import Hessian, top_eigenvalues

    named = select(model, params)
    if closure is None:  # dict batches, as the grid decides: one, or a list of them
        closure = isinstance(data, Mapping) or (
            isinstance(data, list) and bool(data) and isinstance(data[0], Mapping))
    selection = list(named) if params is not None else None
    given: dict[str, Any] = {} if distributed is None else {"distributed": distributed}
    if batch_size is not None:
        given["batch_size"] = batch_size
    if closure:
        H = Hessian(model, data=data, closure=loss_fn, params=selection, eval_mode=eval_mode,
                    **given)
    else:
        H = Hessian(model, loss_fn, data, params=selection, eval_mode=eval_mode, **given)
    eig = top_eigenvalues(H, k=n, **kwargs)
    found = list(eig.vectors)
    if len(found) < n:
        raise LandscapeError(f"top_eigenvalues returned {len(found)} vectors, expected {n}")
    weights = tuple(p.detach() for p in named.values())
    vecs = []
    for v in found[:n]:
        if isinstance(v, Mapping):
            v = tuple(v[k] for k in named)
        v = tuple(v)
        if len(v) == 1 and len(weights) > 1:  # a flat vector
            v = tuple(t.reshape(w.shape) for t, w in
                      zip(torch.split(v[0].reshape(-1), [w.numel() for w in weights]), weights))
        if len(v) != len(weights):
            raise LandscapeError(
                f"an eigenvector has {len(v)} tensors, the parameters {len(weights)}")
        v = tuple(t.detach().to(w.device, w.dtype) for t, w in zip(v, weights))
        vecs.append(normalize_direction(v, weights, normalization, ignore))
    values = [float(x) for x in torch.as_tensor(eig.values).reshape(-1)[:n]]
    attrs = {"kind": "eigen", "normalization": normalization, "ignore": ignore,
             "eigenvalues": values}
    return Directions(tuple(named), tuple(vecs), attrs)
