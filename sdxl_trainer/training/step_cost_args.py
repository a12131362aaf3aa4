"""Flags of issue 18's cheaper-step levers, beside FP8 (`fp8_args.py`): what the step's profile shows after the
matmuls (README, Performance). Each keeps the default's numerics unless switched on."""

from __future__ import annotations

import argparse

import torch

ADAMW_KERNELS = ("auto", "foreach", "fused")

# Resume: for adamw the kernel changes how the update is computed (rounding order), not the optimizer state's layout
# (the same exp_avg, exp_avg_sq and step per tensor; torch moves `step` where the fused kernel wants it on load). For
# adamw8bit the fused kernel's state is its own: the checkpoint names the optimizer `adamw8bit+fused` and the
# resume refuses a change there (checkpoint.py), with the flag named.
RESUME_RULES = {"adamw_kernel": "may_change"}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cheaper optimizer step")
    g.add_argument(
        "--adamw_kernel",
        choices=ADAMW_KERNELS,
        default="auto",
        help="the AdamW step's implementation: auto (fused for --optimizer adamw on a GPU without --cpu_offload, "
        "else foreach), foreach (torch's multi-tensor ops, about 10 passes over the fp32 "
        "masters and their state; for adamw8bit, bitsandbytes) or fused (one kernel reading and writing each element "
        "once: torch's fused AdamW with --optimizer adamw, same formula, other rounding order; with --optimizer "
        "adamw8bit and --master_weights bf16_stochastic on one process, torchao's compiled 8-bit step with "
        "stochastic rounding, whose state a resume must keep) (default auto)",
    )


def resolve_kernel(choice: str, optimizer: str, cuda: bool, cpu_offload: bool) -> str:
    """`auto`: torch's fused AdamW where it is the cheaper step: the fp32 optimizer on the GPU (the default plan on an
    H200, 18.71 images/s against 17.90 with foreach in one call; README, FP8). Foreach elsewhere: on the CPU (FSDP2's
    offloaded step, the tests: their numerics stay as written) and for adamw8bit, whose fused kernel is host-bound
    inside the step in backward (measured slower, README Memory)."""
    if choice != "auto":
        return choice
    return "fused" if optimizer == "adamw" and cuda and not cpu_offload else "foreach"


def check_args(args: argparse.Namespace) -> None:
    # After memory_args: the plan has decided --optimizer and --cpu_offload.
    args.adamw_kernel = resolve_kernel(args.adamw_kernel, args.optimizer, torch.cuda.is_available(), args.cpu_offload)
    if args.adamw_kernel != "fused" or args.optimizer == "adamw":
        return
    if args.optimizer != "adamw8bit" or args.master_weights != "bf16_stochastic":
        raise ValueError(
            f"--adamw_kernel fused needs --optimizer adamw (torch's fused AdamW) or --optimizer adamw8bit with "
            f"--master_weights bf16_stochastic (the fused 8-bit step over bf16 weights), not --optimizer "
            f"{args.optimizer} with --master_weights {args.master_weights}"
        )
