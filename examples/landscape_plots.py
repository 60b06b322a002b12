"""Loss-landscape pictures of a small classifier (Li et al. 2018, arXiv:1712.09913).

Trains an MLP briefly on scikit-learn's digits (when scikit-learn is installed) or on
synthetic 8x8 "digits" (noisy class templates, 15% of the labels random), recording its
flattened weights in the run file every epoch, then computes into ``OUT/run.h5``:

* ``plane``: a filter-normalized random plane around the final weights (Sec. 4);
* ``pca``: the plane of the top-2 principal components of the recorded trajectory, with the
  projected path (Sec. 7);
* ``interpolation``: the line from the initial to the final weights (Goodfellow et al. 2015);

and saves PNGs (contours, filled contours with the path, a 3-D view, the 1-D curve) and a VTK
file for ParaView into ``OUT``. ``--small`` is a seconds-long smoke run.

    python examples/landscape_plots.py --out landscape-plots
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import landscape.surface as surface
from landscape.plotting import surfaces as plots
from landscape.store import RunWriter


def load_data(small: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(inputs (n, 64), labels (n,), description)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        templates = (torch.rand(10, 64, generator=g) > 0.6).float() * 16
        n = 300 if small else 1500
        labels = torch.randint(0, 10, (n,), generator=g)
        inputs = templates[labels] + 10.0 * torch.randn(n, 64, generator=g)
        flip = torch.rand(n, generator=g) < 0.15  # label noise: no perfect fit
        labels = torch.where(flip, torch.randint(0, 10, (n,), generator=g), labels)
        name = "synthetic 8x8 digits"
    else:
        digits = load_digits()
        inputs = torch.tensor(digits.data, dtype=torch.float32)
        labels = torch.tensor(digits.target)
        if small:
            inputs, labels = inputs[:300], labels[:300]
        name = "scikit-learn digits"
    inputs = (inputs - inputs.mean(0)) / (inputs.std(0) + 1e-6)
    return inputs, labels, name


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("landscape-plots"))
    ap.add_argument("--small", action="store_true", help="tiny grids and training (CI smoke)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 with --small)")
    args = ap.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.small else None)
    if threads:
        torch.set_num_threads(threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    torch.manual_seed(args.seed)
    x, y, data_name = load_data(args.small, args.seed)
    model = make_model(16 if args.small else 32)
    epochs = 4 if args.small else 30
    grid = 9 if args.small else 41
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    initial = copy.deepcopy(model.state_dict())
    progress = not args.no_progress

    run_path = out / "run.h5"
    with RunWriter(run_path, mode="w", config={"example": "landscape_plots",
                                               "data": data_name}) as writer:
        n_params = sum(p.numel() for p in model.parameters())
        writer.declare("weights", {"theta": (n_params,)}, cls="flattened parameters")
        writer.declare("train", {"loss": None})

        def record(epoch: int) -> None:
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            writer.append("weights", epoch, {"theta": flat})

        record(0)
        g = torch.Generator().manual_seed(args.seed)
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            writer.append("train", epoch, {"loss": loss.detach()})
            record(epoch)
        writer.flush()

        data = (x, y)
        plane = surface.plane(model, F.cross_entropy, data, steps=grid, span=1.0, seed=args.seed,
                              writer=writer, name="plane", progress=progress)
        steps, trajectory = surface.trajectory_from_run(writer.run(), "weights", "theta")
        pca = surface.trajectory_plane(model, F.cross_entropy, data, trajectory,
                                       steps=grid, writer=writer, name="pca", progress=progress)
        interp = surface.interpolate(model, initial, model, F.cross_entropy, data,
                                     steps=2 * grid - 1, writer=writer, name="interpolation",
                                     progress=progress)

    figures = {
        "plane_contour.png": plots.contour(plane),
        "plane_contourf.png": plots.contourf(plane),
        "plane_3d.png": plots.surface3d(plane),
        "pca_trajectory.png": plots.contourf(pca),
        "interpolation.png": plots.curve(interp),
    }
    for fname, fig in figures.items():
        fig.savefig(out / fname, dpi=110)
    plots.export_vtk(plane, out / "plane.vtk")

    final_loss = float(interp.values["loss"][list(interp.x).index(1.0)]) \
        if 1.0 in list(interp.x) else float("nan")
    ratio = pca.attrs["explained_variance_ratio"]
    print(f"data: {data_name}, {len(x)} samples; {epochs} epochs; final loss {final_loss:.4f}")
    print(f"plane {plane.shape}: loss {plane.values['loss'].min():.3f} .. "
          f"{plane.values['loss'].max():.3f}")
    print(f"pca {pca.shape}: explained variance ratio {ratio[0]:.3f}, {ratio[1]:.3f} "
          f"over {len(steps)} recorded points")
    print(f"wrote {run_path} and {len(figures)} PNGs + plane.vtk to {out} "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
