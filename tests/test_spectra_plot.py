"""The eigenvalue density figure: of a spectral_density result, and of a run's stored row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.curvature.spectrum import gaussian_density
from landscape.plotting import density
from landscape.plotting.spectra import density_of_row
from landscape.plotting.timelines import timelines
from tests import models


def _run_with_density(steps=2):
    model = models.mlp().double()
    x, y = models.classification_data(32)
    x = x.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = [ls.metrics.SpectralDensity(schedule=1, lanczos_steps=12), "loss"]
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, probe=(x, y), metrics=metrics,
                    warn=False) as mon:
        models.full_batch_steps(mon, model, opt, x, y, steps)
        return mon.run(), model, x, y


def test_the_density_of_a_result_is_drawn_as_computed():
    model = models.mlp().double()
    x, y = models.classification_data(32)
    res = ls.curvature.spectral_density(ls.curvature.Hessian(model, F.cross_entropy,
                                                             (x.double(), y)), 12, 2)
    line = density(res).axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), res.grid.numpy())
    np.testing.assert_allclose(line.get_ydata(), np.maximum(res.density.numpy(), 1e-12))
    assert density(res).axes[0].get_yscale() == "log"


def test_a_stored_row_gives_a_density_of_mass_one_from_its_own_nodes():
    run, *_ = _run_with_density()
    step, grid, rho, nodes, weights = density_of_row(run)
    assert step == 1
    _, stored = run.series("spectral_density", "nodes")
    finite = stored[-1][np.isfinite(stored[-1])]
    np.testing.assert_array_equal(np.sort(nodes), np.sort(finite))
    assert weights.sum() == pytest.approx(1.0, rel=1e-9)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # noqa: NPY201 (numpy < 2)
    assert trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-3)
    sigma = 0.01 * (nodes.max() - nodes.min())
    want = gaussian_density(torch.from_numpy(nodes), torch.from_numpy(weights),
                            torch.from_numpy(grid), sigma).numpy()
    np.testing.assert_allclose(rho, want)
    assert density_of_row(run, 0)[0] == 0
    with pytest.raises(ValueError, match="no row at step 7"):
        density_of_row(run, 7)


def test_plot_and_report_draw_the_density_not_a_timeline_of_nodes(tmp_path):
    """`plot -m spectral_density` drew the quadrature nodes' min-max band against step."""
    run, *_ = _run_with_density()
    figs = timelines(run)
    assert figs["spectral_density"].axes[0].get_title() == "eigenvalue density at step 1"
    assert figs["loss"].axes[0].get_ylabel() == "value"  # the others stay timelines
    assert "eigenvalue density" in ls.report.render_report(run)


def test_a_failed_last_row_draws_the_last_measured_one_and_all_failed_a_timeline():
    """A NaN last row (a failed measurement) made report and plot raise."""
    w = ls.RunWriter.memory()
    w.declare("spectral_density", {"nodes": (1, 3), "weights": (1, 3), "peak_memory": None})
    w.append("spectral_density", 0, {"nodes": [[0.1, 0.5, 2.0]], "weights": [[0.2, 0.3, 0.5]],
                                     "peak_memory": 1.0})
    w.append("spectral_density", 5, {"nodes": [[np.nan] * 3], "weights": [[np.nan] * 3],
                                     "peak_memory": np.nan})
    run = w.run()
    assert density_of_row(run)[0] == 0
    assert timelines(run)["spectral_density"].axes[0].get_title() == "eigenvalue density at step 0"
    assert "eigenvalue density" in ls.report.render_report(run)
    none = ls.RunWriter.memory()
    none.declare("spectral_density", {"nodes": (1, 2), "weights": (1, 2)})
    none.append("spectral_density", 0, {"nodes": [[np.nan] * 2], "weights": [[np.nan] * 2]})
    fig = timelines(none.run())["spectral_density"]  # nothing to smooth: the timeline
    assert "density" not in fig.axes[0].get_title()
