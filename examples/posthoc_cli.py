"""Post-hoc checkpoint analysis from the command line.

No monitor during training: a small CNN with BatchNorm learns a synthetic 4-class image
problem (12x12 bars, crosses and diagonals in noise, generated locally: no downloads) with
SGD + momentum, and a checkpoint ``{"model": state_dict, "step": N}`` is saved every few
epochs, as any training script would. Afterwards the ``landscape`` command analyses them:

1. ``landscape analyze OUT/ckpt-*.pt --model OUT/factories.py:model --data
   OUT/factories.py:data``: the command's default metrics, top Hessian eigenvalues,
   sharpness against the momentum-SGD threshold (2 + 2 beta)/lr, neural collapse and the
   representation metrics of every checkpoint, ordered by step, into ``OUT/run.h5`` (the
   Hessian trace and the spectral density are opt-in, ``-m hessian_trace``);
2. ``landscape surface ... --directions pca``: the loss over the plane of the top two
   principal components of the checkpoint trajectory (Li et al. 2018), with the path;
3. ``landscape plot OUT/run.h5 -o OUT/plots``: one PNG per metric and per surface;
4. ``landscape report OUT/run.h5 -o OUT/report.html``: one self-contained HTML file;
5. ``landscape check OUT/run.h5``: the findings table (exit status 1: a warning or worse,
   the default ``--fail-on warning``).

The model and data factories live in ``OUT/factories.py``, written by this script and
imported by both the training below and the CLI (``path/to/file.py:function``). The CLI is
run as ``python -m landscape_cli.main`` with this interpreter, which is what the installed
``landscape`` console script runs.

    python examples/posthoc_cli.py --out posthoc-out     # 1-3 minutes on a CPU
    python examples/posthoc_cli.py --small               # seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

FACTORIES = textwrap.dedent('''\
    """Model and data factories for ``landscape analyze/surface`` (written by posthoc_cli.py)."""

    import torch
    from torch import nn

    CLASSES = 4
    SIZE = 12


    def images(n, seed=0, noise=0.6):
        """(n, 1, 12, 12) images of 4 patterns (horizontal bar, vertical bar, cross,
        diagonal) at random offsets in Gaussian noise, and their labels."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        x = noise * torch.randn(n, 1, SIZE, SIZE, generator=g)
        offsets = torch.randint(2, SIZE - 2, (n,), generator=g)
        idx = torch.arange(SIZE)
        for i in range(n):
            k, o = int(labels[i]), int(offsets[i])
            if k in (0, 2):
                x[i, 0, o, :] += 1.0
            if k in (1, 2):
                x[i, 0, :, o] += 1.0
            if k == 3:
                x[i, 0, idx, (idx + o) % SIZE] += 1.0
        return x, labels


    def model():
        """A two-block CNN with BatchNorm (1,636 parameters)."""
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(),
            nn.Linear(16, CLASSES),
        )


    def data():
        """The fixed analysis batch: 256 held-out images."""
        return images(256, seed=1)
    ''')


def load_factories(path: Path):
    """Import the written factories file as a module."""
    spec = importlib.util.spec_from_file_location("posthoc_factories", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(factories, out: Path, epochs: int, every: int, n: int, lr: float,
          momentum: float) -> list[Path]:
    """Plain minibatch SGD; a checkpoint every ``every`` epochs (and at the start)."""
    model = factories.model()
    x, y = factories.images(n, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    paths, step = [], 0

    def save() -> None:
        path = out / f"ckpt-{step:05d}.pt"
        torch.save({"model": model.state_dict(), "step": step, "lr": lr}, path)
        paths.append(path)

    save()
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(n, generator=g).split(32):
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if epoch % every == 0:
            save()
            model.eval()
            with torch.no_grad():
                vx, vy = factories.data()
                acc = (model(vx).argmax(1) == vy).float().mean().item()
            print(f"epoch {epoch:3d}  step {step:5d}  train loss {loss.item():.4f}  "
                  f"held-out accuracy {acc:.3f}  -> {paths[-1].name}")
    return paths


def landscape_cli(*args: str, in_process: bool = False, check: bool = True,
                  threads: int = 1) -> tuple[int, str]:
    """Run ``landscape ARGS`` and echo it; returns ``(exit status, stdout)``.

    By default a subprocess runs this interpreter's installed CLI (what the ``landscape``
    console script runs); ``in_process`` invokes the same click command in this process
    (no interpreter start-up per command: the CI smoke test uses it).
    """
    print("$ landscape " + " ".join(args), flush=True)
    if in_process:
        from click.testing import CliRunner
        from landscape_cli.main import cli

        res = CliRunner().invoke(cli, list(args), prog_name="landscape")
        status, stdout = res.exit_code, res.stdout
        stderr = res.stderr if res.exception is None or isinstance(res.exception, SystemExit) \
            else repr(res.exception)
    else:
        cmd = [sys.executable, "-m", "landscape_cli.main", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's CPU threads
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    if stdout.strip():
        print(textwrap.indent(stdout.rstrip(), "  "))
    if status != 0 and (check or status != 1):
        raise SystemExit(f"landscape {args[0]} failed ({status}): {stderr.strip()}")
    return status, stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="posthoc-out", help="directory for every file")
    parser.add_argument("--small", action="store_true", help="reduced size (CI smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="(30; small 6)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the CLI commands in this process instead of subprocesses")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for models this small)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (6 if args.small else 30)
    every = 2 if args.small else 5
    n = 256 if args.small else 1024
    lr, momentum = 0.05, 0.9
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ckpt-*.pt"):
        old.unlink()
    run = out / "run.h5"
    run.unlink(missing_ok=True)

    factories_path = out / "factories.py"
    factories_path.write_text(FACTORIES)
    ckpts = train(load_factories(factories_path), out, epochs, every, n, lr, momentum)
    landscape = functools.partial(landscape_cli, in_process=args.in_process,
                                  threads=args.threads)
    common = ["--model", f"{factories_path}:model", "--data", f"{factories_path}:data"]
    names = [str(p) for p in ckpts]

    metric_names = ["top_eigenvalues", "sharpness", "collapse", "representation"]
    metrics = [a for m in metric_names for a in ("-m", m)] if args.small else []
    landscape("analyze", *names, *common, "-o", str(run), "-k", "3", "--lr", str(lr),
              "--momentum", str(momentum), "-q", *metrics)
    landscape("info", str(run))
    landscape("surface", *names, *common, "--directions", "pca", "--steps",
              "9" if args.small else "25", "--name", "trajectory", "-o", str(run), "-q")
    landscape("plot", str(run), "-o", str(out / "plots"), "-q")
    landscape("report", str(run), "-o", str(out / "report.html"), "--title",
              "post-hoc checkpoint analysis")
    checked, _ = landscape("check", str(run), check=False)

    from landscape import Run

    with Run.open(run) as r:
        steps, eig = r.series("top_eigenvalues", "eigenvalues")
        _, ratio = r.series("sharpness", "ratio")
        _, nc1 = r.series("collapse", "nc1")
        surfaces = r.surfaces()
    summary = {
        "checkpoints": names,
        "steps": [int(s) for s in steps],
        "lambda_max": [float(v) for v in eig[:, 0]],
        "sharpness_ratio": [float(v) for v in ratio],
        "nc1": [float(v) for v in nc1],
        "surfaces": list(surfaces),
        "check_exit_status": checked,
        "report": str(out / "report.html"),
        "plots": sorted(str(p) for p in (out / "plots").glob("*.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("step   lambda_max  ratio to (2+2b)/lr   NC1")
    for s, lam, rt, c in zip(summary["steps"], summary["lambda_max"],
                             summary["sharpness_ratio"], summary["nc1"]):
        print(f"{s:5d}  {lam:10.3f}  {rt:18.3f}  {c:8.4f}")
    print(f"open the report: {summary['report']}")
    return summary


if __name__ == "__main__":
    main()
