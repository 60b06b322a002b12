"""FSDP2 workers for tests/distributed/test_fsdp_monitor_surface.py (run inside the ranks).

The model is :func:`tests.distributed._workers.fsdp_model` (every Linear and the root
``fully_shard``-ed over 2 gloo ranks); each worker saves what it measured to
``<out_dir>/rank<r>.pt`` and rank 0 writes the run files.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from landscape import distributed as ld
from landscape.metrics.curvature import Sharpness, TopEigenvalues
from landscape.metrics.representation import Collapse, SpectralAlignment
from landscape.metrics.training import TaylorRadius
from landscape.monitor import Monitor
from tests.distributed import _workers as W

N = 64  # two halves of 32: the default probe (32 samples of the first batch) of rank 0
STEPS = 4  # equals the single-process default probe, the first 32 samples of the batch


def curvature_metrics() -> list[Any]:
    """Curvature and the Taylor radius (first order on FSDP), whole-weight metrics."""
    return [Sharpness(tol=1e-6, schedule=1), TopEigenvalues(k=2, tol=1e-6, schedule=2),
            TaylorRadius(schedule=1, data="probe"),  # the probe: the same on every rank
            SpectralAlignment(schedule=1), Collapse(schedule=1)]


def train(net: torch.nn.Module, shard: slice, path: str | None, *, adam: bool = False,
          evaluate_first: bool = False, **monitor: Any) -> dict[str, Any]:
    """SGD (or Adam) on samples ``shard`` of ``dataset(N)``, monitored with ``monitor``.

    Under FSDP each rank trains on its half and the reduce-scatter averages the gradients:
    the full-batch gradient (the halves have equal sizes). Adam's moments are sharded as
    its parameters are (DTensors). ``evaluate_first``: a no-grad forward before the
    monitor starts (an evaluation), which leaves FSDP2's root unsharded."""
    x, y = W.dataset(N)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2) if adam else torch.optim.SGD(
        net.parameters(), lr=0.5)
    if evaluate_first:
        with torch.no_grad():
            net(x[shard])
    with Monitor(net, F.cross_entropy, path, optimizer=opt, warn=False, mode="w",
                 **monitor) as mon:
        for step in range(STEPS):
            loss = F.cross_entropy(net(x[shard]), y[shard])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x[shard], y[shard]), loss=loss)
        failed = [f.describe() for f in mon.findings if f.rule == "metric_failed"]
        writes = mon.path
    params = [ld.full_tensor(p.detach()).clone() for p in net.parameters()]
    return {"failed": failed, "writes": writes, "params": params}


