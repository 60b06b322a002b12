"""Curvature engine beside PyHessian, in one process (issue 3, "Must show").

    .venv/bin/python -m tests.benchmarks.bench_curvature [--reps 3] [--sections eig,trace,...]

Sections (all by default):

* ``eig``: top-5 Hessian eigenvalues of a ~26k-parameter MLP and a small SDPA transformer.
  Truth: ``scipy.sparse.linalg.eigsh`` (ARPACK, an independent Lanczos code) at
  ``tol=1e-13`` on the float64 Hessian-vector product, certified by its residuals. Ours
  (``top_eigenvalues(k=5)``) and PyHessian (``eigenvalues(top_n=5)``, defaults
  ``maxIter=100, tol=1e-3``; power iteration with deflation, largest *magnitude*) run
  interleaved, each from a fresh copy of the model, float64, one thread. Matvecs, median
  wall time, max relative error vs the truth, and the cost of one HVP measured separately.
* ``trace``: Hutch++ vs Hutchinson at equal matvecs, mean relative error over many seeds,
  on the Hessian and the GGN of small models with a dense float64 truth; PyHessian's
  ``trace()`` (its own stopping rule) for comparison.
* ``track``: warm-started lambda_max over 20 nearby SGD steps vs cold starts.
* ``slq``: spectral density, ours vs PyHessian's ``density()``.
* ``memory``: peak RSS above the loaded state, in a fresh subprocess per measurement, for
  our top-5 computation and for one training step (forward, backward, AdamW step) of the
  transformer in float32.

PyHessian (GPL) is imported only inside this benchmark. The machine is shared, so every
timing is a median over interleaved repetitions with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature import (
    GGN,
    Hessian,
    MatrixOperator,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)
from landscape.isolation import sdpa_math
from tests.models import TinyTransformer, mlp

SECTIONS = ("eig", "trace", "track", "slq", "memory")
TRACE_METHODS = ("hutchinson", "hutch++", "krylov")


# ------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------
def lm_criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _teacher_data(n: int, d_in: int, n_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, n_classes, generator=g)
    y = (torch.tanh(x @ w) + 0.3 * torch.randn(n, n_classes, generator=g)).argmax(1)
    return x.to(torch.get_default_dtype()), y


def _train(model: nn.Module, loss_fn: Callable, batch: tuple, steps: int, lr: float,
           adam: bool = False) -> None:
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if adam
           else torch.optim.SGD(model.parameters(), lr=lr))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def mlp_problem(big: bool = True) -> tuple[str, nn.Module, Callable, tuple]:
    """Tanh MLP 64-128-128-10 (26,122 parameters), 512 samples; or a small 20-40-40-5 one."""
    if big:
        model, d_in, k, n = mlp(d_in=64, hidden=128, d_out=10, depth=3, seed=0), 64, 10, 512
    else:
        model, d_in, k, n = mlp(d_in=20, hidden=40, d_out=5, depth=3, seed=0), 20, 5, 256
    model = model.to(torch.get_default_dtype())
    batch = _teacher_data(n, d_in, k, seed=1)
    _train(model, F.cross_entropy, batch, steps=100, lr=0.2)
    name = "MLP 64-128-128-10" if big else "MLP 20-40-40-5"
    return name, model, F.cross_entropy, batch


def digits_problem() -> tuple[str, nn.Module, Callable, tuple]:
    """Tanh MLP 64-32-32-10 (3,466 parameters) trained on 512 of scikit-learn's digits.

    200 Adam steps reach 100% training accuracy (loss ~0.03): a trained 10-class classifier,
    whose Hessian has the usual few outliers above a small bulk (Papyan 2020), unlike the
    briefly trained teacher problems above. scikit-learn ships the data (no download).
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images[:512] / 16.0, dtype=torch.get_default_dtype())
    y = torch.tensor(labels[:512])
    model = mlp(d_in=64, hidden=32, d_out=10, depth=3, seed=0).to(torch.get_default_dtype())
    _train(model, F.cross_entropy, (x, y), steps=200, lr=3e-3, adam=True)
    return "MLP 64-32-32-10 on digits, trained", model, F.cross_entropy, (x, y)


