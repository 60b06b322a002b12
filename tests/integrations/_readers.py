"""Read back what the mirrors wrote, with each tool's own reader (nothing leaves the machine).

* TensorBoard: ``EventAccumulator`` over the event files of a log directory.
* W&B: the offline ``run-*.wandb`` file is a LevelDB-style log of 32 KiB blocks, each record
  a 7-byte header (CRC32, length, type: full/first/middle/last) and a protobuf
  ``wandb.proto.wandb_internal_pb2.Record``; wandb 0.31 dropped its Python reader
  (``wandb.sdk.internal.datastore``), so the few lines below read the same format and parse
  each record with wandb's own protobuf class.
* MLflow: ``MlflowClient.get_metric_history`` on a local file store.
"""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path
from typing import Callable

_BLOCK, _HEADER = 32768, 7


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(logdir, tag: str) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    name = f"{tag}/text_summary"
    if name not in acc.Tags()["tensors"]:
        return []
    out = []
    for e in acc.Tensors(name):
        values = e.tensor_proto.string_val
        out.append((e.step, values[0].decode() if values else ""))
    return out


def tensorboard_dirs(root) -> list[Path]:
    return sorted({Path(p).parent for p in glob.glob(f"{root}/**/events.out.tfevents.*",
                                                     recursive=True)})


def _wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if pos + _HEADER + length > len(data):  # a record still being written: read later
            break
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def wandb_history(run_dir, until: Callable[[list[dict]], bool] | None = None,
                  timeout: float = 60.0) -> list[dict]:
    """The history rows of an offline W&B run directory (``wandb/offline-run-*``).

    With ``until``, read again (for up to ``timeout`` seconds) until ``until(rows)`` holds:
    wandb's service process may still be writing the file when ``run.finish()`` returns,
    and a key of an early row (a finding at step 0) is no sign that the later rows landed.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = _wandb_rows(run_dir)
        if until is None or until(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_rows(run_dir) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    rows = []
    for raw in _wandb_records(Path(path)):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def wandb_series(rows: list[dict], key: str, step_key: str = "landscape/step"):
    return [(r[step_key], r[key]) for r in rows if key in r]
