"""Run the instability suite and print its tables (see ``__init__``).

    .venv/bin/python -m tests.benchmarks.instability [--small] [--seeds 3]
        [--scenarios a,b] [--detectors default,standard,zscore,trainscope] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import detectors as det
from .harness import overhead, pair_onsets, summarise, train
from .report import markdown
from .scenarios import scenarios

DEFAULT_DETECTORS = "default,standard,zscore,trainscope"


def run_suite(*, small: bool = False, seeds: int = 3, scenario_names: list[str] | None = None,
              detector_names: list[str] | None = None, timing: bool = True,
              timing_steps: int = 60, timing_repeats: int = 3, log=None) -> dict:
    """Every (scenario, seed, arm) run with all detectors attached, the statistics per
    (scenario, detector, rule) and, with ``timing``, the overhead per architecture."""
    suite = scenarios(small, include_rejected=True)
    names = scenario_names or [n for n in scenarios(small)]
    wanted = detector_names or DEFAULT_DETECTORS.split(",")
    missing = {d: why for d, why in det.available().items() if why and d in wanted}
    dets = [d for d in wanted if d not in missing]
    runs, rows, timings = [], [], {}
    for name in names:
        sc = suite[name]
        sc_runs = []
        for seed in range(seeds):
            pair, secs = [], []
            for treated in (True, False):
                t0 = time.perf_counter()
                pair.append(train(sc, seed, treated, dets))
                secs.append(time.perf_counter() - t0)
            pair_onsets(sc, pair)  # the treatment's onset against its control
            sc_runs += pair
            for r, t in zip(pair, secs):
                if log:
                    log(f"{name} seed {seed} {'treatment' if r['treated'] else 'control'}: "
                        f"{r['steps']} steps, onset {r['onset']} (loss alone "
                        f"{r['onset_alone']}), explosion {r['explosion']}, {t:.1f}s")
        runs += sc_runs
        for d in dets:
            rows.append(summarise(sc, sc_runs, d))
            rules = sorted({rl for r in sc_runs for _, rl in r["detectors"][d]["alarms"]})
            if d not in ("zscore", "trainscope"):
                rows += [summarise(sc, sc_runs, d, rl) for rl in rules]
    if timing:
        for arch in sorted({suite[n].arch for n in names}):
            sc = next(suite[n] for n in names if suite[n].arch == arch)
            timings[arch] = overhead(sc, dets, steps=timing_steps, repeats=timing_repeats)
            if log:
                log(f"overhead {arch}: " + ", ".join(
                    f"{v} {t['ms_per_step']:.1f} ms ({100 * t['overhead']:+.0f}%)"
                    for v, t in timings[arch].items()))
    for r in runs:  # keep the JSON small: losses rounded
        r["losses"] = [round(v, 5) if v == v else None for v in r["losses"]]
    return {"small": small, "seeds": seeds, "detectors": dets, "missing": missing,
            "scenarios": {n: {"mechanism": suite[n].mechanism, "control": suite[n].control,
                              "kind": suite[n].kind, "arch": suite[n].arch,
                              "intervention": suite[n].intervention,
                              "warmup": suite[n].warmup} for n in names},
            "rows": rows, "overhead": timings, "runs": runs}


def resummarise(result: dict) -> dict:
    """Recompute the onsets and rows of a saved result (``--from-json``) from its runs."""
    suite = scenarios(result["small"], include_rejected=True)
    rows = []
    for name in result["scenarios"]:
        sc_runs = [r for r in result["runs"] if r["scenario"] == name]
        pair_onsets(suite[name], sc_runs)  # today's onset definition on the saved losses
        for d in result["detectors"]:
            rows.append(summarise(suite[name], sc_runs, d))
            if d not in ("zscore", "trainscope"):
                rules = sorted({rl for r in sc_runs for _, rl in r["detectors"][d]["alarms"]})
                rows += [summarise(suite[name], sc_runs, d, rl) for rl in rules]
    return {**result, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="the instability benchmark suite")
    parser.add_argument("--small", action="store_true", help="smoke run: tiny models, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per scenario (3)")
    parser.add_argument("--scenarios", default=None, help="comma-separated names")
    parser.add_argument("--detectors", default=DEFAULT_DETECTORS,
                        help="comma-separated: default (Monitor's defaults), cheap, standard, "
                        "full (the presets, with a probe but cheap), zscore, trainscope "
                        f"(default: {DEFAULT_DETECTORS}; a rule on a metric only the full "
                        "preset records needs full)")
    parser.add_argument("--no-timing", action="store_true", help="skip the overhead runs")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--from-json", default=None,
                        help="print the tables of a saved --json result (no training)")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = resummarise(json.load(f))
        print(markdown(result))
        return result
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.small else 3)
    result = run_suite(
        small=args.small, seeds=seeds,
        scenario_names=args.scenarios.split(",") if args.scenarios else None,
        detector_names=args.detectors.split(","), timing=not args.no_timing,
        timing_steps=20 if args.small else 60, timing_repeats=1 if args.small else 3,
        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
