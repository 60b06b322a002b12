"""Append cost per scalar row in the run store, buffered and unbuffered.

Run: ``.venv/bin/python tests/benchmarks/bench_store.py`` (prints a markdown table).
"""

from __future__ import annotations

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


def main() -> None:
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


if __name__ == "__main__":
    main()
