"""What the library leaves behind on a GPU machine, checked on the CPU.

The CUDA generators a measurement forks and seeds (also for weights offloaded to the CPU
and computed on the GPU), the seed torch queues for CUDA before it starts, the cuDNN flags
around recurrent layers, and the current-device mistake that makes NCCL collectives fail.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from landscape import distributed as dist_helpers
from landscape import isolation
from landscape.demo import demo_model
from landscape.surface import line


def _queued_cuda_seeds() -> list[object]:
    """The seeding calls torch queued for CUDA's start (CUDA is not started here)."""
    return list(torch.cuda._lazy_seed_tracker.get_calls())


@pytest.fixture
def user_seed() -> list[object]:
    """The user's own seed, queued for CUDA as ``torch.manual_seed`` queues it."""
    assert not torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        yield _queued_cuda_seeds()


def test_demo_model_leaves_the_seed_queued_for_cuda(user_seed: list[object]) -> None:
    demo_model(seed=0)
    assert _queued_cuda_seeds() == user_seed  # torch.manual_seed(0) would replace it


def test_a_surface_leaves_the_seed_queued_for_cuda(user_seed: list[object]) -> None:
    torch.manual_seed(0)  # the data and the model; then the user's seed again
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    torch.manual_seed(1234)
    queued = _queued_cuda_seeds()
    line(model, nn.CrossEntropyLoss(), (x, y), steps=3, eval_mode=False)
    assert _queued_cuda_seeds() == queued


def _cuda_started(monkeypatch: pytest.MonkeyPatch, current: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_no_cuda_device_before_cuda_starts() -> None:
    assert not torch.cuda.is_initialized()
    assert isolation.cuda_devices([torch.zeros(1)]) == []


def test_weights_on_the_cpu_fork_the_current_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # offloaded weights (FSDP2's CPUOffloadPolicy, a device_map) are computed on the
    # current GPU: its generator draws their dropout masks
    _cuda_started(monkeypatch, current=1)
    assert isolation.cuda_devices([torch.zeros(1), None]) == [1]
    on_gpus = [SimpleNamespace(device=torch.device("cuda", 2)),
               SimpleNamespace(device=torch.device("cuda"))]  # no index: the current one
    assert isolation.cuda_devices(on_gpus) == [1, 2]


def test_recurrent_layers_on_a_gpu_turn_off_cudnn_alone(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    cudnn = torch.backends.cudnn
    monkeypatch.setattr(isolation, "_cuda_recurrent", lambda model: True)
    monkeypatch.setattr(cudnn, "benchmark", True)
    monkeypatch.setattr(cudnn, "deterministic", True)
    monkeypatch.setattr(cudnn, "allow_tf32", False)
    enabled = cudnn.enabled
    with isolation.rnn_differentiable(nn.LSTM(2, 2)):
        inside = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32)
    assert inside == (False, True, True, False)  # the user's settings, cuDNN off
    assert cudnn.enabled == enabled


@pytest.mark.parametrize("backend, current, devices, wrong", [
    ("nccl", 0, ["cuda:1"], True),  # model.to(rank) without torch.cuda.set_device(rank)
    ("nccl", 1, ["cuda:1"], False),
    ("nccl", 0, ["cpu"], False),
    ("gloo", 0, ["cuda:1"], False),  # gloo reduces on the CPU
    ("cpu:gloo,cuda:nccl", 0, ["cuda:1"], False),  # objects go through gloo there
])
def test_nccl_needs_the_models_gpu_as_current_device(
        backend: str, current: int, devices: list[str], wrong: bool) -> None:
    message = dist_helpers.wrong_current_device(backend, current,
                                                [torch.device(d) for d in devices])
    assert (message is not None) == wrong
    if wrong:
        assert "torch.cuda.set_device(local_rank)" in message and "cuda:1" in message


def test_the_monitor_checks_the_current_device_under_nccl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = SimpleNamespace(parameters=lambda: iter(
        [SimpleNamespace(device=torch.device("cuda", 1))]))
    monkeypatch.setattr(dist_helpers, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_helpers.dist, "get_backend", lambda: "nccl")
    _cuda_started(monkeypatch, current=0)
    with pytest.raises(ValueError, match="set_device"):
        dist_helpers.check_current_device(model)
    _cuda_started(monkeypatch, current=1)
    dist_helpers.check_current_device(model)  # the model's GPU: nothing to say


def test_monitor_start_makes_the_current_device_check(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path) -> None:
    import torch.nn.functional as F

    import landscape as ls

    def wrong(model: nn.Module) -> None:
        raise ValueError("the model is on cuda:1 but the current CUDA device is cuda:0")

    monkeypatch.setattr(dist_helpers, "check_current_device", wrong)
    model = nn.Linear(3, 2)
    monkeypatch.setattr(dist_helpers, "enabled", lambda option=None: True)
    with pytest.raises(ValueError, match="current CUDA device"):
        ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5").start()
    monkeypatch.setattr(dist_helpers, "enabled", lambda option=None: False)
    ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5").start().close()  # not checked
