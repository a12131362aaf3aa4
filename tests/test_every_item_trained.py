"""Every cached item is trained every epoch (issue 16): small buckets in padded batches, remainders trained by
the last epoch, padding weighted 0 in a loss that stays a true weighted mean across ranks and micro-batches."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from sdxl_trainer.data import sampler
from sdxl_trainer.data.buckets import plan_item
from sdxl_trainer.data.images import discover_items, load_image
from sdxl_trainer.training import loss


def _buckets(sizes: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    out = [b for b, n in sizes.items() for _ in range(n)]
    random.Random(0).shuffle(out)
    return out


def _trained(buckets, global_batch: int, acc: int, epochs: int, seed: int = 3) -> tuple[Counter, list]:
    """Real (weight 1) samples of a whole run of `epochs` epochs, and the plans."""
    state, plans, used = sampler.SamplerState(), [], Counter()
    for epoch in range(1, epochs + 1):
        plan = sampler.plan_epoch(
            buckets, state.carried_in, state.deferred_in, global_batch, acc, seed, epoch, last=epoch == epochs
        )
        plans.append(plan)
        for batch in plan.batches:
            assert len(batch) == global_batch and len({buckets[i] for i, _ in batch}) == 1
            used.update(i for s in batch if sampler.sample_weight(s) == 1.0 for i in [s[0]])
        state = sampler.SamplerState(epoch + 1, 0, plan.leftovers, plan.deferred)
    return used, plans


@pytest.mark.parametrize(
    ("sizes", "global_batch", "acc", "epochs"),
    [
        ({(64, 64): 13, (64, 96): 3, (96, 64): 1}, 4, 1, 1),  # two buckets smaller than a global batch
        ({(64, 64): 13, (64, 96): 3, (96, 64): 1}, 4, 3, 4),
        ({(64, 64): 2, (64, 96): 1}, 8, 2, 2),  # every bucket is small
        ({(64, 64): 40, (128, 64): 9}, 8, 1, 3),
    ],
)
def test_every_item_is_trained_once_per_epoch_over_the_run(sizes, global_batch, acc, epochs):
    buckets = _buckets(sizes)
    used, plans = _trained(buckets, global_batch, acc, epochs)
    assert used == Counter({i: epochs for i in range(len(buckets))})
    assert all(len(p.batches) % acc == 0 for p in plans)  # whole optimizer steps, padding included
    assert not plans[-1].leftovers and not plans[-1].deferred
    counts = sampler.epoch_step_counts(list(Counter(buckets).values()), global_batch, acc, epochs, last_flush=True)
    assert counts == [len(p.batches) // acc for p in plans]


def test_a_small_bucket_is_one_padded_batch_every_epoch():
    buckets = [(64, 64)] * 8 + [(64, 96)] * 3
    plan = sampler.plan_epoch(buckets, [], [], 4, 1, seed=1, epoch=5)
    small = [b for b in plan.batches if buckets[b[0][0]] == (64, 96)]
    assert len(small) == 1
    assert sorted(i for i, e in small[0] if e == 5) == [8, 9, 10]
    assert [sampler.sample_weight(s) for s in small[0]].count(0.0) == 1


def test_sample_dataset_with_two_ranks_of_batch_one_trains_every_item_not_held_out(repo_root):
    """train.sh's layout (2 processes x batch 1, --validation_loss_percent 0.1) over sample_dataset's real buckets."""
    buckets = []
    items, _ = discover_items(repo_root / "sample_dataset")
    for item in items:
        try:
            image = load_image(item.image_path)
        except Exception:  # noqa: BLE001 - the deliberately broken files are skipped by caching too
            continue
        plan = plan_item(*image.size, 256, 1024)
        if plan is not None:
            buckets.append((item.relpath, plan.bucket_wh))
    held = sampler.split_validation([r for r, _ in buckets], 0.1, seed=123)
    training = [b for r, b in buckets if r not in held]
    assert len(training) >= 20 and min(Counter(training).values()) == 1  # buckets of one item exist
    world, per_rank, acc, epochs = 2, 1, 2, 3
    used, plans = _trained(training, world * per_rank, acc, epochs)
    assert used == Counter({i: epochs for i in range(len(training))})
    # Each rank's slice of a global batch is one sample: both ranks always have a batch to run.
    for plan in plans:
        for gb in plan.batches:
            assert [len(sampler.rank_slice(gb, r, per_rank)) for r in range(world)] == [1, 1]


def _per_sample(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ w - y).pow(2).flatten(1).mean(1)


def test_weighted_loss_across_ranks_and_micro_batches_is_the_mean_over_real_samples():
    """Simulate FSDP: each rank backpropagates world * its shares; gradients are averaged over ranks."""
    g = torch.Generator().manual_seed(0)
    world, acc, per_rank, dim = 2, 2, 3, 5
    x = torch.randn(world, acc, per_rank, dim, generator=g)
    y = torch.randn(world, acc, per_rank, 1, generator=g)
    weights = torch.ones(world, acc, per_rank)
    weights[1, 1, 1:] = 0.0  # padding on rank 1's second micro-batch
    weights[0, 1, 2] = 0.0
    w0 = torch.randn(dim, 1, generator=g)
    total = float(weights.sum())

    grads, value = [], 0.0
    for r in range(world):
        w = w0.clone().requires_grad_(True)
        for m in range(acc):
            share = loss.reduce_loss(_per_sample(w, x[r, m], y[r, m]), weights[r, m], total)
            value += float(share.detach())
            (share * world).backward()
        grads.append(w.grad)
    averaged = torch.stack(grads).mean(0)  # FSDP's gradient average over ranks

    real = weights.reshape(-1) > 0
    w = w0.clone().requires_grad_(True)
    losses = _per_sample(w, x.reshape(-1, dim), y.reshape(-1, 1))[real]
    expected = losses.mean()
    expected.backward()
    assert value == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(averaged, w.grad)
    # Changing what the padding holds changes nothing.
    x2 = x.clone()
    x2[1, 1, 1:] = 1e3
    assert float(loss.reduce_loss(_per_sample(w0, x2[1, 1], y[1, 1]), weights[1, 1], total)) == pytest.approx(
        float(loss.reduce_loss(_per_sample(w0, x[1, 1], y[1, 1]), weights[1, 1], total))
    )