def transformer_problem(size: str = "bench") -> tuple[str, nn.Module, Callable, tuple]:
    """TinyTransformer (SDPA, causal) on a learnable token pattern, after 60 Adam steps."""
    if size == "bench":
        vocab, d, heads, layers, seq, n = 64, 48, 4, 2, 32, 16
    else:  # small enough for a dense Hessian
        vocab, d, heads, layers, seq, n = 16, 12, 2, 1, 12, 16
    model = TinyTransformer(vocab=vocab, d=d, heads=heads, layers=layers, seq=seq, seed=0)
    model = model.to(torch.get_default_dtype())
    g = torch.Generator().manual_seed(2)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(seq + 1)) % vocab
    noise = torch.rand(ids.shape, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(0, vocab, ids.shape, generator=g), ids)
    batch = (ids[:, :-1], ids[:, 1:])
    with sdpa_math():
        _train(model, lm_criterion, batch, steps=60, lr=3e-3, adam=True)
    n_params = sum(p.numel() for p in model.parameters())
    name = f"TinyTransformer d={d} L={layers} seq={seq} ({n_params} p.)"
    return name, model, lm_criterion, batch


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread), Python {platform.python_version()}, "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            if x == 0 or math.isnan(x):
                return f"{x:.3g}"
            if abs(x) < 1e-2 or abs(x) >= 1e5:
                return f"{x:.2e}"
            return f"{x:.3g}"
        return str(x)

    cells = [[fmt(c) for c in r] for r in rows]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in cells:
        print("| " + " | ".join(r) + " |")
    print()


class PyHessianCounter:
    """Counts PyHessian's Hessian-vector products (wraps its module-level function)."""

    def __init__(self) -> None:
        import pyhessian  # noqa: F401  (GPL: imported only inside this benchmark)

        ph_mod = sys.modules["pyhessian.hessian"]  # the module, not the class it exports
        self.mod = ph_mod
        self.count = 0
        original = ph_mod.hessian_vector_product

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        ph_mod.hessian_vector_product = counted

    def make(self, model: nn.Module, loss_fn: Callable, batch: tuple) -> Any:
        # PyHessian runs model(x) itself; the math SDPA backend makes the transformer's
        # attention twice differentiable for it as it does for us
        with sdpa_math():
            return self.mod.hessian(model, loss_fn, data=batch, cuda=False)


def rel_err(est: list[float], truth: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(est, truth))


