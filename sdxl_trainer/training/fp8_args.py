"""Flags of FP8 training (`training/fp8.py`) and their start-up checks."""

from __future__ import annotations

import argparse

import torch

from sdxl_trainer.arg_types import positive_int
from sdxl_trainer.training import fp8

# Resume (issue 15): FP8 changes only how the matmuls compute, never the weights, their names, the optimizer state
# or the data order, so a checkpoint may be resumed with FP8 switched on, off or to another recipe.
RESUME_RULES = {"fp8": "may_change", "fp8_min_features": "may_change"}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FP8 matmuls (torchao float8 training; GPUs with compute capability >= 8.9)")
    g.add_argument(
        "--fp8",
        choices=fp8.CHOICES,
        default="none",
        help="run the UNet's large linear layers' matmuls in FP8 with dynamic scales: tensorwise (one scale per "
        "tensor) or rowwise (one per row, more precise, slower); weights, optimizer and checkpoints stay as in bf16; "
        "fastest with --compile (default none)",
    )
    g.add_argument(
        "--fp8_min_features",
        type=positive_int,
        default=fp8.DEFAULT_MIN_FEATURES,
        help="with --fp8: linear layers with fewer input or output features stay bf16 (their matmuls are too "
        f"small for FP8 to pay for its casts; default {fp8.DEFAULT_MIN_FEATURES}: SDXL's 1280-channel stages)",
    )


def check_args(args: argparse.Namespace) -> None:
    if args.fp8 == "none":
        return
    if args.mixed_precision == "fp16":
        raise ValueError("--fp8 with --mixed_precision fp16: use bf16 (the FP8 casts and outputs are made for bf16)")
    if torch.cuda.is_available():
        error = fp8.support_error(torch.device("cuda", torch.cuda.current_device()))
        if error:
            raise ValueError(error)
