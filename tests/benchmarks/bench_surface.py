"""Cost of one landscape grid point, relative to one no-grad forward pass over the same data.

Side by side with the ``loss-landscapes`` package (marcellodebernardi/loss-landscapes, PyPI
``loss-landscapes``): the same model, data and grid, each method run several times in
alternation. Reported: the best time per point (wall-clock and process CPU time; with one
thread the CPU time is the cost, less affected by other processes on a shared machine) and,
as "x forward", the median over the repeats of each method's time per point divided by the
forward passes timed right before and after it. loss-landscapes computes the loss only, so
"ours" does too (``accuracy=False``); "+acc" adds the accuracy, "hdf5" writes every point to a
run file (the others keep the surface in memory). Target (docs/benchmarks.md): <= 1.15x.

Two models: a small CNN with BatchNorm on 256 28x28 images (compute-bound, tens of ms per
forward pass) and a small MLP on 512 64-feature rows (well under a millisecond per pass, where
fixed per-point costs show).

Run: ``python tests/benchmarks/bench_surface.py [--model cnn|mlp|all] [--repeats 5]``
(also collected by ``make bench`` through pytest).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import landscape.surface as surface


class Net(nn.Module):
    """A small convolutional classifier with BatchNorm on 1x28x28 inputs (~60k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.b2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mlp() -> nn.Module:
    """A small MLP on 64 features: a forward pass of well under a millisecond, where fixed
    per-point costs (parameter updates, calls, file writes) show."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def setup(kind: str = "cnn", n: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    model = (Net() if kind == "cnn" else mlp()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as after training: loss-landscapes divides by zero on zero biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    shape = (n, 1, 28, 28) if kind == "cnn" else (n, 64)
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, x, y


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_point(t0: tuple[float, float], points: int) -> tuple[float, float]:
    wall, cpu = _clock()
    return (wall - t0[0]) / points, (cpu - t0[1]) / points


def time_forward(model, x, y, steps: int) -> tuple[float, float]:
    """``loss_fn(model(x), y)`` under no_grad in eval mode, ``steps**2`` times."""
    t0 = _clock()
    with torch.no_grad():
        for _ in range(steps**2):
            F.cross_entropy(model(x), y).item()
    return _per_point(t0, steps**2)


def time_ours(model, x, y, steps: int, writer, accuracy: bool = False) -> tuple[float, float]:
    t0 = _clock()
    surface.plane(model, F.cross_entropy, (x, y), steps=steps, span=1.0, writer=writer,
                  name=f"bench{time.perf_counter_ns()}", progress=False, accuracy=accuracy)
    return _per_point(t0, steps**2)


def time_loss_landscapes(model, x, y, steps: int) -> tuple[float, float]:
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    t0 = _clock()
    loss_landscapes.random_plane(model, metric, distance=1, steps=steps,
                                 normalization="filter", deepcopy_model=True)
    return _per_point(t0, steps**2)


def run(
    steps: int = 7, repeats: int = 5, n: int = 256, kind: str = "cnn"
) -> dict[str, dict[str, float]]:
    """Per method: best wall/CPU seconds per point, and the median over the repeats of its
    ratio to the forward passes timed right before and after it (adjacent measurements share
    the machine's load, so the ratio is steadier than either time on a shared machine)."""
    model, x, y = setup(kind, n)
    ref = copy.deepcopy(model.state_dict())
    methods = {
        "ours (memory)": lambda: time_ours(model, x, y, steps, None),
        "ours (memory+acc)": lambda: time_ours(model, x, y, steps, None, accuracy=True),
        "ours (hdf5)": lambda: time_ours(model, x, y, steps, path),
        "loss-landscapes": lambda: time_loss_landscapes(model, x, y, steps),
    }
    try:
        import loss_landscapes  # noqa: F401
    except ImportError:
        del methods["loss-landscapes"]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ["forward", *methods]}
    ratios: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        time_forward(model, x, y, 2)  # warm-up
        time_ours(model, x, y, 2, None)
        for _ in range(repeats):
            before = time_forward(model, x, y, steps)
            times["forward"].append(before)
            for name, fn in methods.items():
                t = fn()
                after = time_forward(model, x, y, steps)
                times["forward"].append(after)
                times[name].append(t)
                ratios[name].append(tuple(2 * t[i] / (before[i] + after[i]) for i in (0, 1)))
                before = after
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), f"the model changed: {k}"
    out = {}
    for k, v in times.items():
        out[k] = {"wall": min(w for w, _ in v), "cpu": min(c for _, c in v)}
        if k in ratios:
            out[k]["ratio_wall"] = statistics.median(r for r, _ in ratios[k])
            out[k]["ratio_cpu"] = statistics.median(r for _, r in ratios[k])
    return out


def report(best: dict[str, dict[str, float]], steps: int, n: int, kind: str = "cnn") -> str:
    fwd = best["forward"]
    lines = [f"{kind}: grid {steps}x{steps}, {n} samples, {torch.get_num_threads()} thread(s); "
             f"one no-grad forward pass: {fwd['wall'] * 1e3:.2f} ms wall, "
             f"{fwd['cpu'] * 1e3:.2f} ms CPU (best)",
             "x forward = median over repeats of (time per point / adjacent forward time)",
             f"{'method':<18} {'ms/point':>9} {'x forward':>10} {'CPU ms':>8} {'x forward':>10}"]
    for k, r in best.items():
        if k == "forward":
            continue
        lines.append(f"{k:<18} {r['wall'] * 1e3:>9.2f} {r['ratio_wall']:>10.2f} "
                     f"{r['cpu'] * 1e3:>8.2f} {r['ratio_cpu']:>10.2f}")
    return "\n".join(lines)


CONFIGS = {"cnn": {"steps": 7, "n": 256}, "mlp": {"steps": 15, "n": 512}}


def test_bench_surface():  # collected by `make bench`
    for kind, cfg in CONFIGS.items():
        best = run(steps=5, repeats=3, n=cfg["n"], kind=kind)
        print("\n" + report(best, 5, cfg["n"], kind))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="grid side (default per model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for kind in CONFIGS if args.model == "all" else [args.model]:
        steps = args.steps or CONFIGS[kind]["steps"]
        n = args.samples or CONFIGS[kind]["n"]
        best = run(steps, args.repeats, n, kind)
        print(report(best, steps, n, kind), flush=True)


if __name__ == "__main__":
    main()
