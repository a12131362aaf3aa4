"""Flags of issue 18's cheaper-step levers, beside FP8 (`fp8_args.py`): what the step's profile shows after the
matmuls (README, Performance). Each keeps the default's numerics unless switched on."""

from __future__ import annotations

import argparse

ADAMW_KERNELS = ("foreach", "fused")

# Resume: the kernel changes how the update is computed (rounding order), not the optimizer state's layout (the same
# exp_avg, exp_avg_sq and step per tensor; torch moves `step` where the fused kernel wants it on load).
RESUME_RULES = {"adamw_kernel": "may_change"}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cheaper optimizer step")
    g.add_argument(
        "--adamw_kernel",
        choices=ADAMW_KERNELS,
        default="foreach",
        help="--optimizer adamw's implementation: foreach (torch's multi-tensor ops, about 10 passes over the fp32 "
        "masters and their state) or fused (one kernel per tensor group reading and writing each element once: "
        "the cheaper step; same formula, other rounding order) (default foreach)",
    )


def check_args(args: argparse.Namespace) -> None:
    if args.adamw_kernel == "fused" and args.optimizer != "adamw":
        raise ValueError(f"--adamw_kernel fused is torch's AdamW: it needs --optimizer adamw, not {args.optimizer}")
