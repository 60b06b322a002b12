"""Append cost per scalar row in the run store, buffered and unbuffered; and over a long run.

Run: ``.venv/bin/python tests/benchmarks/bench_store.py`` (prints a markdown table);
``--long 300000`` adds the CPU time per step of five tables shaped like the default
monitor's (20 scalar fields) in windows up to that many steps, in memory and in HDF5: a
cost that grows with the run shows there.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from landscape.store import RunWriter

ROWS = 20_000


def _time_appends(path: Path | None, flush_every: int, rows: int) -> float:
    writer = (
        RunWriter(path, mode="w", flush_every=flush_every, flush_seconds=1e9)
        if path
        else (RunWriter.memory(flush_every=flush_every, flush_seconds=1e9))
    )
    writer.declare("loss", {"value": None})
    start = time.perf_counter()
    for step in range(rows):
        writer.append("loss", step, {"value": 0.5 * step})
    writer.close()
    return (time.perf_counter() - start) / rows


def _long_run(path: Path | None, total: int) -> list[tuple[int, float]]:
    """CPU µs per step (five tables, 20 fields) in windows ending at 10k, 50k, 100k, ..."""
    writer = (RunWriter(path, mode="w", flush_seconds=1e9) if path
              else RunWriter.memory(flush_seconds=1e9))
    tables = {"a": 10, "b": 3, "c": 2, "d": 2, "e": 3}
    for name, k in tables.items():
        writer.declare(name, {f"f{i}": None for i in range(k)})
    values = {name: {f"f{i}": 1.0 for i in range(k)} for name, k in tables.items()}
    ends = [n for n in (10_000, 50_000, 100_000, 200_000, 300_000, 500_000, 1_000_000)
            if n <= total]
    out, begin, clock = [], 0, time.process_time()
    for step in range(total):
        for name, row in values.items():
            writer.append(name, step, row)
        if ends and step + 1 == ends[0]:
            now = time.process_time()
            out.append((ends.pop(0), 1e6 * (now - clock) / (step + 1 - begin)))
            begin, clock = step + 1, now
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=0, help="steps of the long-run table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, flush_every, n in [
            ("HDF5, buffered (flush every 256 rows)", Path(tmp) / "a.h5", 256, ROWS),
            ("HDF5, unbuffered (flush every row)", Path(tmp) / "b.h5", 1, ROWS // 10),
            ("memory twin", None, 256, ROWS),
        ]:
            per_row = min(_time_appends(path, flush_every, n) for _ in range(3))
            rows.append((label, n, per_row))
    print("| store | rows | time per scalar row |")
    print("|---|---:|---:|")
    for label, n, per_row in rows:
        print(f"| {label} | {n} | {per_row * 1e6:.1f} µs |")
    if args.long:
        with tempfile.TemporaryDirectory() as tmp:
            memory = _long_run(None, args.long)
            hdf5 = _long_run(Path(tmp) / "long.h5", args.long)
        print("\n| steps (window end) | memory, CPU µs per step | HDF5, CPU µs per step |")
        print("|---:|---:|---:|")
        for (n, m), (_, h) in zip(memory, hdf5):
            print(f"| {n:,} | {m:.0f} | {h:.0f} |")


if __name__ == "__main__":
    main()
