"""Peak resident memory of a training loop with and without the default monitor.

Each configuration runs in a fresh process (``ru_maxrss`` is per process): an MLP of
``--layers`` square layers of ``--width`` and a 10-class head, AdamW, batch 16, one step,
then three more, monitored by ``ls.Monitor(model, F.cross_entropy, optimizer=opt)`` (or
not). Results: docs/benchmarks.md, "Monitor memory".

    .venv/bin/python -m tests.benchmarks.bench_monitor_memory --width 4096
"""

from __future__ import annotations

import argparse
import subprocess
import sys

_CHILD = """
import logging, resource, sys
import torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
logging.getLogger("landscape").setLevel(logging.ERROR)
mode, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
blocks = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())]
model = nn.Sequential(*blocks, nn.Linear(width, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x, y = torch.randn(16, width), torch.randint(0, 10, (16,))
mon = None
if mode == "monitor":
    import landscape as ls
    mon = ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False).start()
for step in range(4):
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if mon is not None:
        mon.step(step, batch=(x, y), loss=loss.detach(), outputs=out.detach())
n = sum(p.numel() for p in model.parameters())
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak(mode: str, width: int, layers: int) -> tuple[int, float]:
    """(parameters, peak resident MiB) of one run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(width), str(layers)],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.repeats):
        n, plain = peak("plain", args.width, args.layers)
        _, monitored = peak("monitor", args.width, args.layers)
        copy = n * 4 / 2**20
        print(f"{n / 1e6:.1f}M parameters ({copy:.0f} MiB): plain {plain:.0f} MiB, "
              f"monitored {monitored:.0f} MiB, +{monitored - plain:.0f} MiB "
              f"({(monitored - plain) / copy:.2f} copies of the parameters)")


if __name__ == "__main__":
    main()
