"""Code run inside the spawned ranks (importable by name, hence a module of its own).

Every worker writes what it measured to ``<out_dir>/rank<r>.pt``; the tests compare that
with single-process results on the union of the ranks' data computed in the test process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from landscape import distributed as ld
from landscape.alarms import Rule, Trigger, default_rules
from landscape.curvature import GGN, Hessian, hessian_trace, spectral_density, top_eigenvalues
from landscape.metrics.curvature import HessianSpectrum, HessianTrace, Sharpness
from landscape.metrics.sentinels import Sentinels
from landscape.metrics.training import GradNorm, Loss
from landscape.monitor import Monitor
from tests import models

# ----------------------------------------------------------------------------- data

N = 16


def dataset(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def model(seed: int = 0) -> torch.nn.Module:
    return models.mlp(6, 8, 3, seed=seed).double()


def curvature_shard(rank: int) -> Any:
    """Unequal shards: rank 0 holds samples 0-9 as two batches (4 + 6), rank 1 samples
    10-15 as one batch, so the rank weights (10 vs 6) and the per-batch weights both matter."""
    x, y = dataset()
    if rank == 0:
        return [(x[:4], y[:4]), (x[4:10], y[4:10])]
    return (x[10:], y[10:])


def _to_float32(data: Any) -> Any:
    if isinstance(data, list):
        return [_to_float32(b) for b in data]
    return (data[0].float(), data[1])


def _save(out_dir: str, rank: int, obj: dict[str, Any]) -> None:
    torch.save(obj, os.path.join(out_dir, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------- curvature


def curvature_worker(rank: int, out_dir: str) -> None:
    net = DDP(model())  # evaluated through .module: DDP's hooks never fire
    data = curvature_shard(rank)
    H = Hessian(net, F.cross_entropy, data)
    eig = top_eigenvalues(H, k=3, tol=1e-6)
    both = top_eigenvalues(H, k=1, which="both", tol=1e-6)
    trace = hessian_trace(H, "hutch++", n_matvec=30, seed=1)
    krylov = hessian_trace(H, "krylov", n_matvec=30, seed=1)
    density = spectral_density(H, lanczos_steps=12, n_probes=2, seed=2)
    G = GGN(net, F.cross_entropy, data)
    ggn = top_eigenvalues(G, k=2, tol=1e-6)
    H32 = Hessian(model().float(), F.cross_entropy, _to_float32(data))  # float32 end to end
    eig32 = top_eigenvalues(H32, k=2, tol=1e-4)
    trace32 = hessian_trace(H32, "hutch++", n_matvec=12, seed=1)
    block = H.subset(["0.weight"])  # inherits the distributed decision
    block_eig = top_eigenvalues(block, k=1, tol=1e-6)
    # probes drawn from a seeded torch.Generator are the same bits on every rank
    probe = torch.randn(50, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rank_dependent = torch.full((3,), float(rank))
    with ld.local():  # opt-out: this rank's shard only
        local_H = Hessian(net, F.cross_entropy, data)
    local_eig = top_eigenvalues(local_H, k=1, tol=1e-6)
    explicit_off = top_eigenvalues(Hessian(net, F.cross_entropy, data, distributed=False), k=1,
                                   tol=1e-6)
    _save(out_dir, rank, {
        "eig": eig.values, "eig_n_matvec": eig.n_matvec, "smallest": both.smallest.values,
        "trace": trace.value, "trace_stderr": trace.stderr, "krylov": krylov.value,
        "density_nodes": density.nodes, "density_weights": density.weights,
        "loss": H.loss(), "grad": H.gradient(), "dense": H.to_dense(),
        "ggn": ggn.values, "block": block_eig.values, "eig32": eig32.values,
        "trace32": trace32.value,
        "probe_same": ld.same_on_all_ranks(probe),
        "rank_dependent_same": ld.same_on_all_ranks(rank_dependent),
        "local_eig": local_eig.values, "explicit_off": explicit_off.values,
        "world_size": ld.world_size(), "rank": ld.rank(), "helpers": helper_checks(rank),
    })


def uneven_peaks_worker(rank: int, out_dir: str) -> None:
    """``hessian_trace`` sized from memory readings that differ by rank (one reads 1000x).

    The default probe batch comes from the first product's measured peak; ranks must
    agree on it, or their all-reduces mismatch (a gloo abort).
    """
    from landscape.curvature import trace as trace_module

    class Reading(trace_module.PeakMemory):
        def __exit__(self, *exc: object) -> None:
            super().__exit__(*exc)
            self.peak = (1000 if rank == 1 else 1) * 2**20

    trace_module.PeakMemory = Reading
    H = Hessian(DDP(model()), F.cross_entropy, curvature_shard(rank))
    res = hessian_trace(H, "hutchinson", n_matvec=12, seed=3)
    _save(out_dir, rank, {"value": res.value, "probe_batch": res.probe_batch})


STEEP = 150.0
"""The cosine's frequency of the sharp model whose first-order GGN step is refined."""


class SharpModel(torch.nn.Module):
    """A wide linear map and three parameters behind a steep cosine (a sharp direction)."""

    def __init__(self, k: float = 40.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(3, 6, generator=g))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(3, generator=g))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T * 0.05 + torch.cos(self.k * self.bias).sum()


def sharp_directions() -> torch.Tensor:
    """Two unit vectors of the sharp model: along its cosine's parameters, and random."""
    top = torch.zeros(21)
    top[-3:] = 3**-0.5
    rand = torch.randn(21, generator=torch.Generator().manual_seed(5))
    return torch.stack([top, rand / rand.norm()])


