"""Run the healthy-run benchmark and print its table (see ``__init__``).

Usage: ``.venv/bin/python -m tests.benchmarks.healthy [--seeds 3] [--setups a,b] [--preset
standard] [--json FILE]``, or ``--small`` for a harness check of seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch

from .harness import run, summarise
from .report import markdown, totals
from .setups import SETUPS, SMALL, SMALL_STEPS, resolve


def run_benchmark(*, small: bool = False, seeds: int = 3, setup_names: list[str] | None = None,
                  preset: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every (setup, seed) under the default monitor, one row per setup and the total.

    Args:
        small: the few ``SMALL`` setups for ``SMALL_STEPS`` steps (a harness check).
        seeds: seeds 0 .. seeds - 1 per setup.
        setup_names: setups by name or hunt key (default: all, or ``SMALL`` when small).
        preset: the monitor's ``metrics=`` (default: none, the ``cheap`` preset).
        log: called with one line per run.

    Returns:
        ``small``, ``seeds``, ``preset``, ``setups`` (names), ``rows``
        (:func:`harness.summarise`), ``total`` (:func:`report.totals`), ``seconds`` and
        ``runs`` (every run, losses included).
    """
    chosen = resolve(setup_names or list(SMALL if small else SETUPS))
    t0 = time.perf_counter()
    runs, rows = [], []
    for setup in chosen:
        mine = []
        for seed in range(seeds):
            r = run(setup, seed, SMALL_STEPS if small else None, preset)
            mine.append(r)
            if log:
                log(f"{setup.name} seed {seed}: {r['steps']} steps, loss {r['loss_first']:.4g} "
                    f"-> {r['loss_last']:.4g}, {'healthy' if r['healthy'] else r['why']}, "
                    f"{len(r['warnings'])} warnings, {sum(r['info'].values())} info, "
                    f"{r['seconds']:.1f}s")
        runs += mine
        rows.append(summarise(setup, mine))
    result = {"small": small, "seeds": seeds, "preset": preset,
              "setups": [s.name for s in chosen], "rows": rows,
              "seconds": time.perf_counter() - t0, "runs": runs}
    result["total"] = totals(result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: parse ``argv``, run, print the markdown, optionally write JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.healthy",
        description="warnings of the default monitor on healthy training runs")
    parser.add_argument("--setups", default=None,
                        help="comma-separated setup names or hunt keys (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setup (3; 1 --small)")
    parser.add_argument("--small", action="store_true",
                        help=f"harness check: {len(SMALL)} setups, {SMALL_STEPS} steps, 1 seed")
    parser.add_argument("--preset", default=None, choices=("cheap", "standard", "full"),
                        help="the monitor's metrics= (default: none, the cheap preset); "
                             "standard or full tries the rules that read their metrics")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        result = run_benchmark(
            small=args.small, seeds=args.seeds or (1 if args.small else 3),
            setup_names=args.setups.split(",") if args.setups else None, preset=args.preset,
            log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyError as e:
        parser.error(str(e.args[0]))
    print(markdown(result))
    if args.json:
        for r in result["runs"]:  # 9 significant digits: every float32 loss round-trips
            r["losses"] = [float(f"{v:.9g}") for v in r["losses"]]
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
