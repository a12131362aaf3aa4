"""Flags of where the run's metrics go (issue 17): TensorBoard (default) and/or Weights & Biases."""

from __future__ import annotations

import argparse

from sdxl_trainer.training import wandb_log

DESTINATIONS = ("tensorboard", "wandb")

# Issue 15's resume check: logging only.
RESUME_RULES = {"report_to": "may_change", "wandb_project": "may_change", "wandb_mode": "may_change"}


class ReportArgsError(ValueError):
    """A logging flag is invalid; the message names it."""


def _destinations(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DESTINATIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(DESTINATIONS)}")
    return sorted(set(names), key=DESTINATIONS.index)


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("metrics destinations")
    g.add_argument(
        "--report_to",
        type=_destinations,
        default=["tensorboard"],
        help="tensorboard (default), wandb, or tensorboard,wandb: the same scalars, sample grids and "
        "summary to each (wandb is optional: pip install wandb)",
    )
    g.add_argument("--wandb_project", default=None, help="W&B project (default: --project_name)")
    g.add_argument("--wandb_mode", choices=wandb_log.MODES, default="auto",
                   help="auto (default: online when the W&B server answers, else offline into "
                   "<output_dir>/wandb for a later `wandb sync`), online or offline")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    if "wandb" in args.report_to:
        try:
            wandb_log.check_installed()
        except wandb_log.WandbUnavailable as exc:
            raise ReportArgsError(str(exc)) from exc
