"""bf16 trained weights with stochastic rounding: the rounding is unbiased, a run with bf16 weights tracks the
fp32-master run where plain bf16 weights do not move, and the per-tensor optimizer saves and restores exactly."""

from __future__ import annotations

import argparse

import pytest
import torch
from train_helpers import optimizer_steps

from sdxl_trainer.training import flat_master, optimizers, tensorwise
from sdxl_trainer.training.stochastic_rounding import stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_loses_the_update():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, -3.0, 0.0078125, 200.0])  # exact in bf16
    delta = w.abs() * 2.0**-10  # an eighth of a bf16 step: round-to-nearest drops it every time
    x = (w + delta).expand(100_000, 4).contiguous()
    assert torch.equal(x.bfloat16().float()[0], w)  # round to nearest: the update is lost
    rounded = stochastic_round_to_bf16(x, g).float()
    assert set(rounded[:, 0].unique().tolist()) == {1.0, 1.0078125}  # only the two neighbours
    # Mean of the roundings = w + delta within 4 standard errors (Bernoulli with p = 1/8 of one step).
    step = w.abs() * 2.0**-7
    stderr = step * (0.125 * 0.875 / x.shape[0]) ** 0.5
    assert torch.all((rounded.mean(0).double() - (w + delta).double()).abs() < 4 * stderr.double())


def test_stochastic_rounding_keeps_exact_and_non_finite_values():
    x = torch.tensor([1.5, -2.0, float("inf"), float("-inf"), float("nan"), 0.0])
    out = stochastic_round_to_bf16(x, torch.Generator().manual_seed(1)).float()
    assert torch.equal(out[:4], x[:4]) and out[4].isnan() and out[5] == 0
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round_to_bf16(x.double())


def _args(name: str, lr: float) -> argparse.Namespace:
    return argparse.Namespace(
        optimizer=name, learning_rate=lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.0
    )


def _regression(seed: int = 0):
    """y = X w*: weights start around 6 (bf16 step there: 2**-5), targets need them ~0.3 away."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    start = 6.0 + torch.rand(1, 64, generator=g)
    target = start + 0.3 * torch.randn(1, 64, generator=g)
    return x, x @ target.T, start


def _model(start: torch.Tensor) -> torch.nn.Module:
    model = torch.nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(start)
    return model


def _run(model, opt, x, y, steps: int, dtype) -> list[float]:
    slices = [slice((i * 64) % 512, (i * 64) % 512 + 64) for i in range(steps)]
    return optimizer_steps(model, opt, ((x[sl].to(dtype), y[sl]) for sl in slices))


def test_bf16_stochastic_weights_track_fp32_masters_where_plain_bf16_does_not_move():
    """100 AdamW steps at lr 5e-3, weights near 6 (half a bf16 step there is 0.0156 > any AdamW update)."""
    x, y, start = _regression()
    lr, steps = 5e-3, 100
    inner = optimizers.inner_factory(_args("adamw", lr))

    fp32 = _model(start)
    fp32_opt = flat_master.FlatMasterOptimizer(fp32, "adamw", inner, torch.bfloat16, torch.device("cpu"))
    fp32_losses = _run(fp32, fp32_opt, x, y, steps, torch.bfloat16)

    sr = _model(start)
    sr_inner = tensorwise.factory(inner, lr, True, torch.Generator().manual_seed(0))
    sr_opt = flat_master.FlatMasterOptimizer(sr, "adamw", sr_inner, torch.bfloat16, torch.device("cpu"), True)
    sr_losses = _run(sr, sr_opt, x, y, steps, torch.bfloat16)
    assert sr.weight.dtype == torch.bfloat16

    plain = _model(start).bfloat16()  # bf16 weights, the optimizer rounds to nearest
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=lr, weight_decay=0.0)
    plain_start = plain.weight.detach().clone()
    plain_losses = _run(plain, plain_opt, x, y, steps, torch.bfloat16)

    assert torch.equal(plain.weight, plain_start)  # not one update survived rounding
    assert fp32_losses[-1] < 0.2 * fp32_losses[0]  # the task does train
    # Tolerance: at every step the loss is within 6 % of the starting loss of the fp32-master run's (measured:
    # at most 3.8 %), and the weights moved where the fp32 masters moved (distance < 25 % of the way travelled).
    for a, b in zip(sr_losses, fp32_losses, strict=True):
        assert abs(a - b) <= 0.06 * fp32_losses[0]
    travelled = (fp32_opt.master - start.flatten()).norm()
    assert (sr.weight.float().flatten() - fp32_opt.master).norm() < 0.25 * travelled
    assert plain_losses[-1] == pytest.approx(plain_losses[-1 - 8], rel=0.3)  # same batch, same loss: stuck
    assert sr_losses[-1] < 0.6 * plain_losses[-1]


@pytest.mark.parametrize("name", ["adamw8bit", "adamw", "adafactor"])
def test_tensorwise_state_round_trips_and_continues_exactly(name):
    torch.manual_seed(0)
    weights = [torch.randn(96, 80).bfloat16(), torch.randn(7).bfloat16()]
    inner = optimizers.inner_factory(_args(name, 1e-3))

    def make(ws, seed):
        return tensorwise.TensorwiseOptimizer(ws, [w.numel() for w in ws], inner, 1e-3, True,
                                              torch.Generator().manual_seed(seed))  # fmt: skip

    a = make(weights, 0)
    for w in weights:
        w.grad = torch.randn_like(w)
    a.step()
    copies = [w.detach().clone() for w in weights]
    b = make(copies, 5)
    for c, w in zip(copies, weights, strict=True):
        c.grad = w.grad.clone()
    b.load_state_dict(a.state_dict())
    b.generator.set_state(a.generator.get_state())
    a.step()
    b.step()
    for w, c in zip(weights, copies, strict=True):
        assert torch.equal(w, c)
    if name == "adamw8bit":
        assert a.inner_state(0)["state1"].dtype == torch.uint8  # 8-bit moments, as decided on the numel
        assert a.inner_state(1)["state1"].dtype == torch.float32
    assert all(h.numel() == 0 for h in a.holders)  # no fp32 copy kept between steps
