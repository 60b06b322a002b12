"""Curvature at scale: GPT-2 small, a hand-written ResNet-18, and the cost growth between.

    .venv/bin/python -m tests.benchmarks.bench_scale --quick
    .venv/bin/python -m tests.benchmarks.bench_scale --models resnet18 \
        --sections step,product,top1 --pyhessian --max-matvec 30
    .venv/bin/python -m tests.benchmarks.bench_scale --models gpt2-small \
        --sections step,product,top1 --max-matvec 28 --max-basis 10
    .venv/bin/python -m tests.benchmarks.bench_scale --models gpt2-1m,gpt2-10m,gpt2-mid \
        --sections step,product,eig,surface,plan,top5,trace
    .venv/bin/python -m tests.benchmarks.bench_scale --models resnet18,gpt2-small --sections plan

Every cost is reported in units of one training step of the same model and batch (forward,
backward, AdamW step), with the peak memory above the state before it (resident set on the
CPU, ``torch.cuda.max_memory_allocated`` on CUDA; :mod:`landscape.curvature.memory`).

Models (random init, nothing downloaded): ``gpt2-small`` is transformers'
``GPT2LMHeadModel(GPT2Config())`` (124M parameters, batch 4 x 128 tokens); ``gpt2-1m``,
``gpt2-10m``, ``gpt2-mid`` are smaller GPT-2 configurations for the growth table;
``resnet18`` is the CIFAR variant of He et al. (2016) for 32x32 inputs (3x3 stem, no max
pool, 11.2M parameters, batch 64), written here because torchvision is not installable.

Sections: ``step``, ``product`` (one exact Hessian-vector product on the cached graph, and the
first-order product, ``backend="first_order"``), ``top1`` (the Lanczos run of
``top_eigenvalues`` to ``--max-matvec`` products with its per-product history, from which
docs/benchmarks.md reads every stopping rule; ``--max-basis`` bounds it), ``eig`` and ``top5``
(``top_eigenvalues`` at its defaults, k = 1 and 5), ``--pyhessian`` (PyHessian's
``eigenvalues(top_n=1)`` at its defaults, ResNet-18), ``plan`` (what each of ``--budgets``,
default "auto", "1x", "1.5x", "3x step", would do for ``top_eigenvalues(k=1)``, without
running), ``budget`` (top-1 run within each), ``trace`` (``hessian_trace``, krylov, 30
products), ``surface`` (one point of a landscape plane), ``presets`` (one monitor step with
every metric of the ``cheap`` and ``standard`` presets due), ``precision`` (a float32 product
against the float64 one along a near-top Ritz vector, and the symmetry of random products),
``vs_pyhessian`` (one exact product, ours and PyHessian's ``hessian_vector_product`` on its
kept gradient graph, interleaved), ``density`` (``spectral_density`` of one probe, 30 steps,
with the full and the local Lanczos basis: time, peak, moments; then the basis each budget's
plan keeps), ``first_order`` (first-order products against exact ones along the top
eigenvector and a random direction, and ``top_eigenvalues`` on each), ``ggn_first_order``
(the same for the GGN of the cross-entropy, and the time of one product, exact and
first-order). ``--quick`` runs the
small models only, a few products each (a smoke test of the script). The machine is
shared: one thread, and ratios.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from landscape import LandscapeError
from landscape.curvature import GGN, Hessian, hessian_trace, spectral_density, top_eigenvalues
from landscape.curvature.lanczos import krylov_eigsh
from landscape.curvature.memory import PeakMemory
from tests.benchmarks.bench_start_vector import gradient_start

# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and an identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR variant: 3x3 stem, no max pool): 11.17M parameters."""

    def __init__(self, n_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


GPT2_SIZES = {
    # name: (vocab, n_embd, n_layer, n_head)
    "gpt2-1m": (8192, 96, 2, 4),
    "gpt2-10m": (16384, 256, 6, 4),
    "gpt2-mid": (50257, 384, 6, 6),
    "gpt2-small": (50257, 768, 12, 12),
}


def gpt2(name: str, batch: int = 4, seq: int = 128, seed: int = 0):
    """A random-init GPT-2 of the named size, a token batch and its closure."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, d, layers, heads = GPT2_SIZES[name]
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads,
                     n_positions=max(seq, 128))
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)

    def closure(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m(input_ids=b, labels=b).loss

    return model, ids, closure


def resnet18(batch: int = 64, seed: int = 0):
    """ResNet-18 (32x32), a CIFAR-shaped random batch and its closure."""
    torch.manual_seed(seed)
    model = ResNet18()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def closure(m: nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    return model, (x, y), closure


def build(name: str, quick: bool = False):
    if name == "resnet18":
        return resnet18(batch=8 if quick else 64)
    return gpt2(name, batch=2 if quick else 4, seq=32 if quick else 128)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


def training_step(model: nn.Module, batch: Any, closure: Callable) -> dict:
    """One forward, backward and AdamW step on a copy of the model: seconds and peak bytes."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    times, peaks = [], []
    for _ in range(2):  # the first allocates the optimizer state
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            loss = closure(m, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak)
    del m, opt
    gc.collect()
    return {"seconds": times[-1], "peak_bytes": max(peaks), "first_seconds": times[0]}


def one_product(model: nn.Module, batch: Any, closure: Callable, reps: int = 2) -> dict:
    """Seconds of one exact Hessian-vector product on the cached graph (and its peak)."""
    op = Hessian(model, closure=closure, data=batch, single_batch=True)
    g = torch.Generator().manual_seed(0)
    v = tuple(torch.randn(s, generator=g) for s in op.shapes)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        op.matvec(v)  # builds the gradient graph
        build_s = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            op.matvec(v)
            times.append(time.perf_counter() - t0)
    out = {"first_seconds": build_s, "seconds": min(times), "peak_bytes": mem.peak}
    del op
    gc.collect()
    try:
        fo = Hessian(model, closure=closure, data=batch, single_batch=True,
                     backend="first_order")
    except Exception as err:  # the first-order backend has not landed
        out["first_order"] = f"not available: {type(err).__name__}: {err}"[:120]
        return out
    try:
        with PeakMemory() as mem:
            fo.matvec(v)
            t0 = time.perf_counter()
            fo.matvec(v)
            secs = time.perf_counter() - t0
        out["first_order"] = {"seconds": secs, "peak_bytes": mem.peak}
    except Exception as err:
        out["first_order"] = f"failed: {type(err).__name__}: {err}"[:120]
    return out


def product_vs_pyhessian(model: nn.Module, batch: Any, closure: Callable, reps: int = 3) -> dict:
    """One exact product, ours and PyHessian's, interleaved on the same model, batch and v.

    PyHessian's path is its own code (``pyhessian.utils``): the loss's ``backward(
    create_graph=True)``, ``get_params_grad`` and ``hessian_vector_product`` on the kept
    gradient graph, as its ``hessian`` class does for one batch (its class needs
    ``criterion(model(x), y)``, which a Hugging Face closure is not). Both graphs are built
    first (not timed); then ``reps`` rounds, each timing ours then theirs (order alternating),
    and the minimum of each.
    """
    from pyhessian.utils import get_params_grad, hessian_vector_product  # GPL: benchmark only

    op = Hessian(model, closure=closure, data=batch, single_batch=True)
    g = torch.Generator().manual_seed(0)
    v = tuple(torch.randn(s, generator=g) for s in op.shapes)
    ours = op.matvec(v)  # builds our graph
    theirs_model = copy.deepcopy(model)
    loss = closure(theirs_model, batch)
    loss.backward(create_graph=True)
    params, grads_h = get_params_grad(theirs_model)
    theirs = hessian_vector_product(grads_h, params, list(v))
    diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(ours, theirs)))
    scale = math.sqrt(sum(float(b.pow(2).sum()) for b in theirs))
    t_ours, t_theirs = [], []
    for i in range(reps):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            if which == 0:
                op.matvec(v)
            else:
                hessian_vector_product(grads_h, params, list(v))
            (t_ours if which == 0 else t_theirs).append(time.perf_counter() - t0)
    del op, theirs_model, grads_h, params, loss
    gc.collect()
    return {"seconds": min(t_ours), "pyhessian_seconds": min(t_theirs),
            "ratio": min(t_ours) / min(t_theirs), "all_ours": t_ours, "all_theirs": t_theirs,
            "relative_difference": diff / scale}


