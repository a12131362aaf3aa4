"""Flags of `--optimizer prodigy` (`training/prodigy.py`) and their start-up checks."""

from __future__ import annotations

import argparse

# Below this --learning_rate, Prodigy is almost surely given an AdamW learning rate by mistake: its own estimate D
# is the step size and --learning_rate only scales it (1.0 = as estimated), so 3e-5 would train 30,000 times slower.
MIN_LEARNING_RATE = 0.1

# The statistics D is estimated from live in the optimizer state: changing how they accumulate midway would mix
# two estimates in one run.
RESUME_RULES = {
    "prodigy_d_coef": "may_change",  # scales the estimate from the next step on, like --learning_rate
    "prodigy_use_bias_correction": "must_match",
    "prodigy_safeguard_warmup": "must_match",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Prodigy (--optimizer prodigy: Adam with a step size estimated from the run)")
    g.add_argument(
        "--prodigy_d_coef",
        type=float,
        default=1.0,
        help="multiplies Prodigy's estimate of the step size; the preferred knob (0.5-2 typical; default 1.0)",
    )
    g.add_argument(
        "--prodigy_use_bias_correction",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Adam's bias correction in Prodigy's step (recommended by its authors for diffusion models)",
    )
    g.add_argument(
        "--prodigy_safeguard_warmup",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="leave the learning rate out of the estimate's denominator, so an LR warm-up does not inflate it "
        "(recommended with --lr_warmup_steps / --percent_lr_warm_up_steps)",
    )


def check_args(args: argparse.Namespace) -> None:
    """After the memory plan resolved --master_weights and --optimizer_step_in_backward."""
    if args.optimizer != "prodigy":
        return
    if args.learning_rate < MIN_LEARNING_RATE:
        raise ValueError(
            f"--optimizer prodigy estimates the step size itself and --learning_rate multiplies it: give "
            f"--learning_rate 1.0 (or {MIN_LEARNING_RATE} and above), not {args.learning_rate}"
        )
    if not args.prodigy_d_coef > 0:
        raise ValueError(f"--prodigy_d_coef must be positive, got {args.prodigy_d_coef}")
    per_tensor = []
    if args.master_weights == "bf16_stochastic":
        per_tensor.append("--master_weights bf16_stochastic")
    if args.optimizer_step_in_backward:
        per_tensor.append("--optimizer_step_in_backward")
    if per_tensor:
        raise ValueError(
            f"--optimizer prodigy estimates one step size from all tensors before any moves; "
            f"{' and '.join(per_tensor)} step tensor by tensor (memory plan {args.memory_plan_chosen}): use "
            "--master_weights fp32 and --no-optimizer_step_in_backward, or another --optimizer"
        )
