"""Cost of each ``landscape.functional`` metric on 10k samples x 512 features (10 classes).

Run: ``python tests/benchmarks/bench_functional.py [--n 10000 --p 512 --classes 10]``.
Prints one row per metric: the median wall time and the median process CPU time over
``--repeats`` runs (after one warm-up call) on the CPU, with torch's default thread count
or ``--threads``. Target (issue 4): each metric well
under a second. Inputs are float32, as captured from a model; the metrics upcast internally
(float64 for the second-moment algebra).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import landscape.functional as LF


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall time, median process CPU time) in seconds, after one warm-up call.

    On a shared machine the wall time includes waiting for a core; the CPU time (all
    threads of this process) is the work itself.
    """
    fn()  # warm-up (lazy initialisation, allocator)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--p", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n, p, c = args.n, args.p, args.classes

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % c
    means = 3.0 * torch.randn(c, p, generator=g)
    features = means[labels] + torch.randn(n, p, generator=g)
    classifier = nn.Linear(p, c)
    weight = torch.randn(p, p, generator=g) / p**0.5
    logits = classifier(features).detach()
    derivs = torch.randn(n, c, generator=g)
    v_prev = LF.top_singular_vector(weight).v
    mlp = nn.Sequential(nn.Linear(p, 256), nn.Tanh(), nn.Linear(256, c))
    step = [0.01 * torch.randn(q.shape, generator=g) for q in mlp.parameters()]

    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "neural_collapse (NC1-NC4, classifier)",
            lambda: LF.neural_collapse(features, labels, classifier),
        ),
        ("nc1", lambda: LF.nc1(features, labels)),
        ("variability_collapse_index", lambda: LF.variability_collapse_index(features, labels)),
        ("effective_rank (RankMe)", lambda: LF.effective_rank(features)),
        ("von_neumann_entropy", lambda: LF.von_neumann_entropy(features)),
        ("alpha_req", lambda: LF.alpha_req(features)),
        ("uniformity (default: 4096-row subset)", lambda: LF.uniformity(features)),
        (
            "uniformity (all pairs, max_samples=None)",
            lambda: LF.uniformity(features, max_samples=None),
        ),
        ("alignment (N pairs)", lambda: LF.alignment(features, features.roll(1, 0))),
        ("wasserstein_uniformity", lambda: LF.wasserstein_uniformity(features)),
        (
            "spectral_alignment (cold start)",
            lambda: LF.spectral_alignment(weight, features),
        ),
        (
            "spectral_alignment (warm start)",
            lambda: LF.spectral_alignment(weight, features, init=v_prev),
        ),
        ("logit_stats", lambda: LF.logit_stats(logits)),
        ("softmax_collapse_fraction", lambda: LF.softmax_collapse_fraction(logits)),
        ("taylor_radius_from_logits", lambda: LF.taylor_radius_from_logits(logits, derivs)),
        (f"taylor_radius (JVP, MLP {p}-256-{c})", lambda: LF.taylor_radius(mlp, features, step)),
        (
            f"sam_sharpness (MLP {p}-256-{c})",
            lambda: LF.sam_sharpness(mlp, F.cross_entropy, features, labels),
        ),
    ]
    print(
        f"landscape.functional on {n} x {p} float32 features, {c} classes; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} runs"
    )
    print(f"{'metric':<44} {'wall [ms]':>10} {'cpu [ms]':>10}")
    print("-" * 66)
    rows = []
    for name, fn in cases:
        wall, cpu = _median_time(fn, args.repeats)
        rows.append((name, wall, cpu))
        print(f"{name:<44} {1e3 * wall:>10.1f} {1e3 * cpu:>10.1f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