def first_order_batch_worker(rank: int, out_dir: str) -> None:
    """A batch of first-order products (``matmat``: the reduction deferred) on 2 ranks."""
    x, y = dataset()
    x, y = x.float(), F.one_hot(y, 3).float()
    shard = (x[:10], y[:10]) if rank == 0 else (x[10:], y[10:])
    H = Hessian(DDP(SharpModel()), F.mse_loss, shard, backend="first_order")
    products = H.flat_matmat(sharp_directions())
    engine = H._first_order
    G = GGN(DDP(SharpModel(STEEP)), F.mse_loss, shard, backend="first_order")
    ggn = G.flat_matmat(sharp_directions())
    # one product at a time, on unequal shards (7 and 13 samples): the check's scalars
    # are weighted by the ranks' sizes like the product
    uneven = (x[:7], y[:7]) if rank == 0 else (x[7:], y[7:])
    U = GGN(DDP(SharpModel(STEEP)), F.mse_loss, uneven, backend="first_order")
    single = torch.stack([U.flat_matvec(v) for v in sharp_directions()])
    _save(out_dir, rank, {"products": products, "ratio": engine._ratio(),
                          "refined": engine.refined, "loss0": engine._loss0[1],
                          "ggn": ggn, "ggn_ratio": G._first_order._ratio(),
                          "ggn_refined": G._first_order.refined, "uneven": single,
                          "uneven_refined": U._first_order.refined})


def first_order_uneven_worker(rank: int, out_dir: str) -> None:
    """First-order products of a float32 model when the ranks hold different numbers of
    batches (:func:`curvature_shard`: 2 and 1): every all-reduce must match in size."""
    data = _to_float32(curvature_shard(rank))
    net = model().float()
    out = {}
    for name, cls in (("hessian", Hessian), ("ggn", GGN)):
        op = cls(net, F.cross_entropy, data, backend="first_order")
        out[name] = op.flat_matvec(fsdp_vectors(op.dim)[0].float())
    loss_grad = Hessian(net, F.cross_entropy, data, backend="first_order").gradient()
    out["gradient"] = torch.cat([g.reshape(-1) for g in loss_grad])
    _save(out_dir, rank, out)


def helper_checks(rank: int) -> dict[str, Any]:
    """The collective helpers on 2 ranks (expected values are checked by the test)."""
    x = torch.tensor([1.0, 2.0]) * (rank + 1)  # rank 0: [1, 2], rank 1: [2, 4]
    weighted = ld.all_reduce_weighted([x, torch.tensor(float(rank))], weight=3.0 - 2 * rank)
    # a float64 scalar beside a float32 tensor: one all-reduce per dtype, none widened
    sent: list[torch.dtype] = []
    real = ld._all_reduce_sum

    def recorded(flat: torch.Tensor) -> torch.Tensor:
        sent.append(flat.dtype)
        return real(flat)

    ld._all_reduce_sum = recorded
    try:
        mixed = ld.all_reduce_weighted(
            [x, torch.tensor(float(rank), dtype=torch.float64), 2 * x,
             (x / 3).to(torch.bfloat16)], weight=1.0, total=2.0)
    finally:
        ld._all_reduce_sum = real
    collected: list[Any] = []
    ld.map_sharded(list(range(5)), lambda i: (i * i, ld.rank()),
                   lambda i, v: collected.append((i, *v)))

    def fails_on_rank_1(i: int) -> int:
        if ld.rank() == 1:
            raise ValueError("boom")
        return i

    try:
        ld.map_sharded([0, 1, 2], fails_on_rank_1)
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    return {
        "weighted": weighted, "mixed": mixed, "sent": sent,
        "broadcast": ld.broadcast_object({"from": rank}),
        "gathered": ld.gather_objects(rank * 10), "all_gathered": ld.all_gather_objects(rank),
        "shard": ld.shard(list(range(7))), "collected": collected, "error": error,
        "enabled": (ld.enabled(), ld.enabled(True), ld.enabled(False)),
        "after_error": ld.all_gather_objects("still in step"),
    }


# ----------------------------------------------------------------------------- monitor

STEPS = 8
STOP_AT = 5


class RankZeroOnly(Rule):
    """Fires at step STOP_AT on rank 0 only: its finding reaches other ranks by broadcast."""

    name = "rank_zero_only"
    metrics = ("grad_norm",)
    sustain = 1
    rearm = 3

    def evaluator(self, metric: str, params: Any) -> Any:
        def evaluate(step: int, row: Any) -> Trigger | None:
            if step == STOP_AT and ld.rank() == 0:
                return Trigger("error", "value", float(row["value"]), 0.0, "stop now", "")
            return None

        return evaluate


def monitor_metrics() -> list[Any]:
    return [Loss(), GradNorm(), HessianSpectrum(k=2, tol=1e-6, schedule=1),
            Sharpness(tol=1e-6, schedule=1), HessianTrace(n_matvec=9, schedule=2)]


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    return dataset(12, seed=3)


def train(net: torch.nn.Module, shard: slice, path: str | None) -> dict[str, Any]:
    """SGD on samples ``shard`` of the data set, monitored; stops at the first error finding.

    Under DDP every rank trains on its slice and DDP averages the gradients, which equals
    the full-batch gradient since the slices have equal sizes."""
    x, y = dataset()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    heard: list[Any] = []
    stopped = None
    with Monitor(net, F.cross_entropy, path, optimizer=opt, metrics=monitor_metrics(),
                 probe=probe(), alarms=[*default_rules(), RankZeroOnly()],
                 on_finding=heard.append, warn=False) as mon:
        for step in range(STEPS):
            loss = F.cross_entropy(net(x[shard]), y[shard])
            opt.zero_grad()
            loss.backward()
            opt.step()
            raised = mon.step(step, batch=(x[shard], y[shard]), loss=loss)
            if any(f.severity == "error" for f in raised):
                stopped = step
                break
        findings = list(mon.findings)
        writes = mon.path
    inner = ld.unwrap(net)
    return {"stopped": stopped, "heard": [(f.step, f.rule) for f in heard],
            "findings": [(f.step, f.rule, f.metric) for f in findings], "writes": writes,
            "params": [p.detach().clone() for p in inner.parameters()]}


