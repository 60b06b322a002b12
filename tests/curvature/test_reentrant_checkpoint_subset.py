"""Parameter blocks inside a reentrant activation checkpoint (docs/curvature.md, "Choosing
automatically"): with only parameters inside the checkpoint selected, nothing upstream of it
needs a gradient, so reentrant checkpointing passes none into it. The first-order products
then differentiate with respect to every trainable parameter and read the selected ones;
a selected parameter the forward reads that still receives no gradient raises."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from landscape.curvature import GGN, Hessian, top_eigenvalues, top_eigenvalues_by_group
from tests.curvature._dense import dense_ggn, dense_hessian

TOL = 1e-3  # first-order products in float32 (docs/curvature.md, "First-order products")


class _Net(nn.Module):
    def __init__(self, checkpointed=True, first=False):
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed, self.first = checkpointed, first
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(6 if first else 16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        if self.first:  # the checkpoint's input is the data: no gradient, even in training
            h = checkpoint(self.block, x, use_reentrant=True) if self.checkpointed \
                else self.block(x)
            return self.head(torch.tanh(h))
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=True) if self.checkpointed \
            else self.block(h)
        return self.head(h)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _plain64(net):
    """The same model in float64 without the checkpoint (the same function)."""
    ref = copy.deepcopy(net).double()
    ref.checkpointed = False
    return ref


def _top(dense):
    return float(torch.linalg.eigvalsh(dense)[-1])


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


@pytest.mark.parametrize("spec", ["block.*", ["head.*", "block.*"]])
def test_hessian_of_a_block_inside_a_reentrant_checkpoint_matches_dense_truth(spec):
    net, (x, y) = _Net(), _data()
    want = _top(dense_hessian(_plain64(net), F.cross_entropy, (x.double(), y), params=spec))
    op = Hessian(net, F.cross_entropy, (x, y), params=spec, backend="first_order")
    got = float(_quiet(lambda: top_eigenvalues(op, tol=1e-6)).values[0])
    assert want > 0.1
    assert abs(got - want) / want < TOL, (got, want)  # was 0.0 for "block.*"


@pytest.mark.parametrize("spec", ["block.*", ["head.*", "block.*"]])
def test_auto_falls_back_and_matches_dense_truth_for_the_block(spec):
    net, (x, y) = _Net(), _data()
    want = _top(dense_hessian(_plain64(net), F.cross_entropy, (x.double(), y), params=spec))
    op = Hessian(net, F.cross_entropy, (x, y), params=spec)
    with pytest.warns(RuntimeWarning, match="first-order"):
        got = float(top_eigenvalues(op, tol=1e-6).values[0])
    assert op.backend_used == "first_order"
    assert abs(got - want) / want < TOL, (got, want)


def test_groups_inside_a_reentrant_checkpoint_match_dense_truth():
    net, (x, y) = _Net(), _data()
    ref = _plain64(net)
    groups = {"block": "block.*", "head": "head.*", "unused": "unused.*"}
    got = _quiet(lambda: top_eigenvalues_by_group(
        net, F.cross_entropy, (x, y), groups=groups, tol=1e-6))
    for label in ("block", "head"):
        want = _top(dense_hessian(ref, F.cross_entropy, (x.double(), y), params=groups[label]))
        value = float(got[label].values[0])
        assert abs(value - want) / want < TOL, (label, value, want)
    # a parameter the forward never reads has zero curvature, not an error
    assert float(got["unused"].values[0]) == 0.0


def test_ggn_of_a_block_inside_a_reentrant_checkpoint_matches_dense_truth():
    net, (x, y) = _Net(), _data()
    want = _top(dense_ggn(_plain64(net), F.cross_entropy, (x.double(), y), params="block.*"))
    for backend in ("auto", "first_order"):
        op = GGN(net, F.cross_entropy, (x, y), params="block.*", backend=backend)
        got = float(_quiet(lambda op=op: top_eigenvalues(op, tol=1e-6)).values[0])
        assert abs(got - want) / want < TOL, (backend, got, want)  # auto was 0.0


@pytest.mark.parametrize("backend", ["auto", "first_order"])
@pytest.mark.parametrize("curvature", [Hessian, GGN])
def test_parameters_cut_off_from_the_loss_raise_naming_them(curvature, backend):
    """The checkpoint's input is the data: no gradient reaches the block, even with every
    parameter a leaf (as in training). A silent zero would be wrong: it raises."""
    net, (x, y) = _Net(first=True), _data()
    op = curvature(net, F.cross_entropy, (x, y), params="block.*", backend=backend)
    with pytest.raises(ValueError, match=r"no gradient reached block\.0\.weight, block\.0\.bias"):
        _quiet(lambda: top_eigenvalues(op))


class _UnreachedByTheLoss(nn.Module):
    """Parameters the forward reads without a gradient reaching them, and no checkpoint:
    an auxiliary head the loss does not read, a threshold in a comparison, a dtype read."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 2)
        self.thresh = nn.Parameter(torch.zeros(()))
        self.marker = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        x = x.to(self.marker.dtype) * (x > self.thresh)
        self.aux_out = self.aux(x)  # computed, not returned: the loss does not read it
        return self.lin(x)


@pytest.mark.parametrize("backend", ["auto", "exact", "first_order"])
@pytest.mark.parametrize("curvature", [Hessian, GGN])
def test_parameters_without_a_gradient_and_no_checkpoint_have_zero_curvature(backend, curvature):
    x, y = _data()
    net = _UnreachedByTheLoss()

    op = curvature(net, F.cross_entropy, (x, y), backend=backend)
    v = tuple(torch.ones_like(p) for p in net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no first-order fallback either
        hv = dict(zip(op.names, op.matvec(v)))
    for name in ("aux.weight", "aux.bias", "thresh", "marker"):
        assert torch.count_nonzero(hv[name]) == 0, name
    assert torch.count_nonzero(hv["lin.weight"]) > 0


@pytest.mark.parametrize("backend", ["first_order", "auto"])
def test_no_grad_forwards_keep_torchs_checkpoint_note_to_themselves(backend):
    # the loss value and the dtype probe run without gradients by design: torch's "None of
    # the inputs have requires_grad=True" there would read like the cut-off-parameter case
    net = _Net()
    op = Hessian(net, F.cross_entropy, _data(), backend=backend)
    v = tuple(torch.ones_like(p) for p in net.parameters())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        op.matvec(v)
        op.loss()
    notes = [str(w.message) for w in seen if "None of the inputs" in str(w.message)]
    assert notes == []


def test_a_learnable_tensor_in_the_loss_keeps_its_grad_through_first_order_products():
    """The first-order products call backward(): a learnable temperature in the loss got the
    probe's gradient accumulated into its .grad (46x the training one at the next step)."""
    log_t = torch.zeros((), requires_grad=True)
    log_t.grad = torch.full((), -0.25)
    held = log_t.grad
    untouched = torch.zeros((), requires_grad=True)  # no .grad yet: stays None

    def tempered(logits, y):
        return F.cross_entropy(logits / log_t.exp() + 0 * untouched, y)

    net = _Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first-order fallback says it is taken
        top_eigenvalues(Hessian(net, tempered, _data()), k=1)
    assert log_t.grad is held and float(held) == -0.25
    assert untouched.grad is None
