"""Flags of the EMA of the trained weights (issue 17). Off by default: EMA costs one fp32 copy of each rank's
shards (on the GPU, or in CPU RAM with `--ema_device cpu`) and one pass over them per update."""

from __future__ import annotations

import argparse

from sdxl_trainer.arg_types import non_negative_int, positive_int
from sdxl_trainer.training.ema import EmaSchedule

# Issue 15's resume check. use_ema: the checkpoint must hold the EMA weights a resume continues. The schedule and
# where the shadows live are tuning (the count of updates is derived from the optimizer step, not stored).
RESUME_RULES = {
    "use_ema": "must_match",
    "ema_decay": "may_change",
    "ema_min_decay": "may_change",
    "ema_update_after_step": "may_change",
    "ema_warmup": "may_change",
    "ema_inv_gamma": "may_change",
    "ema_power": "may_change",
    "ema_update_every_steps": "may_change",
    "ema_device": "may_change",
    "ema_for_eval": "may_change",
    "save_both_weights": "may_change",
}


class EmaArgsError(ValueError):
    """An EMA flag is invalid; the message names it."""


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("EMA of the trained weights")
    g.add_argument("--use_ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="largest decay per update (default 0.9999)")
    g.add_argument("--ema_min_decay", type=float, default=0.0, help="smallest decay per update (default 0)")
    g.add_argument(
        "--ema_update_after_step",
        type=non_negative_int,
        default=0,
        help="EMA updates that only copy the weights before averaging starts (default 0)",
    )
    g.add_argument(
        "--ema_warmup",
        action="store_true",
        help="power warm-up 1-(1+n/inv_gamma)^-power instead of (1+n)/(10+n) (default: off)",
    )
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="inv_gamma of --ema_warmup (default 1)")
    g.add_argument("--ema_power", type=float, default=2 / 3, help="power of --ema_warmup (default 2/3)")
    g.add_argument(
        "--ema_update_every_steps",
        type=positive_int,
        default=1,
        help="update the EMA every N optimizer steps (default 1); the decay counts updates",
    )
    g.add_argument(
        "--ema_device",
        choices=("gpu", "cpu"),
        default="gpu",
        help="where the EMA shards live: gpu (default; the training device) or cpu (saves GPU memory, "
        "costs a copy per update)",
    )
    g.add_argument(
        "--ema_for_eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="samples, validation images, scores and saved pipelines from the EMA weights (default: on with --use_ema)",
    )
    g.add_argument("--save_both_weights", action="store_true",
                   help="with --use_ema also save the other weights beside each pipeline: <name>-non_ema (or "
                   "<name>-ema with --no-ema_for_eval) (default: off)")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.ema_min_decay <= args.ema_decay <= 1:
        raise EmaArgsError(f"--ema_decay {args.ema_decay} and --ema_min_decay {args.ema_min_decay}: need "
                           "0 <= min_decay <= decay <= 1")  # fmt: skip
    if args.ema_inv_gamma <= 0 or args.ema_power <= 0:
        raise EmaArgsError("--ema_inv_gamma and --ema_power must be > 0")
    if args.save_both_weights and not args.use_ema:
        raise EmaArgsError("--save_both_weights needs --use_ema")


def schedule(args: argparse.Namespace) -> EmaSchedule:
    return EmaSchedule(
        decay=args.ema_decay, min_decay=args.ema_min_decay, update_after_step=args.ema_update_after_step,
        warmup=args.ema_warmup, inv_gamma=args.ema_inv_gamma, power=args.ema_power,
        update_every_steps=args.ema_update_every_steps,
    )  # fmt: skip