def monitor_worker(rank: int, out_dir: str) -> None:
    half = slice(rank * N // 2, (rank + 1) * N // 2)
    default = train(W.fsdp_model(), half, os.path.join(out_dir, "default.h5"))
    curvature = train(W.fsdp_model(), half, os.path.join(out_dir, "curvature.h5"),
                      metrics=curvature_metrics(), probe=W.probe())
    adam = train(W.fsdp_model(), half, os.path.join(out_dir, "adam.h5"), adam=True,
                 metrics=adam_metrics(), probe=W.probe())
    W._save(out_dir, rank, {"default": default, "curvature": curvature, "adam": adam})


def adam_metrics() -> list[Any]:
    """The preconditioned sharpness: Adam's second moments are sharded like the weights."""
    return [Sharpness(tol=1e-6, schedule=1, adam_warmup=1)]


def root_only_worker(rank: int, out_dir: str) -> None:
    """Only the root ``fully_shard``-ed: it holds every parameter, and FSDP2 keeps the
    root's gathered copy after a forward unless told to reshard."""
    from torch.distributed.fsdp import fully_shard

    half = slice(rank * N // 2, (rank + 1) * N // 2)
    result = train(fully_shard(W.model()), half, os.path.join(out_dir, "root.h5"),
                   metrics=["loss", "sentinels", *WHOLE_WEIGHT_METRICS], probe=W.probe())
    W._save(out_dir, rank, result)


def local_monitor_worker(rank: int, out_dir: str) -> None:
    """A monitor with distributed=False on an FSDP2 model: every norm of a sharded
    parameter is an all-reduce, so it hung on the rank that ran it alone (distributed
    review); it is refused on every rank, before any collective."""
    from torch.distributed.fsdp import fully_shard

    net = fully_shard(W.model())
    said = None
    try:
        Monitor(net, F.cross_entropy, metrics=["loss", "grad_norm"], distributed=False,
                warn=False).start()
    except ValueError as err:
        said = str(err)
    W._save(out_dir, rank, {"said": said, "after": ld.all_gather_objects("went on")})


WHOLE_WEIGHT_METRICS = ("spectral_alignment", "representation", "collapse")


def evaluated_worker(rank: int, out_dir: str) -> None:
    """An evaluation forward before the monitor starts: it saw the root's gathered copies,
    not the optimizer's sharded parameters (a 'does not hold' warning; with the sentinels
    and the update besides, a segmentation fault)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    half = slice(rank * N // 2, (rank + 1) * N // 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = train(fully_shard(W.model()), half, os.path.join(out_dir, "evaluated.h5"),
                       adam=True, evaluate_first=True, metrics=evaluated_metrics(),
                       probe=W.probe())
    result["warnings"] = [str(w.message) for w in seen if "landscape" in str(w.message)]
    W._save(out_dir, rank, result)


def evaluated_metrics() -> list[Any]:
    return ["loss", "sentinels", "update", Sharpness(tol=1e-8, schedule=1, adam_warmup=1)]


# ----------------------------------------------------------------------------- surfaces

PLANE = {"steps": (5, 4), "span": (1.0, 0.5)}
LINE = {"steps": 7, "span": 1.0}


def surface_worker(rank: int, out_dir: str) -> None:
    from landscape.surface import line, plane

    net = W.fsdp_model()
    before = [ld.full_tensor(p.detach()).clone() for p in net.parameters()]
    # uneven shards: rank 0 two batches (4 + 6 samples), rank 1 one batch (6)
    p = plane(net, F.cross_entropy, W.curvature_shard(rank), **PLANE,
              writer=os.path.join(out_dir, "plane.h5"), progress=False)
    # the same data on both ranks
    li = line(net, F.cross_entropy, W.dataset(), **LINE, seed=3, progress=False)
    try:
        line(net, F.cross_entropy, W.dataset(), **LINE, progress=False, distributed=False)
        refused = None
    except ValueError as err:
        refused = str(err)
    after = [ld.full_tensor(p.detach()) for p in net.parameters()]
    first = next(net.parameters())
    whole = ld.full_tensor(first.detach())
    helpers = {
        "full": whole,
        "shard_of": torch.equal(ld.shard_of(whole, first), first.detach().to_local()),
        "sum": ld.sharded_sum([first.detach().to_local().double().pow(2).sum()], True),
    }
    W._save(out_dir, rank, {
        "plane": p.values, "plane_dirs": p.arrays["directions"], "line": li.values,
        "restored": all(torch.equal(a, b) for a, b in zip(before, after)),
        "refused": refused, "helpers": helpers,
    })


def functional_worker(rank: int, out_dir: str) -> None:
    """The functional taylor_radius and neural_collapse given sharded weights: a raw
    "got mixed torch.Tensor and DTensor" error from deep inside (distributed review)."""
    from landscape.functional import neural_collapse, taylor_radius

    net = W.fsdp_model()
    x, y = W.probe()
    said = []
    direction = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    try:
        taylor_radius(net, x, direction, targets=y)
    except NotImplementedError as err:
        said.append(str(err))
    head = net[-1]
    features = torch.randn(12, head.weight.shape[1], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0))
    try:
        neural_collapse(features, y, classifier=head)
    except ValueError as err:
        said.append(str(err))
    whole = neural_collapse(features, y, classifier=ld.full_tensor(head.weight),
                            bias=ld.full_tensor(head.bias))
    unsharded = W.model()[-1]
    single = neural_collapse(features, y, classifier=unsharded)
    W._save(out_dir, rank, {"said": said, "nc3": (float(whole.nc3), float(single.nc3))})
