"""LR schedule length: right for any number of processes and accumulation steps (B4)."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from sdxl_trainer.data import sampler
from sdxl_trainer.training import lr_schedule


def _args(**kw) -> argparse.Namespace:
    base = dict(
        learning_rate_scheduler="linear", lr_warmup_steps=None, percent_lr_warm_up_steps=0.1, polynomial_lr_end=1e-7,
        polynomial_power=1.0, lr_num_cycles=1, lr_step_rules=None, learning_rate=1e-3,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


BUCKETS = {(64, 64): 61, (64, 96): 23, (96, 64): 40}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_schedule_length_equals_the_optimizer_steps_the_run_takes(world, accumulation):
    per_rank, epochs, seed = 2, 4, 7
    buckets = [b for b, n in BUCKETS.items() for _ in range(n)]
    random.Random(1).shuffle(buckets)
    global_batch = per_rank * world
    # What the loop will do: simulate the real plans epoch by epoch.
    state, steps_taken = sampler.SamplerState(), 0
    for _ in range(epochs):
        plan = sampler.plan_epoch(buckets, state.carried_in, state.deferred_in, global_batch, accumulation, seed,
                               state.epoch)  # fmt: skip
        steps_taken += len(plan.batches) // accumulation
        state = sampler.SamplerState(state.epoch + 1, 0, plan.leftovers, plan.deferred)
    planned = lr_schedule.total_optimizer_steps(
        sampler.epoch_step_counts(list(BUCKETS.values()), global_batch, accumulation, epochs)
    )
    assert planned == steps_taken
    # About items / (batch x processes x accumulation) per epoch: more processes, fewer steps.
    assert abs(planned - epochs * sum(BUCKETS.values()) / (global_batch * accumulation)) <= epochs + 1
    # A linear schedule of that length ends exactly at the run's last step, stepped once per optimizer step.
    opt = _optimizer()
    sched = lr_schedule.build_lr_scheduler(_args(), opt, planned)
    lrs = _lrs(sched, opt, planned)
    assert lrs[-1] > 0 and opt.param_groups[0]["lr"] == 0.0
    warm = lr_schedule.warmup_steps(_args(), planned)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == warm


def test_cosine_decays_to_zero_at_the_end_without_rising_again():
    opt = _optimizer()
    sched = lr_schedule.build_lr_scheduler(
        _args(learning_rate_scheduler="cosine", percent_lr_warm_up_steps=0.0), opt, 50
    )
    lrs = _lrs(sched, opt, 50) + [opt.param_groups[0]["lr"]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_polynomial_reaches_lr_end_with_the_given_power():
    opt = _optimizer()
    args = _args(learning_rate_scheduler="polynomial", percent_lr_warm_up_steps=0.0, polynomial_power=2.0)
    sched = lr_schedule.build_lr_scheduler(args, opt, 10)
    lrs = _lrs(sched, opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7)
    assert lrs[5] == pytest.approx((1e-3 - 1e-7) * 0.5**2 + 1e-7)


def test_warmup_as_a_count_or_a_fraction():
    assert lr_schedule.warmup_steps(_args(percent_lr_warm_up_steps=0.02), 1000) == 20
    assert lr_schedule.warmup_steps(_args(lr_warmup_steps=30, percent_lr_warm_up_steps=None), 1000) == 30
    assert lr_schedule.warmup_steps(_args(lr_warmup_steps=3000, percent_lr_warm_up_steps=None), 1000) == 1000
    opt = _optimizer()
    sched = lr_schedule.build_lr_scheduler(_args(learning_rate_scheduler="constant_with_warmup", lr_warmup_steps=4,
                                                 percent_lr_warm_up_steps=None), opt, 100)  # fmt: skip
    assert _lrs(sched, opt, 6) == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_max_train_steps_sets_the_length():
    assert lr_schedule.total_optimizer_steps([5, 5, 5], max_train_steps=12) == 12
    assert lr_schedule.total_optimizer_steps([5, 5, 5]) == 15