def eigen_history(model: nn.Module, batch: Any, closure: Callable, *, k: int, max_matvec: int,
                  log: Callable[[str], None], max_basis: int | None = None,
                  start_from: str = "random") -> dict:
    """``top_eigenvalues``' Lanczos run to ``max_matvec`` products, recording every step.

    ``start_from="gradient"``: the unit gradient plus the unit Gaussian start (tests/
    benchmarks/bench_start_vector.py) instead of the Gaussian alone.
    """
    op = Hessian(model, closure=closure, data=batch, single_batch=True)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.dtype)
    if start_from == "gradient":
        start = gradient_start(op, start)
    hist: list[dict] = []
    t0 = time.perf_counter()

    def cb(info: dict) -> None:
        th, rs = info["theta"], info["residuals"]
        row = {"n": info["n_matvec"], "s": time.perf_counter() - t0,
               "theta": [float(x) for x in th[::-1][: k + 1]],
               "res": [float(x) for x in rs[::-1][: k + 1]]}
        hist.append(row)
        log(f"  {row['n']:3d} {row['s']:8.1f}s theta={row['theta'][0]:.6g} "
            f"rel.res={row['res'][0] / abs(row['theta'][0]):.2e}")

    with PeakMemory() as mem:
        krylov_eigsh(op.flat_matvec, start, k=k, tol=1e-12, max_matvec=max_matvec,
                     min_matvec=max_matvec, generator=gen, callback=cb,
                     max_basis=max_basis)
    return {"history": hist, "peak_bytes": mem.peak, "seconds": time.perf_counter() - t0}


