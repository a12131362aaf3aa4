"""One-process flat master weights: same updates as the plain optimizer, fp32 gradient accumulation, views that
stay views, chunks that never mix 8-bit and 32-bit state, and the weights under the module's names."""

from __future__ import annotations

import argparse

import pytest
import torch
from train_helpers import optimizer_steps

from sdxl_trainer.distributed import DistInfo
from sdxl_trainer.training import flat_master, optimizers, sharding


def _args(name: str) -> argparse.Namespace:
    return argparse.Namespace(
        optimizer=name, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.01
    )


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(70, 80), torch.nn.GELU(), torch.nn.Linear(80, 3))


def _flat(model, name: str, compute=None) -> flat_master.FlatMasterOptimizer:
    return flat_master.FlatMasterOptimizer(
        model, name, optimizers.inner_factory(_args(name)), compute, torch.device("cpu")
    )


def _train(model, opt, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    batches = ((torch.randn(16, 70, generator=g), torch.randn(16, 3, generator=g)) for _ in range(steps))
    return optimizer_steps(model, opt, batches)


@pytest.mark.parametrize("name", ["adamw", "lion8bit", "adafactor"])
def test_flat_master_matches_the_plain_optimizer(name):
    plain, flat = _model(0), _model(0)
    params = list(plain.parameters())
    reference = optimizers.inner_factory(_args(name))(params, [p.numel() for p in params])
    opt = _flat(flat, name)
    assert _train(plain, reference, 4) == pytest.approx(_train(flat, opt, 4), rel=1e-5, abs=1e-7)
    for (n, a), b in zip(plain.named_parameters(), flat.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, opt.model_state_dict(flat)[n], rtol=1e-5, atol=1e-6)


def test_adamw8bit_keeps_32bit_state_for_small_tensors_in_chunks_of_their_own(monkeypatch):
    monkeypatch.setattr(flat_master, "CHUNK_ELEMENTS", 2000)
    model = _model(0)
    opt = _flat(model, "adamw8bit")
    big = sum(p.numel() for p in model.parameters() if optimizers.eight_bit_state(p.numel()))
    # Only the 80x70 weight has >= 4096 elements: it fills the first chunks exactly, the rest share the last.
    assert sum(t.numel() for t in opt.locals[:3]) == big == 5600 and opt.layout()[:3] == [[2000], [2000], [1600]]
    losses = _train(model, opt, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert optimizers.state_bits(opt) == [8, 8, 8, 32]
    plain = _model(0)
    reference = optimizers.inner_factory(_args("adamw8bit"))(
        list(plain.parameters()), [p.numel() for p in plain.parameters()]
    )
    # Different 8-bit block boundaries: close, not equal.
    assert losses == pytest.approx(_train(plain, reference, 3), rel=2e-3)


def test_parameters_and_gradients_stay_views_of_the_flat_buffers():
    model = _model(1)
    opt = _flat(model, "adamw", compute=torch.bfloat16)
    _train(model, opt, 2)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert opt.compute.data_ptr() <= p.data_ptr() < opt.compute.data_ptr() + opt.compute.numel() * 2
        assert opt.compute_grad.data_ptr() <= p.grad.data_ptr() < opt.compute_grad.data_ptr() + opt.compute.numel() * 2
    # The compute weights are the masters rounded to bf16 after every step.
    assert torch.equal(opt.compute, opt.master.to(torch.bfloat16))


def test_micro_batch_gradients_are_summed_in_fp32():
    model = _model(2)
    opt = _flat(model, "adamw", compute=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    expected = torch.zeros_like(opt.master)
    for _ in range(3):
        x = torch.randn(8, 70, generator=g)  # fp32 input: cast to bf16 by the forward pre-hook
        model(x).float().pow(2).mean().backward()
        expected += opt.compute_grad.float()
        opt.after_backward()
        assert not opt.compute_grad.any()
    torch.testing.assert_close(opt.master_grad, expected, rtol=0, atol=0)


def test_weights_load_into_the_masters_and_the_compute_copy():
    model, other = _model(3), _model(4)
    opt = _flat(model, "adamw", compute=torch.bfloat16)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    opt.load_model_state_dict(model, state)
    full = opt.full_model_state_dict(model)
    assert full.keys() == state.keys()
    for k, v in state.items():
        assert full[k].dtype == torch.float32 and torch.equal(full[k], v)
        assert torch.equal(dict(model.named_parameters())[k], v.to(torch.bfloat16))


def _info(world_size: int) -> DistInfo:
    return DistInfo(rank=0, world_size=world_size, local_rank=0, local_world_size=world_size, node_rank=0,
                    num_nodes=1, device=torch.device("cpu"), backend="gloo")  # fmt: skip


def test_auto_sharding_is_none_on_one_process_and_full_shard_otherwise():
    assert sharding.resolve_strategy("auto", _info(1), cpu_offload=False) == "none"
    assert sharding.resolve_strategy("auto", _info(2), cpu_offload=False) == "full_shard"
    assert sharding.resolve_strategy("auto", _info(1), cpu_offload=True) == "full_shard"
    assert sharding.resolve_strategy("shard_grad_op", _info(1), cpu_offload=False) == "shard_grad_op"
    with pytest.raises(sharding.ShardingError, match="--sharding none trains in one process"):
        sharding.resolve_strategy("none", _info(2), cpu_offload=False)
    with pytest.raises(sharding.ShardingError, match="--cpu_offload"):
        sharding.resolve_strategy("none", _info(1), cpu_offload=True)
