"""The step in backward on the flat one-process layout (`gradient_release.FlatReleaseOptimizer`): the ordinary flat
step's weights, also with gradient accumulation, parameters that straddle chunks and a parameter without gradient;
only a few chunks' gradients open at once and none left after backward; bf16 weights train."""

from __future__ import annotations

import argparse

import pytest
import torch
from train_helpers import optimizer_steps

from sdxl_trainer.training import flat_master, gradient_release, optimizers, tensorwise

CHUNK = 1000  # small chunks: parameters straddle chunk boundaries


def _args(name: str) -> argparse.Namespace:
    return argparse.Namespace(
        optimizer=name, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.1
    )


class _Model(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(70, 80), torch.nn.GELU(), torch.nn.Linear(80, 60), torch.nn.GELU(), torch.nn.Linear(60, 3)
        )
        self.unused = torch.nn.Linear(5, 5)  # no gradient ever: its chunk is stepped with zeros, as the flat step does

    def forward(self, x):
        return self.layers(x)


def _ordinary(model, name="adamw", compute=None, monkeypatch=None):
    monkeypatch.setattr(flat_master, "CHUNK_ELEMENTS", CHUNK)
    return flat_master.FlatMasterOptimizer(model, name, optimizers.inner_factory(_args(name)), compute,
                                           torch.device("cpu"))  # fmt: skip


def _released(model, name="adamw", compute=None, bf16_weights=False, monkeypatch=None):
    monkeypatch.setattr(gradient_release.FlatReleaseOptimizer, "chunk_elements", CHUNK)
    inner = tensorwise.factory(optimizers.inner_factory(_args(name)), 1e-2, bf16_weights, torch.Generator())
    return gradient_release.FlatReleaseOptimizer(model, name, inner, compute, torch.device("cpu"), bf16_weights)


def _train(model, opt, steps: int, micro: int) -> list[float]:
    """Optimizer steps over `micro` micro-batches each, the way train_step drives the two kinds of optimizer."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 70, generator=g), torch.randn(8, 3, generator=g)) for _ in range(steps * micro)]
    return optimizer_steps(model, opt, batches, micro)


@pytest.mark.parametrize("micro", [1, 2])
def test_the_step_in_backward_gives_the_ordinary_flat_steps_weights(micro, monkeypatch):
    ordinary_model, released_model = _Model(0), _Model(0)
    ordinary = _ordinary(ordinary_model, monkeypatch=monkeypatch)
    released = _released(released_model, monkeypatch=monkeypatch)
    assert released.layout() == ordinary.layout() and len(released.layout()) > 6
    spans = [released.spans[n][:2] for n in released.spans]
    assert any(start // CHUNK != (end - 1) // CHUNK for start, end in spans)  # some parameter straddles chunks
    a = _train(ordinary_model, ordinary, 4, micro)
    b = _train(released_model, released, 4, micro)
    assert b == pytest.approx(a, rel=1e-6)
    wa, wb = ordinary.model_state_dict(ordinary_model), released.model_state_dict(released_model)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(wb["unused.weight"], _Model(0).unused.weight)  # weight decay moved it, as in the flat step
    assert released.take_grad_sq(torch.device("cpu")) > 0


def test_only_a_few_chunks_hold_gradients_during_backward_and_none_after(monkeypatch):
    model = _Model(1)
    opt = _released(model, monkeypatch=monkeypatch)
    open_counts, open_buffer = [], opt._buffer

    def counting(chunk: int) -> torch.Tensor:
        buffer = open_buffer(chunk)
        open_counts.append(len(opt._buffers))
        return buffer

    opt._buffer = counting
    _train(model, opt, 2, 1)
    assert len(opt.chunk_spans) == 12 and max(open_counts) == 3
    assert not opt._buffers and all(p.grad is None for p in model.parameters())
    assert opt.compute_grad is None  # no flat gradient at all


def test_bf16_weights_train_in_backward_and_stay_views_of_the_flat_buffer(monkeypatch):
    model = _Model(2)
    opt = _released(model, "adamw8bit", compute=torch.bfloat16, bf16_weights=True, monkeypatch=monkeypatch)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 70, generator=g), torch.randn(32, 3, generator=g)
    losses = optimizer_steps(model, opt, [(x, y)] * 30)
    assert losses[-1] < 0.7 * losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and p.grad is None
        assert opt.compute.data_ptr() <= p.data_ptr() < opt.compute.data_ptr() + opt.compute.numel() * 2


def test_a_second_gradient_for_a_stepped_chunk_is_refused_not_lost(monkeypatch):
    model = _Model(3)
    opt = _released(model, monkeypatch=monkeypatch)
    x = torch.randn(4, 70)
    opt.arm(last_micro_batch=True)
    model(x).sum().backward()  # every chunk with gradients is stepped here
    with pytest.raises(RuntimeError, match="arrived twice in one backward"):
        model(x).sum().backward()  # a second backward inside the same armed step