def product_precision(model: nn.Module, batch: Any, closure: Callable) -> dict:
    """How far a float32 product is from the float64 one, and from symmetry.

    ``y``: a Ritz vector near the top eigenvector (18 products, a basis of 6); the relative
    difference of its float32 and float64 products (a float64 copy of the model), the
    float32 relative residual of ``y``, and ``|<u, H v> - <v, H u>| / |H v|`` for two
    random unit vectors.
    """
    op = Hessian(model, closure=closure, data=batch, single_batch=True)
    res = top_eigenvalues(op, k=1, max_matvec=18, tol=1e-12, max_basis=6)
    theta = float(res.values[0])
    y = torch.cat([t.reshape(-1) for t in res.vectors[0]]).float()
    y = y / y.norm()
    hy32 = op.flat_matvec(y).double()
    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(op.dim, generator=gen) for _ in range(2))
    u, v = u / u.norm(), v / v.norm()
    hu, hv = op.flat_matvec(u).double(), op.flat_matvec(v).double()
    asym = abs(float(u.double() @ hv) - float(v.double() @ hu)) / float(hv.norm())
    del op, res
    m64 = copy.deepcopy(model).double()
    hy64 = Hessian(m64, closure=closure, data=batch, single_batch=True).flat_matvec(y.double())
    del m64
    return {"theta": theta,
            "float32_vs_float64": float((hy32 - hy64).norm() / hy64.norm()),
            "residual_float32": float((hy32 - theta * y.double()).norm()) / theta,
            "asymmetry_random": asym}


def pyhessian_top1(model: nn.Module, batch: Any, criterion: Callable) -> dict:
    """PyHessian's ``eigenvalues(top_n=1)`` at its defaults, products counted."""
    from pyhessian import hessian as pyh  # GPL: imported only inside this benchmark

    mod = sys.modules["pyhessian.hessian"]  # the module, not the class it exports

    count = {"n": 0}
    orig = mod.hessian_vector_product

    def counted(*a: Any, **kw: Any) -> Any:
        count["n"] += 1
        return orig(*a, **kw)

    mod.hessian_vector_product = counted
    try:
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            h = pyh(m, criterion, data=batch, cuda=False)
            vals, _ = h.eigenvalues(top_n=1)
            secs = time.perf_counter() - t0
    finally:
        mod.hessian_vector_product = orig
    return {"value": float(vals[0]), "n_matvec": count["n"], "seconds": secs,
            "peak_bytes": mem.peak}


def eigen_run(model: nn.Module, batch: Any, closure: Callable, k: int, **kw: Any) -> dict:
    """``top_eigenvalues`` at its defaults (plus ``kw``): value, products, seconds, peak."""
    op = Hessian(model, closure=closure, data=batch, single_batch=True)
    t0 = time.perf_counter()
    res = top_eigenvalues(op, k=k, **kw)
    out = {"values": [float(v) for v in res.values], "n_matvec": res.n_matvec,
           "converged": res.converged, "seconds": time.perf_counter() - t0,
           "peak_bytes": res.peak_memory,
           "rel_residual": float(res.residuals[0] / abs(res.values[0]))}
    if res.memory_plan is not None:
        plan = res.memory_plan
        out["plan"] = {"budget": plan.budget, "estimate": plan.estimate,
                       "microbatch_size": plan.microbatch_size, "max_basis": plan.max_basis,
                       "offload": plan.offload, "backend": plan.backend,
                       "step_bytes": plan.step_bytes}
    return out