# ------------------------------------------------------------------------------------------
# section: top-5 eigenvalues
# ------------------------------------------------------------------------------------------
def reference_top(model: nn.Module, loss_fn: Callable, batch: tuple, k: int) -> dict:
    """Truth by ARPACK (scipy eigsh, which='LA' and 'LM'), tol 1e-13, float64."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = Hessian(copy.deepcopy(model).double(), loss_fn, batch, backend="autograd")
    n = op.dim

    def mv(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x.reshape(-1))).to(torch.float64)
        return op.flat_matvec(t).numpy()

    lin = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    out = {}
    for which in ("LA", "LM"):
        before = op.n_matvec
        vals, vecs = eigsh(lin, k=k, which=which, tol=1e-13, ncv=max(4 * k, 40),
                           v0=np.ones(n) / math.sqrt(n))
        order = np.argsort(-vals) if which == "LA" else np.argsort(-np.abs(vals))
        vals, vecs = vals[order], vecs[:, order]
        res = [float(np.linalg.norm(mv(vecs[:, i]) - vals[i] * vecs[:, i])) for i in range(k)]
        out[which] = {"values": [float(v) for v in vals], "residuals": res,
                      "matvecs": op.n_matvec - before}
    return out


def section_eig(reps: int, tols: list[float]) -> dict:
    print("## Top-5 Hessian eigenvalues: ours vs PyHessian\n")
    counter = PyHessianCounter()
    results = {}
    for problem in (mlp_problem(True), transformer_problem("bench")):
        name, result = eig_problem(problem, counter, reps, tols)
        results[name] = result
    return results


def eig_problem(problem: tuple, counter: PyHessianCounter, reps: int,
                tols: list[float]) -> tuple[str, dict]:
    name, model, loss_fn, batch = problem
    print(f"### {name}: {n_params(model)} parameters, batch {batch[0].shape[0]}, float64\n")
    ref, t_ref = timed(lambda: reference_top(model, loss_fn, batch, 5))
    truth = ref["LA"]["values"]
    truth_lm = ref["LM"]["values"]
    print(f"truth (ARPACK eigsh, {ref['LA']['matvecs']} matvecs, {t_ref:.1f} s): "
          f"{[f'{v:.10g}' for v in truth]}; max residual "
          f"{max(ref['LA']['residuals']):.1e}; largest magnitude: "
          f"{[f'{v:.6g}' for v in truth_lm]}\n")

    # one HVP, both implementations, on the cached gradient graph
    op = Hessian(copy.deepcopy(model), loss_fn, batch)
    vec = op._check(tuple(torch.randn_like(p) for p in op.parameters), "v")
    op.matvec(vec)
    ph = counter.make(copy.deepcopy(model), loss_fn, batch)
    from pyhessian.utils import hessian_vector_product as ph_hvp

    hv_ours: list[float] = []
    hv_ph: list[float] = []

    def time_hvps() -> None:
        # measured inside every repetition, so the load seen by the HVP timing and by the
        # solver runs is alike
        for _ in range(5):
            hv_ours.append(timed(lambda: op.matvec(vec))[1])
            hv_ph.append(timed(lambda: ph_hvp(ph.gradsH, ph.params, list(vec)))[1])

    runs: dict[str, dict[str, list]] = {}

    def run_ours(tol: float) -> tuple[list[float], int, bool]:
        op = Hessian(copy.deepcopy(model), loss_fn, batch)
        eig = top_eigenvalues(op, k=5, tol=tol)
        return [float(v) for v in eig.values], eig.n_matvec, eig.converged

    def run_ph(tol: float) -> tuple[list[float], int, bool]:
        counter.count = 0
        h = counter.make(copy.deepcopy(model), loss_fn, batch)
        vals, _ = h.eigenvalues(top_n=5, tol=tol, maxIter=100)
        return [float(v) for v in vals], counter.count, True

    variants: list[tuple[str, Callable[[], Any]]] = []
    for tol in tols:
        variants.append((f"ours tol={tol:g}", lambda tol=tol: run_ours(tol)))
    variants.append(("PyHessian defaults (tol=1e-3)", lambda: run_ph(1e-3)))
    variants.append(("PyHessian tol=1e-6", lambda: run_ph(1e-6)))
    for r in range(reps):
        order = variants if r % 2 == 0 else variants[::-1]
        time_hvps()
        for label, fn in order:
            (vals, mvs, conv), wall = timed(fn)
            d = runs.setdefault(label, {"wall": [], "matvecs": [], "values": [], "conv": []})
            d["wall"].append(wall)
            d["matvecs"].append(mvs)
            d["values"].append(vals)
            d["conv"].append(conv)
    time_hvps()
    t_hvp, t_hvp_ph = median(hv_ours), median(hv_ph)
    rows = []
    base = runs["PyHessian defaults (tol=1e-3)"]
    base_wall, base_mv = median(base["wall"]), median(base["matvecs"])
    summary = {}
    for label, d in runs.items():
        wall, mv = median(d["wall"]), median(d["matvecs"])
        err = max(rel_err(sorted(v, reverse=True), truth) for v in d["values"])
        err_lm = max(
            rel_err(sorted(v, key=abs, reverse=True), truth_lm) for v in d["values"]
        )
        rows.append([label, mv, wall, err, err_lm, mv / base_mv, wall / base_wall,
                     wall / (mv * t_hvp)])
        summary[label] = {"matvecs": mv, "wall_s": wall, "max_rel_err": err,
                          "max_rel_err_vs_largest_magnitude": err_lm,
                          "matvec_ratio": mv / base_mv, "wall_ratio": wall / base_wall,
                          "wall_over_matvecs_x_hvp": wall / (mv * t_hvp),
                          "values_first_rep": d["values"][0]}
    print(f"one HVP (cached graph, median): ours {1e3 * t_hvp:.2f} ms, PyHessian "
          f"{1e3 * t_hvp_ph:.2f} ms\n")
    print_table(["method", "matvecs", "wall s", "max rel err (top-5 algebraic)",
                 "max rel err (top-5 |λ|)", "matvecs / PyH", "wall / PyH",
                 "wall / (matvecs x HVP)"], rows)
    return name, {"truth": ref, "hvp_s": t_hvp, "hvp_pyhessian_s": t_hvp_ph,
                  "runs": summary}


# ------------------------------------------------------------------------------------------
# section: trace
# ------------------------------------------------------------------------------------------
def dense(op: Any) -> torch.Tensor:
    a = op.to_dense().double()
    return 0.5 * (a + a.T)


def section_trace(n_seeds: int, budgets: list[int]) -> dict:
    print("## Trace: Hutchinson, Hutch++ and Krylov at equal matvecs, PyHessian's trace()\n")
    counter = PyHessianCounter()
    results = {}
    for problem in (mlp_problem(False), transformer_problem("dense"), digits_problem()):
        name, model, loss_fn, batch = problem
        hess = Hessian(model, loss_fn, batch, backend="autograd")
        mats = {"Hessian": dense(hess),
                "GGN": dense(GGN(model, loss_fn, batch, backend="autograd"))}
        for what, a in mats.items():
            evals = torch.linalg.eigvalsh(a)
            exact = float(a.trace())
            fro2 = float((a**2).sum())
            off = 1 - float((a.diagonal() ** 2).sum()) / fro2
            top = {s: float((evals.abs().sort(descending=True).values[:s] ** 2).sum()) / fro2
                   for s in (5, 10, 20, 40)}
            print(f"### {name} ({a.shape[0]} parameters), {what}: trace {exact:.6g}, "
                  f"λ range [{float(evals[0]):.3g}, {float(evals[-1]):.3g}], "
                  f"sum|λ| {float(evals.abs().sum()):.4g}; off-diagonal share of ||A||_F² "
                  f"{off:.3f} (Rademacher-Hutchinson variance ∝ it); share of the top-s λ² in "
                  f"||A||_F²: " + ", ".join(f"s={s}: {v:.3f}" for s, v in top.items()) + "\n")
            op = MatrixOperator(a)
            rows = []
            res = {}
            for m in budgets:
                errs: dict[str, list[float]] = {k: [] for k in TRACE_METHODS}
                cover: dict[str, int] = {k: 0 for k in TRACE_METHODS}
                for seed in range(n_seeds):
                    for method in errs:
                        t = hessian_trace(op, method, m, seed=seed)
                        errs[method].append(abs(t.value - exact) / abs(exact))
                        cover[method] += abs(t.value - exact) <= 2 * t.stderr
                mean_err = {k: float(np.mean(v)) for k, v in errs.items()}
                e_h = mean_err["hutchinson"]
                rows.append([m, e_h, mean_err["hutch++"], mean_err["krylov"],
                             mean_err["hutch++"] / e_h, mean_err["krylov"] / e_h,
                             *(cover[k] / n_seeds for k in TRACE_METHODS)])
                res[m] = {**mean_err, "hutch++_ratio": mean_err["hutch++"] / e_h,
                          "krylov_ratio": mean_err["krylov"] / e_h,
                          "coverage": {k: cover[k] / n_seeds for k in TRACE_METHODS}}
            print_table(["matvecs", "Hutchinson mean rel err", "Hutch++ mean rel err",
                         "Krylov mean rel err", "Hutch++ / Hutchinson",
                         "Krylov / Hutchinson", "Hutchinson within 2 s.e.",
                         "Hutch++ within 2 s.e.", "Krylov within 2 s.e."], rows)
            if what == "Hessian":
                ph_err, ph_n = [], []
                for seed in range(n_seeds):
                    torch.manual_seed(seed)
                    h = counter.make(copy.deepcopy(model), loss_fn, batch)
                    samples = h.trace(maxIter=100, tol=1e-3)
                    ph_err.append(abs(float(np.mean(samples)) - exact) / abs(exact))
                    ph_n.append(len(samples))
                mean_n = float(np.mean(ph_n))
                same = hessian_trace(op, "hutch++", max(3, round(mean_n)), seed=0)
                pp = [abs(hessian_trace(op, "hutch++", max(3, round(mean_n)), seed=s).value
                          - exact) / abs(exact) for s in range(n_seeds)]
                print(f"PyHessian trace(maxIter=100, tol=1e-3) over {n_seeds} seeds: "
                      f"{mean_n:.1f} matvecs on average (min {min(ph_n)}, max {max(ph_n)}), "
                      f"mean rel err {np.mean(ph_err):.3g}, max {np.max(ph_err):.3g}; "
                      f"ours Hutch++ at {same.n_matvec} matvecs: mean rel err "
                      f"{np.mean(pp):.3g}, max {np.max(pp):.3g}\n")
                res["pyhessian"] = {"mean_matvecs": mean_n, "mean_rel_err": float(np.mean(ph_err)),
                                    "max_rel_err": float(np.max(ph_err)),
                                    "hutchpp_same_budget_mean_rel_err": float(np.mean(pp))}
            results[f"{name} {what}"] = res
    return results


# ------------------------------------------------------------------------------------------
# section: warm-started tracking
# ------------------------------------------------------------------------------------------
def section_track(steps: int = 20) -> dict:
    print(f"## Warm-started λ_max tracking over {steps} SGD steps (k=1, tol=1e-3)\n")
    rows, results = [], {}
    for problem, lr in ((mlp_problem(True), 0.05), (transformer_problem("bench"), 0.01)):
        name, model, loss_fn, batch = problem
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        prev = None
        warm_mv, cold_mv, warm_t, cold_t, diffs = [], [], [], [], []
        for _ in range(steps):
            with sdpa_math():
                opt.zero_grad()
                loss_fn(model(batch[0]), batch[1]).backward()
                opt.step()
            op = Hessian(model, loss_fn, batch)
            warm, tw = timed(lambda op=op, prev=prev: top_eigenvalues(op, k=1, warm_start=prev))
            op = Hessian(model, loss_fn, batch)
            cold, tc = timed(lambda op=op: top_eigenvalues(op, k=1))
            warm_mv.append(warm.n_matvec)
            cold_mv.append(cold.n_matvec)
            warm_t.append(tw)
            cold_t.append(tc)
            diffs.append(abs(warm.lambda_max - cold.lambda_max) / abs(cold.lambda_max))
            prev = warm
        # the first warm measurement is a cold start (nothing to start from)
        rows.append([name, float(np.mean(warm_mv)), float(np.mean(warm_mv[1:])),
                     float(np.mean(cold_mv)), float(np.sum(warm_t)), float(np.sum(cold_t)),
                     max(diffs), f"{cold.lambda_max:.4g}"])
        results[name] = {"warm_mean": float(np.mean(warm_mv)),
                         "warm_mean_excluding_first": float(np.mean(warm_mv[1:])),
                         "cold_mean": float(np.mean(cold_mv)), "warm_matvecs": warm_mv,
                         "cold_matvecs": cold_mv, "max_rel_diff": max(diffs)}
    print_table(["model", "warm matvecs (mean, 20)", "warm (steps 2-20)", "cold matvecs (mean)",
                 "warm total s", "cold total s", "max rel diff warm vs cold", "final λ_max"],
                rows)
    return results


# ------------------------------------------------------------------------------------------
# section: SLQ
# ------------------------------------------------------------------------------------------
def section_slq(lanczos_steps: int = 80) -> dict:
    print(f"## Spectral density (SLQ, {lanczos_steps} Lanczos steps, 1 probe)\n")
    counter = PyHessianCounter()
    name, model, loss_fn, batch = mlp_problem(True)
    op = Hessian(copy.deepcopy(model), loss_fn, batch)
    rho, t_ours = timed(lambda: spectral_density(op, lanczos_steps=lanczos_steps, n_probes=1))
    mask = rho.valid
    lo, hi = float(rho.nodes[mask].min()), float(rho.nodes[mask].max())
    integral = float(torch.trapezoid(rho.density, rho.grid))
    counter.count = 0
    h = counter.make(copy.deepcopy(model), loss_fn, batch)
    t0 = time.perf_counter()
    try:
        h.density(iter=lanczos_steps, n_v=1)
        ph_outcome = "returned"
    except Exception as err:
        ph_outcome = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    t_ph = time.perf_counter() - t0
    rows = [["ours spectral_density", rho.n_matvec, t_ours,
             f"nodes in [{lo:.4g}, {hi:.4g}], density integrates to {integral:.4f}, "
             f"SLQ trace {rho.trace:.4g}"],
            ["PyHessian density", counter.count, t_ph, ph_outcome.replace("|", "/")]]
    print(f"### {name}\n")
    print_table(["method", "matvecs", "wall s", "outcome"], rows)
    return {"ours": {"matvecs": rho.n_matvec, "wall_s": t_ours, "range": [lo, hi],
                     "integral": integral, "trace": rho.trace},
            "pyhessian": {"matvecs_before_failure": counter.count, "wall_s": t_ph,
                          "outcome": ph_outcome}}


# ------------------------------------------------------------------------------------------
# section: memory (fresh subprocess per measurement)
# ------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(kind: str, batch_size: int) -> None:
    """One measurement: peak RSS above the loaded state (model, data, optimizer state)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, d, heads, layers, seq = 64, 48, 4, 2, 32
    model = TinyTransformer(vocab=vocab, d=d, heads=heads, layers=layers, seq=seq, seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch_size, seq + 1), generator=g)
    batch = (ids[:, :-1], ids[:, 1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        lm_criterion(model(batch[0]), batch[1]).backward()
        opt.step()

    # No warm-up step: freed activations would stay in the allocator's arena and hide the
    # next step's peak from the RSS. The measured training step therefore also allocates
    # AdamW's two state tensors (2 x params x 4 bytes, 0.35 MiB here).
    # reset the high-water mark (Linux >= 4.0: writing 5 to clear_refs resets VmHWM)
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        reset = False
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if kind == "train":
        train_step()
    elif kind == "train-math":  # the attention kernel our products must use
        with sdpa_math():
            train_step()
    elif kind == "top5":
        top_eigenvalues(Hessian(model, lm_criterion, batch), k=5, tol=1e-3)
    elif kind == "top5-func":
        top_eigenvalues(Hessian(model, lm_criterion, batch, backend="func"), k=5, tol=1e-3)
    elif kind.startswith("top5-micro"):  # e.g. top5-micro16: micro-batches of 16 samples
        size = int(kind[len("top5-micro"):])
        top_eigenvalues(Hessian(model, lm_criterion, batch, microbatch_size=size), k=5,
                        tol=1e-3)
    elif kind != "idle":
        raise ValueError(kind)
    wall = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(json.dumps({"kind": kind, "base_kib": base, "peak_kib": peak,
                      "delta_kib": peak - base, "reset": reset, "wall_s": wall,
                      "params": n_params(model)}))


def section_memory(reps: int, batch_sizes: list[int], microbatch: int = 16) -> dict:
    print("## Peak memory on the transformer (float32, fresh process per measurement)\n")
    micro = f"top5-micro{microbatch}"
    rows, results = [], {}
    # tensors above 64 KiB come from mmap and go back to the OS when freed, so the RSS
    # high-water mark follows the live tensor memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    for bs in batch_sizes:
        deltas: dict[str, list[int]] = {"train": [], "train-math": [], "top5": [], "idle": [],
                                        micro: []}
        peaks: dict[str, list[int]] = {k: [] for k in deltas}
        walls: dict[str, list[float]] = {k: [] for k in deltas}
        for _ in range(reps):
            for kind in deltas:
                out = subprocess.run(
                    [sys.executable, "-m", "tests.benchmarks.bench_curvature",
                     "--memory-child", kind, "--batch", str(bs)],
                    capture_output=True, text=True, check=True, env=env,
                    cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                        os.path.abspath(__file__)))),
                )
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                deltas[kind].append(rec["delta_kib"])
                peaks[kind].append(rec["peak_kib"])
                walls[kind].append(rec["wall_s"])
        d_train, d_top = median(deltas["train"]) / 1024, median(deltas["top5"]) / 1024
        d_idle = median(deltas["idle"]) / 1024
        d_math = median(deltas["train-math"]) / 1024
        p_train, p_top = median(peaks["train"]) / 1024, median(peaks["top5"]) / 1024
        d_micro = median(deltas[micro]) / 1024
        w_top, w_micro = median(walls["top5"]), median(walls[micro])
        rows.append([bs, rec["params"], d_idle, d_train, d_math, d_top, d_top / d_train,
                     d_top / d_math, d_micro, d_micro / d_train, w_top, w_micro,
                     p_train, p_top, p_top / p_train])
        results[bs] = {"idle_delta_mib": d_idle, "train_delta_mib": d_train,
                       "train_math_sdpa_delta_mib": d_math,
                       "top5_delta_mib": d_top, "delta_ratio": d_top / d_train,
                       "microbatch": microbatch, "top5_micro_delta_mib": d_micro,
                       "micro_delta_ratio": d_micro / d_train,
                       "top5_wall_s": w_top, "top5_micro_wall_s": w_micro,
                       "train_peak_mib": p_train, "top5_peak_mib": p_top,
                       "peak_ratio": p_top / p_train}
    print_table(["batch", "params", "idle Δ MiB", "train step Δ MiB",
                 "train step (math SDPA) Δ MiB", "top-5 Δ MiB", "top-5 / train Δ",
                 "top-5 / train (math SDPA) Δ", f"top-5 micro-{microbatch} Δ MiB",
                 f"micro-{microbatch} / train Δ", "top-5 wall s",
                 f"top-5 micro-{microbatch} wall s", "train peak RSS MiB",
                 "top-5 peak RSS MiB", "peak RSS ratio"], rows)
    return results


# ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--seeds", type=int, default=50, help="seeds for the trace errors")
    parser.add_argument("--tols", default="1e-3,1e-4")
    parser.add_argument("--mem-batches", default="16,64,256")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch)
        return
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    import warnings

    warnings.simplefilter("ignore")
    print(f"machine: {machine()}\n")
    out: dict[str, Any] = {"machine": machine()}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            raise SystemExit(f"--sections: unknown section {s!r}; choose from {SECTIONS}")
    if "eig" in sections:
        out["eig"] = section_eig(args.reps, [float(t) for t in args.tols.split(",")])
    if "trace" in sections:
        out["trace"] = section_trace(args.seeds, [15, 30, 60, 120])
    if "track" in sections:
        out["track"] = section_track()
    if "slq" in sections:
        out["slq"] = section_slq()
    if "memory" in sections:
        torch.set_default_dtype(torch.float32)
        out["memory"] = section_memory(args.reps, [int(b) for b in args.mem_batches.split(",")])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