def monitor_worker(rank: int, out_dir: str) -> None:
    net = DDP(model())
    half = N // dist.get_world_size()
    path = os.path.join(out_dir, "ddp.h5")
    result = train(net, slice(rank * half, (rank + 1) * half), path)
    _save(out_dir, rank, result)


def bn_model() -> torch.nn.Module:
    """A BatchNorm MLP: its running statistics are buffers the ranks update apart."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def batchnorm_worker(rank: int, out_dir: str) -> None:
    """Each rank's training forward updates its own running statistics; DDP broadcasts
    rank 0's at the next forward only. The same probe on every rank must give the single
    process's top eigenvalue with rank 0's statistics (it mixed the ranks' functions)."""
    from landscape.metrics.curvature import TopEigenvalues

    x, y = dataset()
    net = DDP(bn_model())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    probe = (x[:8], y[:8])
    with Monitor(net, F.cross_entropy, os.path.join(out_dir, "bn.h5"), optimizer=opt,
                 probe=probe, metrics=[TopEigenvalues(k=1, tol=1e-9, schedule=1)],
                 warn=False) as mon:
        own = slice(rank * 8, rank * 8 + 8)
        loss = F.cross_entropy(net(x[own] * (1 + 2 * rank)), y[own])
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {k: v.clone() for k, v in net.module.state_dict().items()}
        mon.step(0, batch=(x[own], y[own]), loss=loss)
        after = {k: v.clone() for k, v in net.module.state_dict().items()}
        (value,) = mon.run().series("top_eigenvalues", "eigenvalues")[1][0] \
            if rank == 0 else (None,)
    _save(out_dir, rank, {"state": state, "value": value,
                          "kept": all(torch.equal(state[k], after[k]) for k in state)})


def grown_buffer_worker(rank: int, out_dir: str) -> None:
    """A buffer each rank grew to its own size (a cache): the ranks keep their own, no
    broadcast over mismatched shapes (which wrote rank 0's values into rank 1's cache)."""
    from landscape.metrics.curvature import TopEigenvalues

    x, y = dataset()
    model = bn_model()
    net = DDP(model)  # (which syncs the buffers it holds now, not a cache grown later)
    model.register_buffer("cache", torch.full((4 + 4 * rank,), 10.0 + rank))
    from landscape.isolation import measuring

    seen = []  # the cache as the measurement's forward passes see it
    model.register_forward_hook(
        lambda m, args, out: seen.append(m.cache.tolist()) if measuring() else None)
    probe = (x[:8], y[:8])
    with Monitor(net, F.cross_entropy, None, probe=probe, warn=False,
                 metrics=[TopEigenvalues(k=1, schedule=1)]) as mon:
        mon.step(0, batch=probe, loss=torch.tensor(1.0))
        failed = [f.message for f in mon.findings if f.rule == "metric_failed"]
    _save(out_dir, rank, {"cache": model.cache.clone(), "failed": failed, "seen": seen})


class _RankSentinels(Sentinels):
    """Sentinels whose r_secant moves on rank 1 only, at step 2 (ranks with their own
    probes see different r)."""

    def compute(self, ctx: Any) -> dict[str, float]:
        row = dict(super().compute(ctx))
        row["r_secant"] = 1.0 if dist.get_rank() == 1 and ctx.step == 2 else 0.0
        return row


def dense_window_worker(rank: int, out_dir: str) -> None:
    """Rank 1's sentinels alone move: every rank must keep rank 0's (closed) dense window,
    or rank 1 alone runs the all-reduced sharpness at step 5 and the ranks hang."""
    net = DDP(model())
    x, y = dataset()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    windows = []
    with Monitor(net, F.cross_entropy, None, optimizer=opt, probe=probe(), warn=False,
                 metrics=[_RankSentinels(), Sharpness(tol=1e-6, schedule=100)]) as mon:
        for step in range(8):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
            windows.append(mon._dense.until)
    _save(out_dir, rank, {"windows": windows})


# ----------------------------------------------------------------------------- surfaces

GRID = {"x": (5, 1.0), "y": (4, 0.5)}  # 20 points: 10 per rank


def surface_setup() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor], Any]:
    from landscape.surface.directions import random_directions

    net = model()
    return net, dataset(), random_directions(net, 2, seed=0)


def evaluate_plane(writer: Any, loss_fn: Any = F.cross_entropy) -> Any:
    from landscape.surface.grid import axis, evaluate_grid

    net, data, dirs = surface_setup()
    return evaluate_grid(net, loss_fn, data, dirs, axis(*GRID["x"]), axis(*GRID["y"]),
                         writer=writer, name="plane", progress=False)