def trace_run(model: nn.Module, batch: Any, closure: Callable, n_matvec: int) -> dict:
    """``hessian_trace`` (krylov, the monitor's budget): value, stderr, seconds, peak."""
    op = Hessian(model, closure=closure, data=batch, single_batch=True)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = hessian_trace(op, "krylov", n_matvec=n_matvec)
        secs = time.perf_counter() - t0
    return {"value": res.value, "stderr": res.stderr, "n_matvec": res.n_matvec,
            "seconds": secs, "peak_bytes": mem.peak}


def first_order_accuracy(model: nn.Module, batch: Any, closure: Callable,
                         max_matvec: int) -> dict:
    """First-order Hessian products against exact ones where it is hardest (:func:`_accuracy`)."""

    def make(**extra: Any) -> Hessian:
        return Hessian(model, closure=closure, data=batch, single_batch=True, **extra)

    return _accuracy(make, max_matvec)


def _accuracy(make: Callable[..., Any], max_matvec: int, timed: bool = False) -> dict:
    """First-order products of ``make(backend="first_order")`` against ``make()``'s.

    The exact ``top_eigenvalues(k=1, tol=1e-4)`` gives ``u``; then, on a fresh first-order
    operator, the relative error of the product along a random direction, along ``u``
    (which refines the step: docs/curvature.md, "The step along sharp directions") and
    along the random direction again (at the refined step); then ``top_eigenvalues`` on
    first-order products. ``timed``: one product's time too, exact and first-order.
    """
    from landscape.params import flatten

    exact = make()
    t0 = time.perf_counter()
    ref = top_eigenvalues(exact, k=1, tol=1e-4, max_matvec=max_matvec)
    out: dict[str, Any] = {"exact_top1": {"value": float(ref.values[0]),
                                          "n_matvec": ref.n_matvec, "converged": ref.converged,
                                          "seconds": time.perf_counter() - t0}}
    u = flatten(ref.vectors[0])
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
    v /= v.norm()
    if timed:
        for name, op in (("exact_product_s", exact), ("first_order_product_s",
                                                       make(backend="first_order"))):
            op.flat_matvec(v)  # warm
            t0 = time.perf_counter()
            op.flat_matvec(v)
            out[name] = time.perf_counter() - t0
    fo = make(backend="first_order")
    for name, w in (("random_before", v), ("along_top", u), ("random_after", v)):
        want = exact.flat_matvec(w)
        out[name] = float((fo.flat_matvec(w) - want).norm() / want.norm())
    out["refined"] = fo._first_order.refined
    fresh = make(backend="first_order")
    t0 = time.perf_counter()
    res = top_eigenvalues(fresh, k=1, tol=1e-4, max_matvec=max_matvec)
    out["first_order_top1"] = {"value": float(res.values[0]), "n_matvec": res.n_matvec,
                               "converged": res.converged, "refined": fresh._first_order.refined,
                               "seconds": time.perf_counter() - t0,
                               "rel_error": abs(float(res.values[0]) - float(ref.values[0]))
                               / abs(float(ref.values[0]))}
    return out


def ggn_parts(model: nn.Module, batch: Any) -> tuple[Callable, Any, dict[str, Any]]:
    """``(loss_fn, data, options)`` of the GGN of the model's cross-entropy on ``batch``."""
    if isinstance(batch, tuple):  # ResNet-18: (images, labels)
        return F.cross_entropy, batch, {}

    def forward(m: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = m(input_ids=ids).logits[:, :-1]  # next-token prediction, as GPT-2's loss
        return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)

    return F.cross_entropy, batch, {"forward": forward}


def ggn_first_order_accuracy(model: nn.Module, batch: Any, max_matvec: int) -> dict:
    """:func:`_accuracy` for the GGN of the cross-entropy, with one product's time.

    The first-order GGN product Richardson-extrapolates ``J v`` from four outputs and
    refines its step along sharp directions (docs/curvature.md, "The GGN's step").
    """
    loss_fn, data, kw = ggn_parts(model, batch)

    def make(**extra: Any) -> GGN:
        return GGN(model, loss_fn, data, single_batch=True, **kw, **extra)

    return _accuracy(make, max_matvec, timed=True)


