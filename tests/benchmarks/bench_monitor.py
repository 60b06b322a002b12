"""Monitor overhead on a small GPT-style transformer (issue 5) and on the instability suite.

Times a plain AdamW training loop and the same loop with the ``cheap`` preset every step,
and with the ``standard`` preset on its default schedules (amortized), interleaving
repetitions so that machine noise hits all variants alike. Prints a table of ms/step and
overhead ratios.

    .venv/bin/python -m tests.benchmarks.bench_monitor [--steps 100] [--repeats 3] [--threads 1]

The loop passes its logits to ``mon.step(..., outputs=out)`` so logit metrics on the
training batch reuse them. Also prints the time each metric took per step (``Monitor.timings``).

``--suite`` measures the default monitor (``Monitor(model, loss_fn, optimizer=opt)``: the
``cheap`` preset, the every-step sentinels on the default probe, the default alarm rules)
on the instability suite's tiny GPT and small CNN (their control runs, the suite's batches
and optimizers), interleaved with plain runs; and the ``standard`` and ``full`` presets
amortized over their schedules: each metric's measured time per call divided by its
period, plus the monitor's per-step time outside the metrics.

    .venv/bin/python -m tests.benchmarks.bench_monitor --suite [--steps 100] [--repeats 5]
        [--archs gpt,cnn] [--variants default]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

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


SUITE = {"gpt": "gpt_lr_ramp", "cnn": "cnn_sgd_eos"}  # control runs of these scenarios
ARCHS = (*SUITE, "cnn32")  # cnn32: a CIFAR-sized CNN beside the suite's 2.7k-parameter one


def cifar_cnn_trial(seed: int = 0, batch: int = 128) -> Any:
    """A CIFAR-sized CNN run: 3 conv blocks (32/64/128 channels, BatchNorm, ReLU, pooling)
    and a linear head, 94,762 parameters, batch ``batch`` of 32x32 RGB images (10 fixed
    random templates plus noise), SGD with momentum 0.9. The ``--suite`` CNN has 2,698
    parameters and a 2.3 ms step, where any fixed per-step cost weighs heavily; this one
    has the size of the smallest CNNs people train.
    """
    from types import SimpleNamespace

    from torch import nn

    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(block(3, 32), block(32, 64), block(64, 128),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, 32, 32, generator=g)

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        y = torch.randint(0, 10, (batch,), generator=gen)
        return templates[y] + torch.randn(batch, 3, 32, 32, generator=gen), y

    return SimpleNamespace(model=model, optimizer=opt, loss_fn=F.cross_entropy,
                           batch=batch_at, lr=lambda step: 0.05, probe=batch_at(-1))


def suite_run(arch: str, variant: str, steps: int) -> dict[str, Any]:
    """One control run of the suite's ``arch`` model, plain or with a monitor ``variant``.

    Returns ms per step end to end, inside ``Monitor.step`` (``in_call``), the metrics'
    time per step (``Monitor.timings``) and, per metric, ms per call and the schedule's
    period.
    """
    from tests.benchmarks.instability.scenarios import scenarios

    trial = cifar_cnn_trial() if arch == "cnn32" else scenarios()[SUITE[arch]].build(0, False)
    model, opt = trial.model, trial.optimizer
    mon = None
    if variant == "default":
        mon = Monitor(model, trial.loss_fn, optimizer=opt, warn=False).start()
    elif variant != "plain":
        mon = Monitor(model, trial.loss_fn, optimizer=opt, metrics=variant, probe=trial.probe,
                      warn=False).start()
    data = [trial.batch(step) for step in range(steps)]
    in_call = 0.0
    start = time.perf_counter()
    for step, (x, y) in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = trial.lr(step)
        out = model(x)
        loss = trial.loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            t0 = time.perf_counter()
            mon.step(step, batch=(x, y), loss=loss.detach(), outputs=out.detach())
            in_call += time.perf_counter() - t0
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {"ms": 1000 * elapsed / steps, "in_call": 1000 * in_call / steps,
                              "metrics": 0.0, "per_call": {}}
    if mon is not None:
        run = mon.run()
        for m in mon.metrics:
            calls = len(run.steps(m.name))
            period = getattr(m.schedule, "n", 1)
            result["per_call"][m.name] = (1000 * mon.timings[m.name] / max(calls, 1), period)
        result["metrics"] = 1000 * sum(mon.timings.values()) / steps
        mon.close()
    return result


VARIANTS = ("plain", "default", "standard", "full")


def suite(steps: int, repeats: int, archs: tuple[str, ...] = ARCHS,
          variants: tuple[str, ...] = VARIANTS) -> None:
    """The ``--suite`` tables (module docstring); ``variants`` always holds ``plain``."""
    import logging
    import os

    logging.getLogger("landscape").setLevel(logging.ERROR)  # the default-probe notice

    variants = ("plain", *[v for v in variants if v != "plain"])
    for arch in archs:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        suite_run(arch, "default", 10)  # warm-up
        for r in range(repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:
                runs[v].append(suite_run(arch, v, steps))
        med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in ("ms", "in_call",
                                                                          "metrics")}
               for v in variants}
        base = med["plain"]["ms"]
        print(f"\n{arch}: {steps} steps x {repeats} repeats, median; torch threads "
              f"{torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}")
        print(f"  plain {base:.2f} ms/step")
        if "default" in med:
            d = med["default"]
            print(f"  default {d['ms']:.2f} ms/step end to end "
                  f"({100 * (d['ms'] / base - 1):+.1f}%); in Monitor.step {d['in_call']:.3f} ms "
                  f"({100 * d['in_call'] / base:.1f}% of a plain step), of which metrics "
                  f"(Monitor.timings) {d['metrics']:.3f} ms")
        for v in variants[1:]:
            per_call = {k: statistics.median(x["per_call"][k][0] for x in runs[v])
                        for k in runs[v][0]["per_call"]}
            periods = {k: runs[v][0]["per_call"][k][1] for k in per_call}
            amortized = sum(per_call[k] / periods[k] for k in per_call)
            # the monitor's own work outside the metrics (rows, rules, contexts), per step
            bookkeeping = med[v]["in_call"] - med[v]["metrics"]
            total = amortized + bookkeeping
            print(f"  {v}: amortized {total:.2f} ms/step ({100 * total / base:.0f}% of a plain "
                  f"step): metrics {amortized:.2f} + bookkeeping {bookkeeping:.2f}")
            for k in sorted(per_call, key=lambda k: -per_call[k] / periods[k]):
                print(f"    {k:<22} {per_call[k]:9.2f} ms/call  every {periods[k]:<4} "
                      f"{per_call[k] / periods[k]:8.3f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--suite", action="store_true",
                        help="the instability suite's tiny GPT and small CNN (and a "
                        "CIFAR-sized CNN) instead")
    parser.add_argument("--archs", default=",".join(ARCHS),
                        help=f"with --suite: which models, of {','.join(ARCHS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="with --suite: which monitors beside the plain run, of "
                        f"{','.join(VARIANTS[1:])} (e.g. default alone, for more repeats)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.suite:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; known: {','.join(VARIANTS)}")
        suite(args.steps, args.repeats, tuple(args.archs.split(",")),
              tuple(args.variants.split(",")))
        return
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
