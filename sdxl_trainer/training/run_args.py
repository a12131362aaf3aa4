"""Flags of the run folder and of periodic checkpoints (issue 15), with their start-up checks."""

from __future__ import annotations

import argparse

DEFAULT_CHECKPOINTING_MINUTES = 30.0

RESUME_RULES = {"checkpointing_minutes": "may_change", "overwrite_output_dir": "may_change"}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run folder and periodic checkpoints")
    g.add_argument(
        "--checkpointing_minutes",
        type=float,
        default=DEFAULT_CHECKPOINTING_MINUTES,
        help="also write a checkpoint when this many minutes passed since the last one (decided by all ranks "
        f"together after an optimizer step), so a crash loses at most that much; 0 = off "
        f"(default {DEFAULT_CHECKPOINTING_MINUTES:g})",
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start a fresh run in an --output_dir that holds an earlier run's checkpoints, deleting that run's "
        "checkpoints, logs, TensorBoard events and saved models (default off: such a run stops and says so)",
    )


def check_args(args: argparse.Namespace) -> None:
    minutes = args.checkpointing_minutes
    if not minutes >= 0:  # also rejects NaN
        raise ValueError(f"--checkpointing_minutes must be >= 0 (0 = off), got {minutes}")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir starts over and --resume_from_checkpoint continues: give one of them")