def density_runs(model: nn.Module, batch: Any, closure: Callable, steps: int,
                 budgets: list[str], bases: tuple[str, ...] = ("full", "local")) -> dict:
    """``spectral_density`` (one probe) with the full and the local basis, then the plans.

    Each basis: seconds, peak, the quadrature's first moments ``sum_k w_k theta_k^j``
    (``j`` = 1..4) and the largest node (its ghosts: nodes within 1e-4 relative of it).
    Then, per budget, the run the plan makes (which basis, micro-batches and backend),
    with its seconds, peak and moments' relative difference from the full basis's.
    """

    def run(**kw: Any) -> dict:
        op = Hessian(model, closure=closure, data=batch, single_batch=True)
        t0 = time.perf_counter()
        res = spectral_density(op, steps, 1, **kw)
        nodes = res.nodes[res.valid]
        top = float(nodes.max())
        rec = {"seconds": time.perf_counter() - t0, "peak_bytes": res.peak_memory,
               "n_matvec": res.n_matvec, "reorthogonalize": res.reorthogonalize,
               "moments": [res.moment(j) for j in range(1, 5)], "top_node": top,
               "top_copies": int(((nodes - top).abs() <= 1e-4 * abs(top)).sum())}
        plan = res.memory_plan
        if plan is not None:
            rec["plan"] = {"estimate": plan.estimate, "budget": plan.budget,
                           "microbatch_size": plan.microbatch_size, "backend": plan.backend}
        del op, res
        gc.collect()
        return rec

    def differences(rec: dict) -> list[float]:
        return [abs(a - b) / abs(a) for a, b in zip(out["full"]["moments"], rec["moments"])]

    out: dict[str, Any] = {basis: run(reorthogonalize=basis) for basis in bases}
    if "full" in out and "local" in out:
        out["moment_rel_diff"] = differences(out["local"])
    out["budgets"] = {}
    for budget in budgets:
        try:
            rec = run(memory_budget=budget)
            if "full" in out:
                rec["moment_rel_diff"] = differences(rec)
        except LandscapeError as err:
            rec = {"refused": str(err)}
        out["budgets"][budget] = rec
    return out


def surface_point(model: nn.Module, batch: Any, closure: Callable) -> dict:
    """One landscape point: the loss at ``theta + 0.1 d`` (no grad), as a grid point costs."""
    from landscape.isolation import stateless_closure

    g = torch.Generator().manual_seed(0)
    named = dict(model.named_parameters())
    moved = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in named.items()}
    with PeakMemory() as mem, torch.no_grad():
        t0 = time.perf_counter()
        loss = stateless_closure(model, closure, moved, batch)
        secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_bytes": mem.peak, "loss": float(loss)}