def surface_worker(rank: int, out_dir: str) -> None:
    calls: list[int] = []

    def counting(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # one call per grid point (one batch)
        return F.cross_entropy(out, target)

    fresh = evaluate_plane(os.path.join(out_dir, "fresh.h5"), counting)
    n_fresh = len(calls)
    calls.clear()
    resumed = evaluate_plane(os.path.join(out_dir, "partial.h5"), counting)  # prepared
    _save(out_dir, rank, {"fresh": fresh, "n_fresh": n_fresh, "resumed": resumed,
                          "n_resumed": len(calls)})


def eigen_plane_on_rank_0_worker(rank: int, out_dir: str) -> None:
    """plane(directions="eigen", distributed=False) on rank 0 alone: the Hessian of the
    eigen directions all-reduced anyway and waited for rank 1 (distributed review)."""
    from landscape.surface import plane

    values = None
    if rank == 0:
        x, y = dataset()
        values = plane(model(), F.cross_entropy, (x[:8], y[:8]), steps=3,
                       directions="eigen", distributed=False, progress=False).values["loss"]
    _save(out_dir, rank, {"values": values, "after": ld.all_gather_objects("went on")})


# ----------------------------------------------------------------------------- FSDP2


def fsdp_model(net: torch.nn.Module | None = None, **kw: Any) -> torch.nn.Module:
    """:func:`model` with every Linear and the root ``fully_shard``-ed over the world."""
    from torch.distributed.fsdp import fully_shard

    net = model() if net is None else net
    for m in net:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, **kw)
    fully_shard(net, **kw)
    return net


