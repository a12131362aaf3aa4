"""The optimizer state kept off the GPU between steps (`--offload_optimizer_state`, tensorwise.py): the same weights
as with the state in place, the state held in the host buffers between steps (each step works on a copy), and a
state dict that continues exactly. On CPU the "host" is the same device, so each step's copy in and out is what
is checked; the GPU run is tests/test_memory_gpu.py's."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from train_helpers import optimizer_steps

from sdxl_trainer.training import gradient_release, optimizers, tensorwise


def _args(name: str) -> argparse.Namespace:
    return argparse.Namespace(optimizer=name, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                              adam_weight_decay=0.01)  # fmt: skip


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(300, 256), torch.nn.GELU(), torch.nn.Linear(256, 3))


def _optimizer(model, name: str, offload: bool, monkeypatch):
    monkeypatch.setattr(gradient_release.FlatReleaseOptimizer, "chunk_elements", 2**14)
    monkeypatch.setattr(tensorwise, "OFFLOAD_MIN_ELEMENTS", 1024)
    inner = tensorwise.factory(optimizers.inner_factory(_args(name)), 1e-2, True, torch.Generator().manual_seed(1),
                               torch.device("cpu") if offload else None)  # fmt: skip
    return gradient_release.FlatReleaseOptimizer(model, name, inner, torch.bfloat16, torch.device("cpu"), True)


def _batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 300, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_offloaded_state_gives_the_same_weights_and_lives_in_the_host_buffers(name, monkeypatch):
    kept, moved = _model(), _model()
    opt_kept = _optimizer(kept, name, False, monkeypatch)
    opt_moved = _optimizer(moved, name, True, monkeypatch)
    batches = _batches(6, 2)
    assert optimizer_steps(kept, opt_kept, batches) == optimizer_steps(moved, opt_moved, batches)
    assert torch.equal(opt_kept.compute, opt_moved.compute)
    inner = opt_moved.inner
    parked = [(inner.inner_state(i), buffers) for i, buffers in enumerate(inner._parked) if buffers]
    assert len(parked) >= len(opt_moved.locals) - 1  # every chunk with large state (the small tensors' may be under)
    for state, buffers in parked:
        assert all(state[key] is host for key, host in buffers.items())


def test_an_offloaded_state_dict_continues_exactly(monkeypatch):
    model = _model()
    opt = _optimizer(model, "adamw8bit", True, monkeypatch)
    optimizer_steps(model, opt, _batches(3, 3))
    saved_state, saved_weights = copy.deepcopy(opt.state_dict()), opt.compute.clone()
    rounding = copy.deepcopy(opt.inner.generator.get_state())
    later = _batches(3, 4)
    expected = optimizer_steps(model, opt, later)
    other = _model()
    resumed = _optimizer(other, "adamw8bit", True, monkeypatch)
    resumed.compute.copy_(saved_weights)
    resumed.load_state_dict(saved_state)
    resumed.inner.generator.set_state(rounding)
    assert all(buffers for buffers in resumed.inner._parked[:-1])  # loaded straight into host buffers
    assert optimizer_steps(other, resumed, later) == expected
    assert torch.equal(resumed.compute, opt.compute)
