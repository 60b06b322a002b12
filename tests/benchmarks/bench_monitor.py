"""Monitor overhead on a small GPT-style transformer (issue 5).

Times a plain AdamW training loop and the same loop with the ``cheap`` preset every step,
and with the ``standard`` preset on its default schedules (amortized), interleaving
repetitions so that machine noise hits all variants alike. Prints a table of ms/step and
overhead ratios.

    .venv/bin/python -m tests.benchmarks.bench_monitor [--steps 100] [--repeats 3] [--threads 1]

The loop passes its logits to ``mon.step(..., outputs=out)`` so logit metrics on the
training batch reuse them. Also prints the time each metric took per step (``Monitor.timings``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from landscape.metrics import preset
from landscape.monitor import Monitor
from tests.models import TinyTransformer


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make(seed=0, vocab=128, d=128, layers=2, seq=64):
    model = TinyTransformer(vocab=vocab, d=d, heads=4, layers=layers, seq=seq, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    return model, opt


def batches(n, batch=16, seq=64, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]


def run(variant: str, steps: int) -> tuple[float, dict[str, float]]:
    torch.manual_seed(0)
    model, opt = make()
    probe = next(batches(1, seed=99))
    mon = None
    if variant != "plain":
        mon = Monitor(model, lm_loss, optimizer=opt, metrics=preset(variant), probe=probe,
                      warn=False).start()
    data = list(batches(steps))
    start = time.perf_counter()
    for step, (x, y) in enumerate(data):
        out = model(x)
        loss = lm_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, batch=(x, y), loss=loss, outputs=out)
    elapsed = time.perf_counter() - start
    per_metric: dict[str, float] = {}
    if mon is not None:
        per_metric = {k: 1000 * v / steps for k, v in mon.timings.items()}
        mon.close()
    return 1000 * elapsed / steps, per_metric


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    variants = ["plain", "cheap", "standard"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    metric_ms: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    run("plain", 5)  # warm-up
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            t, per_metric = run(v, args.steps)
            times[v].append(t)
            for k, ms in per_metric.items():
                metric_ms[v].setdefault(k, []).append(ms)
    base = statistics.median(times["plain"])
    n_params = sum(p.numel() for p in make()[0].parameters())
    print(f"model: TinyTransformer d=128 L=2 seq=64 batch=16, {n_params} params, AdamW; "
          f"{args.steps} steps x {args.repeats} repeats, median; torch threads {args.threads}")
    print(f"{'variant':<10} {'ms/step':>9} {'overhead':>9}")
    for v in variants:
        t = statistics.median(times[v])
        print(f"{v:<10} {t:9.2f} {100 * (t / base - 1):8.1f}%")
    for v in variants[1:]:
        print(f"\nper-metric time, {v} preset (ms per training step, median):")
        rows = sorted(metric_ms[v].items(), key=lambda kv: -statistics.median(kv[1]))
        for k, ms in rows:
            print(f"  {k:<28} {statistics.median(ms):8.3f}")


if __name__ == "__main__":
    main()
