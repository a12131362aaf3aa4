"""Local-shard optimizers: same update as the plain optimizer, pinned 8-bit/32-bit choice, exact state restore."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from train_helpers import optimizer_steps

from sdxl_trainer.training import checkpoint, optimizers


def _args(name: str, **kw) -> argparse.Namespace:
    base = dict(
        optimizer=name, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.01
    )
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group, so FSDP2 can shard (over one rank) inside pytest."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(70, 80), torch.nn.GELU(), torch.nn.Linear(80, 3))


def _train(model, opt, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    batches = ((torch.randn(16, 70, generator=g), torch.randn(16, 3, generator=g)) for _ in range(steps))
    return optimizer_steps(model, opt, batches)


def test_eight_bit_state_is_chosen_by_the_unsharded_size():
    assert optimizers.eight_bit_state(4096) and optimizers.eight_bit_state(10**9)
    assert not optimizers.eight_bit_state(4095)


def test_bitsandbytes_follows_the_global_size_not_the_local_shard():
    """A 3000-element shard of a 6000-element tensor (2 ranks) keeps 8-bit state as on one GPU; a tensor that
    is small globally keeps 32-bit state. Left to itself bitsandbytes would judge the shard (bnb #2080)."""
    shard_of_big = torch.nn.Parameter(torch.randn(3000))
    small = torch.nn.Parameter(torch.randn(3000))
    inner = optimizers._bnb_factory("adamw8bit", _args("adamw8bit"))([shard_of_big, small], [6000, 3000])
    for p in (shard_of_big, small):
        p.grad = torch.randn_like(p)
    inner.step()
    assert inner.state[shard_of_big]["state1"].dtype == torch.uint8
    assert inner.state[small]["state1"].dtype == torch.float32


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion8bit", "adafactor"])
def test_local_shard_optimizer_matches_the_plain_optimizer_on_a_sharded_model(one_rank_group, name):
    mesh = one_rank_group
    plain, sharded = _model(0), _model(0)
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    args = _args(name)
    factories = {"adamw": optimizers._torch_adamw_factory, "adafactor": optimizers._adafactor_factory}
    factory = factories[name](args) if name in factories else optimizers._bnb_factory(name, args)
    params = list(plain.parameters())
    reference = factory(params, [p.numel() for p in params])
    local = optimizers.build_optimizer(args, list(sharded.parameters()))
    assert _train(plain, reference, 4) == pytest.approx(_train(sharded, local, 4), rel=1e-5, abs=1e-7)
    for a, b in zip(plain.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(a, b.full_tensor(), rtol=1e-5, atol=1e-6)
    if name == "adamw8bit":
        assert sorted(set(optimizers.state_bits(local))) == [8, 32]  # weights are 8-bit, biases (< 4096) 32-bit


def test_eight_bit_state_saved_and_restored_exactly(one_rank_group, tmp_path):
    mesh = one_rank_group
    models = []
    for _ in range(2):
        m = _model(1)
        fully_shard(m, mesh=mesh)
        models.append(m)
    args = _args("adamw8bit")
    first = optimizers.build_optimizer(args, list(models[0].parameters()))
    _train(models[0], first, 3)
    checkpoint.save_structured(tmp_path / "opt", {"state": first.state_dict(), "layout": first.layout()})
    # The copy: same weights, a fresh optimizer that gets the saved state.
    models[1].load_state_dict(models[0].state_dict())
    second = optimizers.build_optimizer(args, list(models[1].parameters()))
    saved = checkpoint.load_structured(tmp_path / "opt")
    assert saved["layout"] == second.layout()
    second.load_state_dict(saved["state"])
    for a, b in zip(first.locals, second.locals, strict=True):
        sa, sb = first.inner.state[a], second.inner.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert _train(models[0], first, 3, seed=5) == _train(models[1], second, 3, seed=5)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a.full_tensor(), b.full_tensor())


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="--optimizer"):
        optimizers.build_optimizer(_args("sgd"), [torch.nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("max_norm", [0.1, 1e6, float("inf")])
def test_local_gradient_clipping_matches_torchs(one_rank_group, max_norm):
    mesh = one_rank_group
    plain, sharded = _model(2), _model(2)
    fully_shard(sharded, mesh=mesh)
    opt = optimizers.build_optimizer(_args("adamw"), list(sharded.parameters()))
    x = torch.randn(8, 70)
    for m in (plain, sharded):
        m(x).pow(2).mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
    opt.bind_grads()
    got = optimizers.clip_grad_norm_(opt, max_norm, mesh.get_group())
    torch.testing.assert_close(got, expected)
    for a, b in zip(plain.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad.full_tensor())


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_the_8bit_step_without_per_tensor_waits_equals_bitsandbytes_own(monkeypatch, name):
    """Our 8-bit step skips bitsandbytes' device wait after every tensor; the update must be bitsandbytes' own
    (its own step is what the paged variant still runs)."""
    import bitsandbytes.optim.optimizer as bnb_optimizer

    def run(own: bool) -> tuple[list[torch.Tensor], int]:
        waits = []
        monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: waits.append(t))
        torch.manual_seed(0)
        tensors = [torch.randn(64, 96, requires_grad=True), torch.randn(5000, requires_grad=True), torch.randn(7)]
        opt = optimizers.inner_factory(_args(name))(tensors, [t.numel() for t in tensors])
        opt.is_paged = own  # the paged path runs bitsandbytes' own step
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for t in tensors:
                t.grad = torch.randn(t.shape, generator=g)
            opt.step()
        return [t.detach().clone() for t in tensors], len(waits)

    own, own_waits = run(own=True)
    ours, our_waits = run(own=False)
    assert own_waits >= 9 and our_waits == 0  # bitsandbytes waits after each of 3 tensors x 3 steps
    for a, b in zip(own, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    assert not torch.equal(own[0], torch.randn(64, 96))  # the weights moved