def fsdp_mixed_precision_worker(rank: int, out_dir: str) -> None:
    """FSDP2 with ``MixedPrecisionPolicy(param_dtype=bfloat16)``: float32 shards, bfloat16
    forward and backward. First-order products must be sized for bfloat16's precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    net = fsdp_model(model().float(), mp_policy=policy)
    data = _to_float32(curvature_shard(rank))
    out: dict[str, Any] = {}
    for name, cls in (("hessian", Hessian), ("ggn", GGN)):
        op = cls(net, F.cross_entropy, data)
        out[name] = [op.flat_matvec(v.float()) for v in fsdp_vectors(op.dim)]
        out[f"{name}_dtypes"] = (op._first_order.compute_dtype, op.dtype)
    _save(out_dir, rank, out)


def fsdp_vectors(dim: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(n)]


def fsdp_curvature_worker(rank: int, out_dir: str) -> None:
    import warnings

    from landscape.params import flatten, unflatten

    net = fsdp_model()
    before = [p.full_tensor().clone() for p in net.parameters()]
    data = curvature_shard(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H = Hessian(net, F.cross_entropy, data)
    products = [flatten(H.matvec(unflatten(v, H._like()))) for v in fsdp_vectors(H.dim)]
    eig = top_eigenvalues(H, k=3, tol=1e-6)
    trace = hessian_trace(H, "hutch++", n_matvec=12, seed=1)
    G = GGN(net, F.cross_entropy, data)
    ggn_products = [flatten(G.matvec(unflatten(v, G._like()))) for v in fsdp_vectors(G.dim)]
    ggn = top_eigenvalues(G, k=2, tol=1e-6)
    block = top_eigenvalues(H.subset(["0.weight"]), k=1, tol=1e-6)
    try:
        Hessian(net, F.cross_entropy, data, backend="exact")
        refused = None
    except ValueError as err:
        refused = str(err)
    from landscape.functional import sam_sharpness
    try:  # an AttributeError from torch.func's guts before
        sam_sharpness(net, F.cross_entropy, *data, rho=0.05)
        sam = None
    except NotImplementedError as err:
        sam = str(err)
    after = [p.full_tensor() for p in net.parameters()]
    _save(out_dir, rank, {
        "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        "backend_used": H.backend_used, "reason": H.first_order_reason,
        "products": products, "eig": eig.values, "trace": trace.value,
        "ggn_products": ggn_products, "ggn": ggn.values, "block": block.values,
        "loss": H.loss(), "grad": H.gradient(), "refused": refused, "sam": sam,
        "restored": all(torch.equal(a, b) for a, b in zip(before, after)),
        "grads_none": all(p.grad is None for p in net.parameters()),
        "shapes": H.shapes,
    })


def fsdp_sharp_worker(rank: int, out_dir: str) -> None:
    """:class:`SharpModel` with only the root ``fully_shard``-ed (the root holds every
    parameter, as it holds embeddings and final norms in practice): first-order Hessian
    and GGN products along the sharp direction, where the step is refined (the GGN's on a
    steeper cosine, ``STEEP``: at k = 40 its extrapolated product needs no refinement)."""
    from torch.distributed.fsdp import fully_shard

    from landscape.params import flatten, unflatten

    net = SharpModel()
    fully_shard(net)
    x, y = dataset()
    x, y = x.float(), F.one_hot(y, 3).float()
    shard = (x[:10], y[:10]) if rank == 0 else (x[10:], y[10:])
    steep = SharpModel(STEEP)
    fully_shard(steep)
    H = Hessian(net, F.mse_loss, shard)
    G = GGN(steep, F.mse_loss, shard)
    out = {}
    for name, op in (("hessian", H), ("ggn", G)):
        out[name] = [flatten(op.matvec(unflatten(v, op._like()))) for v in sharp_directions()]
    engine = H._first_order
    out.update(ratio=engine._ratio(), refined=engine.refined, unchecked=engine._unchecked)
    out.update(ggn_ratio=G._first_order._ratio(), ggn_refined=G._first_order.refined)
    _save(out_dir, rank, out)


# ------------------------------------------------------ a rank with nothing to count


def targets_counted(batch: Any) -> int:
    """The token sizer of a padded loss: targets that are not ``ignore_index`` (-100)."""
    return int((batch[1] != -100).sum())


def empty_rank_worker(rank: int, out_dir: str) -> None:
    """Rank 1's probe has every target ignored: its sizer counts nothing.

    The operator and a monitored curvature metric must fail on both ranks together (rank 1
    alone used to raise, leaving rank 0 in the first reduction); both ranks then go on in
    step.
    """
    from landscape.metrics.curvature import TopEigenvalues

    x, y = dataset()
    data = (x[:8], y[:8]) if rank == 0 else (x[8:], torch.full((8,), -100))
    net = model()
    try:
        Hessian(net, F.cross_entropy, data, batch_size=targets_counted)
        error = None
    except ValueError as err:
        error = str(err)
    mon = Monitor(net, F.cross_entropy, metrics=[TopEigenvalues(k=1, schedule=1)], probe=data,
                  batch_size=targets_counted, warn=False)
    with mon:
        for step in range(2):
            mon.step(step, batch=data, loss=torch.tensor(1.0))
        failed = [(f.step, f.message) for f in mon.findings if f.rule == "metric_failed"]
    # rank 1's targets do not match its inputs: cutting them into micro-batches fails there
    uncut = (x[:8], y[:8]) if rank == 0 else (x[8:], y[8:14])
    with Monitor(net, F.cross_entropy, metrics=[TopEigenvalues(k=1, schedule=1)],
                 probe=uncut, microbatch_size=4, warn=False) as mon:
        for step in range(2):
            mon.step(step, batch=uncut, loss=torch.tensor(1.0))
        uncut_failed = [(f.step, f.message) for f in mon.findings if f.rule == "metric_failed"]
    _save(out_dir, rank, {"error": error, "failed": failed, "uncut_failed": uncut_failed,
                          "after": ld.all_gather_objects("still in step")})


def uneven_padding_worker(rank: int, out_dir: str) -> None:
    """The ranks' targets hold -100 in unequal shares: weighted by samples, the union's
    curvature is off (+51 % on an example), which one process warns about for a list of
    the same batches; the ranks said nothing."""
    import warnings

    x, y = dataset()
    ignored = 1 if rank == 0 else 3
    uneven = (x[rank * 4:rank * 4 + 4], torch.cat([torch.full((ignored,), -100),
                                                   y[rank * 4 + ignored:rank * 4 + 4]]))
    even = (x[rank * 4:rank * 4 + 4], torch.cat([torch.full((2,), -100),
                                                 y[rank * 4 + 2:rank * 4 + 4]]))
    said = {}
    for name, data in (("uneven", uneven), ("even", even)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Hessian(model(), F.cross_entropy, data)
        said[name] = [str(w.message) for w in caught if "unequal shares" in str(w.message)]
    _save(out_dir, rank, said)


def bad_probe_rank_worker(rank: int, out_dir: str) -> None:
    """Rank 1's probe has another width than the model's inputs: its forward raises.

    The operator's first products ran on rank 0 into the reduction while rank 1 had failed
    (a hang, or garbage from mismatched collectives); now the metric fails on both ranks.
    """
    from landscape.metrics.curvature import TopEigenvalues

    x, y = dataset()
    probe = (x[:8], y[:8]) if rank == 0 else (torch.randn(8, x.shape[1] + 1), y[8:])
    with Monitor(model(), F.cross_entropy, metrics=[TopEigenvalues(k=1, schedule=1)],
                 probe=probe, warn=False) as mon:
        for step in range(2):
            mon.step(step, batch=probe, loss=torch.tensor(1.0))
        failed = [(f.step, f.message) for f in mon.findings if f.rule == "metric_failed"]
    _save(out_dir, rank, {"failed": failed, "after": ld.all_gather_objects("still in step")})


def bad_probe_two_metrics_worker(rank: int, out_dir: str) -> None:
    """As :func:`bad_probe_rank_worker`, with two curvature metrics sharing the step's
    operator: the symmetry check was marked done before it ran, so the second metric's
    products ran without its guard and rank 0 waited in an all-reduce (distributed
    review); and rank 1's probe holds one sample under micro-batches, whose memory
    profile divided by zero there."""
    from landscape.metrics.curvature import HessianTrace, TopEigenvalues

    x, y = dataset()
    probe = (x[:8], y[:8]) if rank == 0 else (torch.randn(8, x.shape[1] + 1), y[8:])
    with Monitor(model(), F.cross_entropy,
                 metrics=[TopEigenvalues(k=1, schedule=1), HessianTrace(schedule=1)],
                 probe=probe, warn=False) as mon:
        for step in range(2):
            mon.step(step, batch=probe, loss=torch.tensor(1.0))
        failed = sorted({f.metric for f in mon.findings if f.rule == "metric_failed"})
    one = (x[:8], y[:8]) if rank == 0 else (x[8:9], y[8:9])
    with Monitor(model(), F.cross_entropy, metrics=[TopEigenvalues(k=1, schedule=1)],
                 probe=one, microbatch_size=4, warn=False) as mon:
        mon.step(0, batch=one, loss=torch.tensor(1.0))
        one_failed = [f.message for f in mon.findings if f.rule == "metric_failed"]
        top = mon.run().series("top_eigenvalues", "eigenvalues")[1]
    _save(out_dir, rank, {"failed": failed, "one_failed": one_failed,
                          "top": top.tolist(),
                          "after": ld.all_gather_objects("still in step")})


def _eval_fails_on_rank_1(net: torch.nn.Module, batch: Any) -> torch.Tensor:
    """A closure whose eval-mode forward fails on rank 1 only (a train-mode-only model)."""
    if not net.training and ld.rank() == 1:
        raise RuntimeError("this model has no eval mode here")
    x, y = batch
    return F.cross_entropy(net(x), y)


def _token_mean(net: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy averaged over the targets that are not ignored (-100)."""
    x, y = batch
    return F.cross_entropy(net(x), y, ignore_index=-100)


