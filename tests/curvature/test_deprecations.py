"""The renamed curvature keywords and attributes still work for one release, with a warning
that names the new name (docs/vocabulary.md), and the shared options live in one place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from landscape.curvature import (
    GGN,
    Hessian,
    MatrixOperator,
    preconditioned,
    spectral_density,
    top_eigenvalues,
)
from landscape.curvature.operator import OperatorOptions
from landscape.params import flatten


def _model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    return model, (x, y)


def _diag(n=6):
    return MatrixOperator(torch.diag(torch.arange(1.0, n + 1, dtype=torch.float64)))


def test_top_eigenvalues_max_iter_and_min_iter_still_work_and_warn():
    new = top_eigenvalues(_diag(), k=1, max_matvec=4, min_matvec=3)
    with pytest.warns(DeprecationWarning, match="'max_iter'.*'max_matvec'") as seen:
        old = top_eigenvalues(_diag(), k=1, max_iter=4)
    assert seen[0].filename == __file__  # the caller's line: shown by default filters
    with pytest.warns(DeprecationWarning, match="'min_iter'.*'min_matvec'"):
        old_min = top_eigenvalues(_diag(), k=1, max_matvec=4, min_iter=3)
    assert old.n_matvec == new.n_matvec == old_min.n_matvec <= 4
    assert torch.equal(old.values, new.values)


def test_old_and_new_keyword_together_is_an_error():
    with pytest.raises(TypeError, match="max_iter"):
        top_eigenvalues(_diag(), max_iter=4, max_matvec=4)


def test_spectral_density_n_iter_still_works_and_warns():
    new = spectral_density(_diag(), lanczos_steps=4, n_probes=2)
    with pytest.warns(DeprecationWarning, match="'n_iter'.*'lanczos_steps'") as seen:
        old = spectral_density(_diag(), n_iter=4, n_probes=2)
    assert seen[0].filename == __file__
    assert old.n_matvec == new.n_matvec == 8
    assert torch.equal(old.nodes.nan_to_num(), new.nodes.nan_to_num())
    # positional use is unchanged
    assert spectral_density(_diag(), 4, 2).n_matvec == 8


@pytest.mark.parametrize("kind", ["hessian", "ggn", "matrix", "preconditioned"])
def test_params_attribute_is_a_deprecated_alias_of_parameters(kind):
    model, batch = _model_and_batch()
    if kind == "hessian":
        op = Hessian(model, F.cross_entropy, batch)
    elif kind == "ggn":
        op = GGN(model, F.cross_entropy, batch)
    elif kind == "matrix":
        op = _diag()
    else:
        base = Hessian(model, F.cross_entropy, batch)
        op = preconditioned(base, [torch.ones_like(p) for p in base.parameters])
    with pytest.warns(DeprecationWarning, match="'params'.*'parameters'"):
        old = op.params
    assert len(old) == len(op.parameters)
    assert all(torch.equal(a, b) for a, b in zip(old, op.parameters))


def test_parameters_are_the_model_tensors_detached():
    model, batch = _model_and_batch()
    op = Hessian(model, F.cross_entropy, batch, params="0.*")
    assert op.names == ("0.weight", "0.bias")
    for t, p in zip(op.parameters, model[0].parameters()):
        assert torch.equal(t, p) and not t.requires_grad


def test_options_are_shared_and_recorded():
    model, batch = _model_and_batch()
    h = Hessian(model, F.cross_entropy, batch, eval_mode=False, seed=3, backend="autograd")
    g = GGN(model, F.cross_entropy, batch, eval_mode=False, seed=3, backend="autograd")
    assert h.options == g.options == OperatorOptions(
        eval_mode=False, seed=3, backend="autograd", distributed=False
    )
    assert (h.eval_mode, h.seed, h.backend) == (False, 3, "autograd")
    sub = h.subset("2.*")
    assert sub.options.params == "2.*" and sub.options.seed == 3 and sub.n_matvec == 0
    assert isinstance(sub, Hessian) and sub.cache_graph == h.cache_graph


@pytest.mark.parametrize("cls", [Hessian, GGN])
def test_unknown_keyword_names_the_operator(cls):
    model, batch = _model_and_batch()
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(\) got an unexpected keyword"):
        cls(model, F.cross_entropy, batch, n_iter=3)


@pytest.mark.parametrize("cls", [Hessian, GGN])
def test_one_scalar_loss_check_for_both_operators(cls):
    model, batch = _model_and_batch()

    def per_sample(out, y):
        return F.cross_entropy(out, y, reduction="none")

    op = cls(model, per_sample, batch, backend="autograd")
    v = tuple(torch.ones_like(p) for p in op.parameters)
    with pytest.raises(ValueError, match="scalar tensor"):
        flatten(op.matvec(v))