def preset_step(model: nn.Module, batch: Any, closure: Callable, name: str) -> dict:
    """One monitor step with every metric of preset ``name`` due (step 0)."""
    import tempfile

    import landscape as ls

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        with ls.Monitor(m, closure=closure, path=f"{tmp}/run.h5", optimizer=opt,
                        metrics=name, probe=batch, alarms=False, warn=False) as mon:
            m.train()
            loss = closure(m, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                mon.step(0, batch=batch, loss=loss)
                secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_bytes": mem.peak}


def _units(rec: dict) -> None:
    """Print every measurement of one model in units of its training step."""
    step = rec.get("step")
    if not step:
        return
    s, b = step["seconds"], max(step["peak_bytes"], 1)
    print(f"  training step: {s:.3g} s, peak {b / 2**30:.3g} GiB")
    for key, val in rec.items():
        if isinstance(val, dict) and "seconds" in val and key != "step":
            peak = val.get("peak_bytes")
            extra = f", n_matvec {val['n_matvec']}" if "n_matvec" in val else ""
            mem = f", peak {peak / b:.2f} x step" if peak is not None else ""
            print(f"  {key}: {val['seconds'] / s:.2f} x step{mem}{extra}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,gpt2-mid")
    ap.add_argument("--sections", default="step,product,top1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pyhessian", action="store_true")
    ap.add_argument("--max-matvec", type=int, default=30)
    ap.add_argument("--max-basis", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--start", choices=("random", "gradient"), default="random",
                    help="the top1 section's start vector")
    ap.add_argument("--budgets", default="auto,1x step,1.5x step,3x step",
                    help="memory budgets of the plan, budget and density sections, "
                    "comma-separated (empty: none)")
    ap.add_argument("--density-bases", default="full,local",
                    help="the density section's bases without a budget (full, local)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models.split(",")
    sections = args.sections.split(",")
    if args.quick:
        models = [m for m in models if m in ("resnet18", "gpt2-1m", "gpt2-10m")] or ["gpt2-1m"]
    out: dict[str, Any] = {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    for name in models:
        model, batch, closure = build(name, args.quick)
        model.eval()
        rec: dict[str, Any] = {"parameters": n_params(model)}
        out[name] = rec
        log(f"== {name}: {rec['parameters'] / 1e6:.2f}M parameters")
        if "step" in sections:
            rec["step"] = training_step(model, batch, closure)
            log(f"step: {rec['step']}")
        if "product" in sections:
            rec["product"] = one_product(model, batch, closure)
            log(f"product: {rec['product']}")
        if "vs_pyhessian" in sections:
            rec["vs_pyhessian"] = product_vs_pyhessian(model, batch, closure,
                                                       reps=1 if args.quick else 3)
            log(f"product vs pyhessian: {rec['vs_pyhessian']}")
        if "history" in sections or "top1" in sections:
            mm = 4 if args.quick else args.max_matvec
            rec["top1_history"] = eigen_history(model, batch, closure, k=1, max_matvec=mm, log=log,
                                                max_basis=args.max_basis, start_from=args.start)
        if args.pyhessian and name == "resnet18":
            rec["pyhessian_top1"] = pyhessian_top1(model, batch, F.cross_entropy)
            log(f"pyhessian: {rec['pyhessian_top1']}")
        quick_kw = {"max_matvec": 4} if args.quick else {}
        if "precision" in sections:
            rec["precision"] = product_precision(model, batch, closure)
            log(f"precision: {rec['precision']}")
        if "eig" in sections:
            rec["top1"] = eigen_run(model, batch, closure, 1, **quick_kw)
            log(f"top1: {rec['top1']}")
        if "budget" in sections:
            for budget in args.budgets.split(","):
                key = f"top1_budget_{budget.split('x')[0]}x"
                try:
                    rec[key] = eigen_run(model, batch, closure, 1, memory_budget=budget,
                                         **quick_kw)
                except LandscapeError as err:
                    rec[key] = {"refused": str(err)}
                log(f"top1 within {budget}: {rec[key]}")
        if "plan" in sections:
            from landscape.curvature.memory import plan_eigen

            op = Hessian(model, closure=closure, data=batch, single_batch=True)
            rec["plan"] = {}
            for budget in args.budgets.split(","):
                try:  # the vectors top_eigenvalues(k=1) plans with
                    p = plan_eigen(op, budget=budget, basis_vectors=82, least_basis=2,
                                   extra_vectors=9)
                    rec["plan"][budget] = {
                        "budget": p.budget, "step_bytes": p.step_bytes,
                        "product_bytes": p.product_bytes, "estimate": p.estimate,
                        "max_basis": p.max_basis, "microbatch_size": p.microbatch_size,
                        "backend": p.backend}
                except LandscapeError as err:
                    rec["plan"][budget] = {"refused": str(err)}
                log(f"plan {budget}: {rec['plan'][budget]}")
        if "top5" in sections:
            rec["top5"] = eigen_run(model, batch, closure, 5, **quick_kw)
            log(f"top5: {rec['top5']}")
        if "trace" in sections:
            rec["trace"] = trace_run(model, batch, closure, 4 if args.quick else 30)
            log(f"trace: {rec['trace']}")
        if "first_order" in sections:
            rec["first_order"] = first_order_accuracy(model, batch, closure,
                                                      4 if args.quick else args.max_matvec)
            log(f"first-order accuracy: {rec['first_order']}")
        if "ggn_first_order" in sections:
            rec["ggn_first_order"] = ggn_first_order_accuracy(
                model, batch, 4 if args.quick else args.max_matvec)
            log(f"GGN first-order accuracy: {rec['ggn_first_order']}")
        if "density" in sections:
            rec["density"] = density_runs(model, batch, closure, 4 if args.quick else 30,
                                          [b for b in args.budgets.split(",") if b],
                                          tuple(args.density_bases.split(",")))
            log(f"density: {rec['density']}")
        if "surface" in sections:
            rec["surface"] = surface_point(model, batch, closure)
            log(f"surface point: {rec['surface']}")
        if "presets" in sections:
            for preset in ("cheap", "standard"):
                try:
                    rec[f"preset_{preset}"] = preset_step(model, batch, closure, preset)
                except Exception as err:  # a metric the model cannot serve
                    rec[f"preset_{preset}"] = {"error": f"{type(err).__name__}: {err}"[:200]}
                log(f"preset {preset}: {rec[f'preset_{preset}']}")
        _units(rec)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