def microbatch_check_worker(rank: int, out_dir: str) -> None:
    """The micro-batch check (the losses must add up) on each rank's own batch.

    A forward that fails on rank 1 alone skips the check there without leaving rank 0 in
    a reduction; a loss that does not add up on rank 1 alone raises on both ranks.
    """
    x, y = dataset()
    net = model()
    mine = (x[:8], y[:8]) if rank == 0 else (x[8:], y[8:])
    Hessian(net, None, mine, closure=_eval_fails_on_rank_1, microbatch_size=4,
            eval_mode=False)
    built = ld.all_gather_objects("built")
    # rank 1's batch has ignored targets in one micro-batch only: a mean over tokens
    # weighted by samples does not add up there (rank 0's has none: it does)
    padded = mine if rank == 0 else (x[8:], torch.cat([y[8:10], torch.full((6,), -100)]))
    try:
        Hessian(net, None, padded, closure=_token_mean, microbatch_size=4)
        error = None
    except ValueError as err:
        error = str(err)
    # rank 1's batch fits one micro-batch (nothing to cut there): the check is collective,
    # so it runs on both ranks all the same
    uneven = (x[:8], y[:8]) if rank == 0 else (x[8:12], y[8:12])
    try:
        Hessian(net, F.cross_entropy, uneven, microbatch_size=4)
        uneven_error = None
    except ValueError as err:
        uneven_error = str(err)
    _save(out_dir, rank, {"built": built, "error": error, "uneven_error": uneven_error,
                          "after": ld.all_gather_objects("still in step")})


def taylor_guard_worker(rank: int, out_dir: str) -> None:
    """DDP with ``taylor_guard`` and a probe of each rank's own: the guard rescales every
    rank's step by one factor (the largest r over the ranks), so the copies stay equal."""
    net = DDP(model())
    half = N // dist.get_world_size()
    shard = slice(rank * half, (rank + 1) * half)
    x, y = dataset()
    opt = torch.optim.SGD(net.parameters(), lr=2.0)
    rescaled = 0
    with Monitor(net, F.cross_entropy, None, optimizer=opt, metrics=["loss"],
                 probe=dataset(16, seed=7 + rank), taylor_guard=0.05, warn=False) as mon:
        for step in range(4):
            loss = F.cross_entropy(net(x[shard]), y[shard])
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in net.parameters()]
            opt.step()
            plain = [b - 2.0 * p.grad for b, p in zip(before, net.parameters())]
            rescaled += not all(torch.equal(a, p.detach()) for a, p in zip(plain,
                                                                          net.parameters()))
            mon.step(step, batch=(x[shard], y[shard]), loss=loss)
    _save(out_dir, rank, {"params": [p.detach().clone() for p in ld.unwrap(net).parameters()],
                          "rescaled": rescaled})


def zero_worker(rank: int, out_dir: str) -> None:
    """DDP with a ZeroRedundancyOptimizer over SGD with momentum, then over AdamW: the
    sharpness rows and findings of a few steps."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    x, y = dataset()
    half = N // dist.get_world_size()
    shard = slice(rank * half, (rank + 1) * half)
    result: dict[str, Any] = {}
    for name, cls, kw in (("sgd", torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
                          ("adamw", torch.optim.AdamW, {"lr": 1e-2})):
        net = DDP(model())
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=cls, **kw)
        with Monitor(net, F.cross_entropy, None, optimizer=opt, probe=probe(), warn=False,
                     metrics=[Sharpness(tol=1e-6, schedule=1, adam_warmup=0)]) as mon:
            for step in range(3):
                loss = F.cross_entropy(net(x[shard]), y[shard])
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x[shard], y[shard]), loss=loss)
            run = mon.run()
            rows = {f: run.series("sharpness", f)[1] for f in ("lambda_max", "threshold")}
            result[name] = {"rows": rows, "findings": [f.message for f in mon.findings]}
    from landscape.curvature.stability import optimizer_kind

    # overlap_with_ddp holds the functional twin of the class (_FunctionalSGD)
    result["kinds"] = [optimizer_kind(ZeroRedundancyOptimizer(
        model().parameters(), optimizer_class=cls, overlap_with_ddp=True, lr=0.1))
        for cls in (torch.optim.SGD, torch.optim.AdamW)]
    _save(out_dir, rank, result)


def probe_note_worker(rank: int, out_dir: str) -> None:
    """The default monitor's note that it took its probe, as each rank logged it."""
    import logging

    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("landscape").addHandler(handler)
    try:
        x, y = dataset()
        net = DDP(model())
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(2):  # a run, then its resume: every rank takes a new probe
            with Monitor(net, F.cross_entropy, f"{out_dir}/run.h5", optimizer=opt,
                         warn=False) as mon:
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
    finally:
        logging.getLogger("landscape").removeHandler(handler)
    _save(out_dir, rank, {"notes": [n for n in notes if "fixed probe" in n],
                          "resumed": [n for n in notes if "resuming a run" in n]})


ONE_SAMPLE_SHARDS = (8, 1)  # rank 0's and rank 1's samples of the probe


