"""Flags of the training objective (issue 17): loss type and weighting, noise options, schedule and target,
timestep sampling. Every option is off by default: the trainer then trains plain MSE on the model's own schedule
with uniform timesteps. Peer names are listed in docs/training.md.
"""

from __future__ import annotations

import argparse

from sdxl_trainer.arg_types import non_negative_int
from sdxl_trainer.training import loss, noise, prediction, timesteps

# Issue 15's resume check: the schedule and the target define what the weights mean (a checkpoint trained for v
# cannot continue as epsilon); loss weighting, noise and timestep options are tuning and may change on resume.
RESUME_RULES = {
    "loss_type": "may_change",
    "huber_c": "may_change",
    "huber_schedule": "may_change",
    "snr_gamma": "may_change",
    "debiased_estimation_loss": "may_change",
    "noise_offset": "may_change",
    "noise_offset_random_strength": "may_change",
    "multires_noise_iterations": "may_change",
    "multires_noise_discount": "may_change",
    "input_perturbation": "may_change",
    "prediction_type": "must_match",
    "zero_terminal_snr": "must_match",
    "sample_guidance_rescale": "may_change",
    "timestep_sampling": "may_change",
    "logit_mean": "may_change",
    "logit_std": "may_change",
    "min_timestep": "may_change",
    "max_timestep": "may_change",
    "timestep_bias_strategy": "may_change",
    "timestep_bias_multiplier": "may_change",
    "timestep_bias_portion": "may_change",
    "timestep_bias_begin": "may_change",
    "timestep_bias_end": "may_change",
}


class ObjectiveArgsError(ValueError):
    """An objective flag is invalid; the message names it."""


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("loss (type and per-timestep weighting)")
    g.add_argument(
        "--loss_type",
        choices=loss.LOSS_TYPES,
        default="l2",
        help="l2 (default), huber (pseudo-Huber: L2 for small errors, L1 for large) or smooth_l1",
    )
    g.add_argument(
        "--huber_c",
        type=float,
        default=0.1,
        help="Huber threshold c (default 0.1; with --huber_schedule snr/exponential: its value at t=T)",
    )
    g.add_argument(
        "--huber_schedule",
        choices=loss.HUBER_SCHEDULES,
        default="snr",
        help="how c varies with the timestep: snr (default), exponential or constant",
    )
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="min-SNR-gamma weighting, e.g. 5 (default: off); for epsilon and v targets",
    )
    g.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="weight the loss by 1/sqrt(SNR) (epsilon) or 1/(SNR+1) (v) (default: off)",
    )
    g = parser.add_argument_group("noise")
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="strength of a per-channel constant added to the noise, e.g. 0.05 (default 0: off)",
    )
    g.add_argument(
        "--noise_offset_random_strength",
        action="store_true",
        help="draw each item's offset strength uniformly from [0, --noise_offset] (default: off)",
    )
    g.add_argument(
        "--multires_noise_iterations",
        type=non_negative_int,
        default=0,
        help="levels of multi-resolution (pyramid) noise, e.g. 6 (default 0: off)",
    )
    g.add_argument(
        "--multires_noise_discount", type=float, default=0.3, help="weight factor per pyramid level (default 0.3)"
    )
    g.add_argument(
        "--input_perturbation",
        type=float,
        default=0.0,
        help="extra noise on the UNet input only, e.g. 0.1 (default 0: off)",
    )
    g = parser.add_argument_group("schedule and prediction target")
    g.add_argument(
        "--prediction_type",
        choices=prediction.PREDICTION_TYPES,
        default=None,
        help="train this target (default: the model's scheduler config); v_prediction from an "
        "epsilon base converts the model; saved pipelines' schedulers say so",
    )
    g.add_argument(
        "--zero_terminal_snr",
        action="store_true",
        help="rescale the betas to a zero terminal SNR (needs v_prediction); saved pipelines sample "
        "with trailing spacing (default: off)",
    )
    g.add_argument(
        "--sample_guidance_rescale",
        type=float,
        default=None,
        help="guidance rescale of samples and validation images (default: 0.7 with --zero_terminal_snr, else 0)",
    )
    g = parser.add_argument_group("timestep sampling")
    g.add_argument(
        "--timestep_sampling",
        choices=timesteps.SAMPLINGS,
        default="uniform",
        help="uniform (default) or logit_normal (more weight on middle timesteps)",
    )
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit-normal mean (default 0)")
    g.add_argument("--logit_std", type=float, default=1.0, help="logit-normal standard deviation (default 1)")
    g.add_argument("--min_timestep", type=non_negative_int, default=0, help="lowest timestep trained (default 0)")
    g.add_argument(
        "--max_timestep",
        type=non_negative_int,
        default=None,
        help="timesteps trained are below this (default: the scheduler's num_train_timesteps)",
    )
    g.add_argument(
        "--timestep_bias_strategy",
        choices=timesteps.BIAS_STRATEGIES,
        default="none",
        help="favour earlier or later timesteps or a range (default none)",
    )
    g.add_argument(
        "--timestep_bias_multiplier",
        type=float,
        default=1.0,
        help="weight of the biased timesteps relative to the others (default 1)",
    )
    g.add_argument(
        "--timestep_bias_portion",
        type=float,
        default=0.25,
        help="share of timesteps biased by earlier/later (default 0.25)",
    )
    g.add_argument(
        "--timestep_bias_begin",
        type=non_negative_int,
        default=0,
        help="first biased timestep of the range strategy (default 0)",
    )
    g.add_argument("--timestep_bias_end", type=non_negative_int, default=1000,
                   help="end (exclusive) of the range strategy (default 1000)")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    if args.huber_c <= 0 or (args.huber_schedule != "constant" and args.huber_c > 1):
        raise ObjectiveArgsError(f"--huber_c must be in (0, 1] (or > 0 with --huber_schedule constant), "
                                 f"got {args.huber_c}")  # fmt: skip
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise ObjectiveArgsError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    for name in ("noise_offset", "input_perturbation"):
        if getattr(args, name) < 0:
            raise ObjectiveArgsError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.noise_offset_random_strength and args.noise_offset == 0:
        raise ObjectiveArgsError("--noise_offset_random_strength needs --noise_offset > 0")
    if not 0 < args.multires_noise_discount <= 1:
        raise ObjectiveArgsError(f"--multires_noise_discount must be in (0, 1], got {args.multires_noise_discount}")
    if args.sample_guidance_rescale is not None and not 0 <= args.sample_guidance_rescale <= 1:
        raise ObjectiveArgsError(f"--sample_guidance_rescale must be in [0, 1], got {args.sample_guidance_rescale}")
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        raise ObjectiveArgsError("--zero_terminal_snr needs --prediction_type v_prediction (epsilon cannot be "
                                 "learned at SNR 0)")  # fmt: skip
    if not args.logit_std > 0:
        raise ObjectiveArgsError(f"--logit_std must be > 0, got {args.logit_std}")
    if args.max_timestep is not None and args.max_timestep <= args.min_timestep:
        raise ObjectiveArgsError(f"--max_timestep {args.max_timestep} must be above --min_timestep {args.min_timestep}")
    if args.timestep_bias_strategy != "none" and not args.timestep_bias_multiplier > 0:
        raise ObjectiveArgsError(f"--timestep_bias_multiplier must be > 0, got {args.timestep_bias_multiplier}")
    if args.timestep_bias_strategy in ("earlier", "later") and not 0 < args.timestep_bias_portion <= 1:
        raise ObjectiveArgsError(f"--timestep_bias_portion must be in (0, 1], got {args.timestep_bias_portion}")
    if args.timestep_bias_strategy == "range" and args.timestep_bias_end <= args.timestep_bias_begin:
        raise ObjectiveArgsError(f"--timestep_bias_end {args.timestep_bias_end} must be above "
                                 f"--timestep_bias_begin {args.timestep_bias_begin}")  # fmt: skip


