"""`landscape surface`: random/eigen planes and lines, PCA of a trajectory, interpolation."""

import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from landscape_cli.main import cli

import landscape as ls

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    (root / "factories.py").write_text(FACTORIES)
    ns: dict = {}
    exec(FACTORIES, ns)
    model, (x, y) = ns["model"](), ns["data"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    paths = []
    for step in range(1, 13):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 3 == 0:
            p = root / f"ckpt-{step}.pt"
            torch.save(model.state_dict(), p)
            paths.append(p)
    return root, paths, ns, float(loss.detach())


def _run(args):
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize(
    ("directions", "dims", "n_ckpt", "shape"),
    [("random", 2, 1, (5, 5)), ("random", 1, 1, (5,)), ("eigen", 2, 1, (5, 5)),
     ("pca", 2, 4, (5, 5)), ("interpolate", 1, 2, (5,))],
)
def test_surface_kinds(setup, tmp_path, directions, dims, n_ckpt, shape):
    root, paths, ns, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    ckpts = [str(p) for p in paths[-n_ckpt:]]
    result = _run(["surface", *ckpts, "--model", f"{fac}:model", "--data", f"{fac}:data",
                   "--dims", str(dims), "--steps", "5", "--directions", directions,
                   "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    surf = ls.Run.open(out).surface(directions)
    assert surf.values["loss"].shape == shape
    assert bool(surf.done.all())
    if directions in ("random", "eigen"):
        # the grid centre is the checkpoint itself
        model = ns["model"]()
        model.load_state_dict(torch.load(paths[-1]))
        x, y = ns["data"]()
        with torch.no_grad():
            centre = float(torch.nn.functional.cross_entropy(model(x), y))
        mid = tuple(n // 2 for n in shape)
        assert surf.values["loss"][mid] == pytest.approx(centre, rel=1e-5)
    if directions == "interpolate":
        assert np.all(np.isfinite(surf.values["loss"]))


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--directions", "interpolate"], "exactly two"), (["--directions", "pca"], "at least three")],
)
def test_surface_direction_requirements_are_one_line_errors(setup, tmp_path, args, match):
    root, paths, _, _ = setup
    fac = root / "factories.py"
    result = _run(["surface", str(paths[0]), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "-o", str(tmp_path / "r.h5"), "-q", *args])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0]