def one_sample_probe_run(net: torch.nn.Module, probe_rows: slice, path: str | None) -> dict:
    """Three SGD steps on the whole data set, sharpness every step (default memory budget)
    on the probe's samples ``probe_rows``; under DDP every rank trains on the same batch."""
    x, y = dataset()
    px, py = dataset(sum(ONE_SAMPLE_SHARDS), seed=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with Monitor(net, F.cross_entropy, path, optimizer=opt, warn=False, strict=True,
                 metrics=[Sharpness(tol=1e-8, schedule=1)],
                 probe=(px[probe_rows], py[probe_rows])) as mon:
        for step in range(3):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        _, lam = mon.run().series("sharpness", "lambda_max")
    return {"lambda_max": torch.as_tensor(lam)}


def one_sample_shard_worker(rank: int, out_dir: str) -> None:
    """A probe cut into shards of 8 and 1 samples: the memory profile's choices (a second
    measured point, the micro-batch check) followed each rank's own sample count, so the
    rank of one sample skipped collectives the other ran, and the job hung."""
    lo = sum(ONE_SAMPLE_SHARDS[:rank])
    shard = slice(lo, lo + ONE_SAMPLE_SHARDS[rank])
    _save(out_dir, rank, one_sample_probe_run(DDP(model()), shard,
                                             os.path.join(out_dir, "ddp.h5")))


def short_last_batch_worker(rank: int, out_dir: str) -> None:
    """Sharpness on the training batches; at the last step rank 1's batch holds 1 sample,
    rank 0's its usual 16: the rank whose count changed measured its memory profile again
    alone (and within it took other branches), and the job hung."""
    x, y = dataset()
    net = DDP(model())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with Monitor(net, F.cross_entropy, None, optimizer=opt, warn=False, strict=True,
                 metrics=[Sharpness(tol=1e-8, schedule=1, data="batch")]) as mon:
        for step in range(3):
            rows = slice(0, 1) if step == 2 and rank == 1 else slice(0, N)
            loss = F.cross_entropy(net(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x[rows], y[rows]), loss=loss)
        _, lam = mon.run().series("sharpness", "lambda_max")
    _save(out_dir, rank, {"lambda_max": torch.as_tensor(lam)})


def built_before_init_worker(rank: int, out_dir: str) -> None:
    """The monitor is built in setup code, before ``init_process_group`` (env://, as under
    torchrun), and started after it: every rank opened the run file."""
    x, y = dataset()
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    path = os.path.join(out_dir, "run.h5")
    mon = Monitor(net, F.cross_entropy, path, optimizer=opt, warn=False, strict=True,
                  metrics=[Loss(), Sharpness(tol=1e-8, schedule=1)], probe=probe())
    dist.init_process_group("gloo")
    ddp = DDP(net)
    with mon:
        for step in range(3):
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        _, lam = mon.run().series("sharpness", "lambda_max")
    _save(out_dir, rank, {"path": mon.path, "distributed": mon._distributed,
                          "lambda_max": torch.as_tensor(lam)})


def warned_once_worker(rank: int, out_dir: str) -> None:
    """Rank 0's finding, broadcast to every rank: each returns it, rank 0 alone warns."""
    import warnings

    from landscape import InstabilityWarning

    x, y = dataset()
    net = DDP(model())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Monitor(net, F.cross_entropy, None, optimizer=opt, metrics=[GradNorm()],
                     alarms=[RankZeroOnly()]) as mon:
            returned = []
            for step in range(STOP_AT + 1):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                returned += [(f.step, f.rule) for f in mon.step(step, batch=(x, y), loss=loss)]
    said = [str(w.message) for w in seen if issubclass(w.category, InstabilityWarning)]
    _save(out_dir, rank, {"returned": returned, "said": said})


def left_out_worker(rank: int, out_dir: str) -> None:
    """A preset on a model without nn.Linear: its metrics that pick a linear layer are left
    out, said by rank 0 alone (every rank printed each one)."""
    import warnings

    net = DDP(torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten()).double())
    x = torch.randn(8, 1, 6, dtype=torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Monitor(net, F.mse_loss, None, optimizer=opt, metrics="standard",
                probe=(x, torch.zeros(8, 8, dtype=torch.float64)), warn=False).start().close()
    _save(out_dir, rank, {"said": [str(w.message) for w in seen if "left out" in str(w.message)]})


class _FailsOnRank1Later:
    """Cross-entropy whose calls on rank 1 raise once armed: a forward out of memory there.

    ``after``: how many more calls rank 1 makes before they raise (None: never).
    """

    def __init__(self) -> None:
        self.after: int | None = None

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.after is not None and ld.rank() == 1:
            if self.after <= 0:
                raise RuntimeError("out of memory (simulated, rank 1 alone)")
            self.after -= 1
        return F.cross_entropy(out, y)


def _outcome(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "ok"


def later_failure_worker(rank: int, out_dir: str) -> None:
    """A forward that fails on rank 1 alone after the operator's first products.

    Only the first products (the symmetry check) were guarded: later products, the
    first-order ones, ``gradient()`` and ``loss()`` left rank 0 waiting in the all-reduce
    for as long as rank 1 lived (a monitor's metric: a deadlock of the training job).
    """
    from landscape.metrics.curvature import TopEigenvalues

    data = curvature_shard(rank)
    out: dict[str, Any] = {}
    for backend in ("auto", "first_order"):
        loss = _FailsOnRank1Later()
        H = Hessian(model(), loss, data, backend=backend)
        before = top_eigenvalues(H, k=1, tol=1e-6).values
        # exact products reuse the gradient's graph, built again by the first product
        # after a refresh; first-order ones take two forwards each: one fails mid-Lanczos
        H.refresh()
        loss.after = 0 if backend == "auto" else 3
        out[backend] = _outcome(top_eigenvalues, H)
        loss.after = None
        H.refresh()
        out[backend + "_again"] = torch.equal(top_eigenvalues(H, k=1, tol=1e-6).values, before)
    loss = _FailsOnRank1Later()
    H = Hessian(model(), loss, data)
    loss.after = 0
    out["gradient"] = _outcome(H.gradient)
    out["loss"] = _outcome(H.loss)
    loss.after = None
    out["gradient_again"] = _outcome(H.gradient)
    # in the monitor: the metric fails on both ranks at step 1 and both go on
    loss = _FailsOnRank1Later()
    probe = data if rank == 1 else data[0]
    with Monitor(model(), loss, metrics=[TopEigenvalues(k=1, schedule=1)], probe=probe,
                 warn=False) as mon:
        for step in range(3):
            loss.after = 0 if step == 1 else None
            mon.step(step, batch=probe, loss=torch.tensor(1.0))
        out["failed"] = [(f.step, f.message) for f in mon.findings
                         if f.rule == "metric_failed"]
        if rank == 0:
            steps, values = mon.run().series("top_eigenvalues", "eigenvalues")
            out["recorded"] = (steps.tolist(), values.tolist())
    out["after"] = ld.all_gather_objects("still in step")
    _save(out_dir, rank, out)


def guard_edges_worker(rank: int, out_dir: str) -> None:
    """What the failure votes must leave alone, and a fallback that must keep its vote.

    A cached loss read, or a wrong vector refused, on one rank alone took no collective
    before the votes and must take none (a vote at the call's end waited there for ever);
    and under ``auto`` a rank whose exact product fails alone falls back to first-order
    products, whose vote then carried the other rank's failure: replaced by the rank's own
    exact error, it voted a second time and hung (review of the votes).
    """
    data = curvature_shard(rank)
    out: dict[str, Any] = {}
    H = Hessian(model(), F.cross_entropy, data)
    H.loss()
    H.gradient()
    if rank == 0:
        out["cached"] = float(H.loss())
        out["wrong_vector"] = _outcome(H.matvec, (torch.zeros(1),))
    loss = _FailsOnRank1Later()
    H = Hessian(model(), loss, data)
    v = tuple(torch.ones(s, dtype=torch.float64) for s in H.shapes)
    H.matvec(v)  # the first products, checked
    H.refresh()
    if rank == 0:  # its exact products fail alone: auto falls back to first-order ones

        def exact_out_of_memory(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exact products out of memory (rank 0 alone)")

        H._func_product = H._autograd_product = exact_out_of_memory
    else:
        loss.after = 0  # every forward fails
    out["fallback"] = _outcome(H.matvec, v)
    out["after"] = ld.all_gather_objects("still in step")
    _save(out_dir, rank, out)


def exact_fails_alone_worker(rank: int, out_dir: str) -> None:
    """Rank 0's exact products fail alone (out of memory there): under ``auto`` it fell back
    to first-order products by itself, whose collectives differ from the exact ones (gloo
    aborted: "a distributed collective mismatch"). Now every rank fails the call together;
    a failure on every rank still takes the fallback together (second review)."""
    H = Hessian(model(), F.cross_entropy, curvature_shard(rank))
    v = tuple(torch.ones(s, dtype=torch.float64) for s in H.shapes)
    H.matvec(v)
    H.refresh()
    out: dict[str, Any] = {}

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("exact products out of memory")

    if rank == 0:
        H._func_product = H._autograd_product = out_of_memory
    out["alone"] = _outcome(H.matvec, v)
    out["alone_first_order"] = H._backend.first_order
    # every rank: the fallback, together
    H._func_product = H._autograd_product = out_of_memory
    H.refresh()
    out["all"] = _outcome(H.matvec, v)
    out["all_first_order"] = H._backend.first_order
    out["after"] = ld.all_gather_objects("still in step")
    _save(out_dir, rank, out)


def miscounted_step_worker(rank: int, out_dir: str, sparse: bool = False) -> None:
    """Rank 1 counts its steps from 1 on at step 2 (a resumed counter off by one): the
    ranks' schedules, hence their collectives, would differ. ``sparse``: the loss every 5
    steps, so the ranks have their metrics due at different calls, and rank 1 is one step
    ahead from the first call."""
    from landscape.schedules import every

    net = DDP(model())
    x, y = dataset()
    half = N // dist.get_world_size()
    shard = slice(rank * half, (rank + 1) * half)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    error = None
    try:
        metrics = [Loss(schedule=every(5))] if sparse else ["loss"]
        with Monitor(net, F.cross_entropy, None, optimizer=opt, metrics=metrics,
                     warn=False) as mon:
            for step in range(6):
                loss = F.cross_entropy(net(x[shard]), y[shard])
                opt.zero_grad()
                loss.backward()
                opt.step()
                apart = step >= 2 or sparse  # sparse: a counter resumed apart, from the start
                mon.step(step + (rank == 1 and apart), batch=(x[shard], y[shard]), loss=loss)
    except Exception as err:  # every rank, at the step the numbers part
        error = f"{type(err).__name__}: {err}"
    _save(out_dir, rank, {"error": error})


def joined_uneven_worker(rank: int, out_dir: str) -> None:
    """Uneven inputs under DDP's ``join()``: rank 1 runs out of data after 6 steps, rank 0
    goes on to 10. A monitor with ``distributed=False`` issues no collective to wait on."""
    net = DDP(model())
    x, y = dataset()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, F.cross_entropy, os.path.join(out_dir, "joined.h5"), optimizer=opt,
                 distributed=False, warn=False) as mon, net.join():
        for step in range(10 if rank == 0 else 6):
            batch = (x[step::10], y[step::10])
            loss = F.cross_entropy(net(batch[0]), batch[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=batch, loss=loss)
    _save(out_dir, rank, {"params": [p.detach().clone() for p in net.module.parameters()]})


def unopenable_file_worker(rank: int, out_dir: str) -> None:
    """A run file rank 0 cannot open (not HDF5): it raised on rank 0 alone, and rank 1 went
    on into the next collective (gloo's "connection closed by peer", or a plane assembled
    from rank 0's next surface call)."""
    bad = os.path.join(out_dir, "not_hdf5.h5")
    errors = []
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    try:
        Monitor(net, F.cross_entropy, bad, optimizer=opt, metrics=[Loss()]).start()
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
    try:
        evaluate_plane(bad)
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
    good = evaluate_plane(os.path.join(out_dir, "good.h5"))  # the ranks still in step
    _save(out_dir, rank, {"errors": errors, "loss": good.values["loss"]})