def check_against_schedule(args: argparse.Namespace, num_train_timesteps: int) -> None:
    """Checks that need the model's scheduler (at setup)."""
    if args.min_timestep >= num_train_timesteps:
        raise ObjectiveArgsError(f"--min_timestep {args.min_timestep}: the model has {num_train_timesteps} timesteps")
    if args.max_timestep is not None and args.max_timestep > num_train_timesteps:
        raise ObjectiveArgsError(f"--max_timestep {args.max_timestep}: the model has {num_train_timesteps} timesteps")
    if args.timestep_bias_strategy == "range" and args.timestep_bias_end > num_train_timesteps:
        raise ObjectiveArgsError(f"--timestep_bias_end {args.timestep_bias_end} is beyond the model's "
                                 f"{num_train_timesteps} timesteps")  # fmt: skip


def timestep_options(args: argparse.Namespace) -> timesteps.TimestepOptions:
    return timesteps.TimestepOptions(
        sampling=args.timestep_sampling, min_timestep=args.min_timestep, max_timestep=args.max_timestep,
        logit_mean=args.logit_mean, logit_std=args.logit_std, bias_strategy=args.timestep_bias_strategy,
        bias_multiplier=args.timestep_bias_multiplier, bias_portion=args.timestep_bias_portion,
        bias_begin=args.timestep_bias_begin, bias_end=args.timestep_bias_end,
    )  # fmt: skip


def loss_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of `loss.per_sample_loss`."""
    return {
        "loss_type": args.loss_type, "huber_c": args.huber_c, "huber_schedule": args.huber_schedule,
        "snr_gamma": args.snr_gamma, "debiased_estimation": args.debiased_estimation_loss,
    }  # fmt: skip


def noise_options(args: argparse.Namespace) -> noise.NoiseOptions:
    return noise.NoiseOptions(
        offset=args.noise_offset, offset_random_strength=args.noise_offset_random_strength,
        pyramid_iterations=args.multires_noise_iterations, pyramid_discount=args.multires_noise_discount,
        input_perturbation=args.input_perturbation,
    )  # fmt: skip
