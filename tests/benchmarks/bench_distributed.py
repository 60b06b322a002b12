"""Cost of a data-parallel Hessian-vector product against the number of ranks (gloo, CPU).

    python tests/benchmarks/bench_distributed.py [--ranks 1 2] [--samples 4096] [--reps 20]

For each number of ranks R the same data set (N samples) is split into R equal shards; every
rank times ``reps`` products of ``landscape.curvature.Hessian`` on its shard (each ending in
one all-reduce of the d-dimensional result) and, separately, ``reps`` bare all-reduces of d
floats, and ``reps`` failure votes (:func:`landscape.distributed.raise_together` with no
error: one all-reduce of one number; a product pays two). R = 1 runs in this process
without a process group. One intra-op thread per rank, so
R ranks need R free cores for the times to mean anything (docs/distributed.md, "What scales
how").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from landscape import distributed as ld
from landscape.curvature import Hessian
from tests.distributed._launch import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 10))


def _measure(rank: int, world: int, samples: int, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    per = samples // world
    shard = (x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
    H = Hessian(_model(), F.cross_entropy, shard)
    v = tuple(torch.ones_like(p) for p in H.parameters())
    for _ in range(3):
        H.matvec(v)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        H.matvec(v)
    matvec = (time.perf_counter() - start) / reps
    allreduce = vote = float("nan")
    if world > 1:
        flat = torch.zeros(H.dim)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            ld.all_reduce_weighted([flat], 1.0, total=float(world))
        allreduce = (time.perf_counter() - start) / reps
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):  # a product's two failure votes (one all-reduce of one number)
            ld.raise_together(None, "bench")
        vote = (time.perf_counter() - start) / reps
    return {"matvec_s": matvec, "allreduce_s": allreduce, "vote_s": vote, "dim": H.dim}


def _worker(rank: int, out_dir: str, samples: int, reps: int) -> None:
    result = _measure(rank, dist.get_world_size(), samples, reps)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'ranks':>5} {'dim':>7} {'samples/rank':>12} {'matvec ms':>10} {'all-reduce ms':>13}"
          f" {'vote ms':>8}")
    for world in args.ranks:
        if world == 1:
            res = _measure(0, 1, args.samples, args.reps)
        else:
            with tempfile.TemporaryDirectory() as out:
                run_ranks(_worker, out, args.samples, args.reps, world_size=world, timeout=600)
                parts = []
                for r in range(world):
                    with open(os.path.join(out, f"rank{r}.json")) as f:
                        parts.append(json.load(f))
            res = {k: max(p[k] for p in parts) for k in parts[0]}  # the slowest rank
        print(f"{world:>5} {res['dim']:>7} {args.samples // world:>12} "
              f"{1e3 * res['matvec_s']:>10.2f} {1e3 * res['allreduce_s']:>13.3f}"
              f" {1e3 * res['vote_s']:>8.3f}")


if __name__ == "__main__":
    main()
