"""Learning-rate schedules (diffusers' set) whose length is the run's real number of optimizer steps.

The original let accelerate step the schedule N times per update on N GPUs and compensated only the
warm-up, so decaying schedules ended after 1/N of training (B4). Here the schedule is stepped once per
optimizer step by the loop itself, and its length comes from the data plan (`total_optimizer_steps`), which
already accounts for the number of processes, the per-GPU batch and gradient accumulation.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


def total_optimizer_steps(epoch_step_counts: Sequence[int], max_train_steps: int | None = None) -> int:
    """The schedule's length: the optimizer steps the run will take (`data.epoch_step_counts` per epoch, which
    already divides by processes x per-GPU batch x accumulation), or --max_train_steps when given."""
    return max_train_steps if max_train_steps else sum(epoch_step_counts)


def warmup_steps(args: argparse.Namespace, total_steps: int) -> int:
    if args.lr_warmup_steps is not None:
        return min(args.lr_warmup_steps, total_steps)
    return int(round(args.percent_lr_warm_up_steps * total_steps))


def build_lr_scheduler(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' `get_scheduler` (polynomial through its own function, which takes lr_end)."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    warm = warmup_steps(args, total_steps)
    name = args.learning_rate_scheduler
    if name == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer,
            num_warmup_steps=warm,
            num_training_steps=total_steps,
            lr_end=args.polynomial_lr_end,
            power=args.polynomial_power,
        )
    return get_scheduler(
        name,
        optimizer,
        step_rules=args.lr_step_rules,
        num_warmup_steps=warm,
        num_training_steps=total_steps,
        num_cycles=args.lr_num_cycles,
        power=args.polynomial_power,
    )
