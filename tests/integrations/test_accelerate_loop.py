"""A loop that calls Hugging Face Accelerate itself (docs/integrations.md, "Accelerate
without the Trainer"): the documented loop changes nothing and records one row per
optimizer step; under ``mixed_precision="bf16"`` the exact curvature products are kept."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state: each test starts and leaves it empty."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 4))


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, :4].argmax(1))
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _documented_loop(monitored: bool):
    """The loop of docs/integrations.md: accumulation over 4 micro-batches, clipping."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, loader, sched = accelerator.prepare(model, opt, _loader(), sched)
    mon = ls.Monitor(model, F.cross_entropy, optimizer=opt).start() if monitored else None
    step, norms, losses = 0, [], []
    for x, y in loader:
        with accelerator.accumulate(model):
            out = model(x)
            loss = F.cross_entropy(out, y)
            accelerator.backward(loss)
            norm = accelerator.clip_grad_norm_(model.parameters(), 1.0) \
                if accelerator.sync_gradients else None
            opt.step()
            sched.step()
            if accelerator.sync_gradients:
                norms.append(float(norm))
                if mon is not None:
                    mon.step(step, batch=(x, y), loss=loss, grad_norm=norm)
                step += 1
            opt.zero_grad()
        losses.append(loss.item())
    run = None
    if mon is not None:
        mon.close()
        run = mon.run()
    params = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
    return losses, params, norms, run


def test_the_documented_accumulating_loop_is_unchanged_and_records_each_optimizer_step():
    plain_losses, plain_params, norms, _ = _documented_loop(monitored=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ls.InstabilityWarning)
        losses, params, _, run = _documented_loop(monitored=True)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    assert run.steps("loss").tolist() == [0, 1]  # 8 micro-batches, 2 optimizer steps
    np.testing.assert_allclose(run.series("grad_norm", "value")[1], norms, rtol=1e-6)
    np.testing.assert_allclose(run.series("sentinels", "lr")[1], [1e-2, 5e-3], rtol=1e-12)


def test_bf16_mixed_precision_keeps_the_exact_curvature_product():
    """accelerate's bf16 wraps ``forward`` in autocast: its products are asymmetric at the
    bfloat16 level (1.4e-3), far above float32's tolerance, which switched every product to
    the first-order one (lambda_1 about 4x low on a small GPT-2)."""
    from accelerate import Accelerator

    model, (x, y) = _model().eval(), next(iter(_loader()))
    wide = _model().double().eval()
    truth = float(torch.linalg.eigvalsh(_dense(wide, x.double(), y))[-1])
    prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        op = ls.curvature.Hessian(prepared, F.cross_entropy, (x, y))
        top = float(ls.curvature.top_eigenvalues(op, k=1, tol=1e-2).values[0])
    assert op.backend_used == "auto"
    assert top == pytest.approx(truth, rel=5e-2)


def _dense(model, x, y):
    from tests.curvature._dense import dense_hessian

    return dense_hessian(model, F.cross_entropy, (x, y))
