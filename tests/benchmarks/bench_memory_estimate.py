"""Plan estimate vs measured peak on the cnn32 model (tests/benchmarks/bench_monitor.py).

Run: .venv/bin/python -m tests.benchmarks.bench_memory_estimate [256MiB|600MiB|auto]
(docs/curvature.md, "How the estimate is made").
"""
import sys
import time

import torch

from landscape.curvature import Hessian, hessian_trace, spectral_density, top_eigenvalues
from landscape.curvature.memory import profile_memory
from tests.benchmarks.bench_monitor import cifar_cnn_trial

torch.set_num_threads(2)
budget = sys.argv[1] if len(sys.argv) > 1 else "256MiB"
budget = int(budget[:-3]) * 2**20 if budget.endswith("MiB") else budget
trial = cifar_cnn_trial()
x, y = trial.probe
op = Hessian(trial.model, trial.loss_fn, (x, y))
MB = 2**20
t = time.perf_counter()
prof = profile_memory(op)
print(f"profile {time.perf_counter()-t:.2f}s  step {prof.step_bytes/MB:.1f} MiB  "
      f"product(rows={prof.rows}) {prof.product(prof.rows)/MB:.1f} MiB  {prof}")
for name, fn in [
    ("top_eigenvalues k=3", lambda o, **kw: top_eigenvalues(o, k=3, **kw)),
    ("hessian_trace krylov 30", lambda o, **kw: hessian_trace(o, "krylov", n_matvec=30, **kw)),
    ("spectral_density 30x2",
     lambda o, **kw: spectral_density(o, lanczos_steps=30, n_probes=2, **kw)),
]:
    op = Hessian(trial.model, trial.loss_fn, (x, y))  # fresh: no cached graph
    t = time.perf_counter()
    r = fn(op, memory_budget=budget, memory_profile=prof)
    p = r.memory_plan
    print(f"{name}: estimate {p.estimate/MB:.1f} MiB  measured {r.peak_memory/MB:.1f} MiB  "
          f"ratio {r.peak_memory/p.estimate:.2f}  budget {p.budget/MB:.0f}  "
          f"mb={p.microbatch_size} basis={p.max_basis} pb={p.probe_batch} "
          f"n_matvec={r.n_matvec} {time.perf_counter()-t:.1f}s")
print("measured", {k: round(v / MB, 1) for k, v in prof.measured.items()}, "margin", prof.margin)
