"""The per-tensor norms shared by ``update`` and the sentinels give the unshared values."""

import math

import torch

from landscape.metrics import Sentinels, StepContext
from landscape.metrics.training import Update
from landscape.params import norm
from tests import models


def _context(model, dtype_of_first=None):
    names = [n for n, p in model.named_parameters()]
    g = torch.Generator().manual_seed(0)
    before = tuple(p.detach().clone() for p in model.parameters())
    update = tuple(1e-2 * torch.randn(t.shape, generator=g) for t in before)
    if dtype_of_first is not None:  # mixed dtypes: the unshared path
        before = (before[0].to(dtype_of_first), *before[1:])
        update = (update[0].to(dtype_of_first), *update[1:])
    return StepContext.for_model(model, step=1, names=names, params_before=before,
                                 update=update)


def test_update_and_sentinel_ratios_equal_the_unshared_computation():
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    for mixed in (None, torch.float64):
        ctx = _context(model, mixed)
        assert (ctx.tensor_norms("update") is None) == (mixed is not None)
        row = Update().compute(ctx)
        step_norm, base = float(norm(ctx.update)), float(norm(ctx.params_before))
        assert row["norm"] == step_norm and row["relative"] == step_norm / base
        sentinels = Sentinels()
        sentinels.setup(model)
        ratios = [float(u.norm() / b.norm()) for u, b in zip(ctx.update, ctx.params_before)
                  if b.dim() >= 2]
        got = sentinels._update_ratio(ctx)
        assert math.isclose(got["update_ratio"], max(ratios), rel_tol=1e-6)
        assert got["update_layer"] == float(ratios.index(max(ratios)))
