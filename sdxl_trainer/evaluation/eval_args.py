"""Flags of the evaluation step (samples, validation images, scores) and their start-up checks.

The trainer's parser gets them through `sdxl_trainer.evaluation.eval_args.add_args`. Names follow the
original trainer where it had the flag (seed_reference §1.1).
"""

from __future__ import annotations

import argparse

from sdxl_trainer.arg_types import non_negative_int, positive_fraction, positive_int
from sdxl_trainer.evaluation import sampling, score_math, scorers

# Resume (training.resume_check): evaluation settings may change between a checkpoint and its resume (the
# hold-out itself is the checkpoint's).
RESUME_RULES = {
    name: "may_change"
    for name in (
        "save_samples", "num_sample_images", "sample_prompts", "save_samples_every_n_epochs",
        "start_save_samples_epoch", "sample_steps", "sample_guidance_scale", "sample_seed", "sample_width_px",
        "sample_height_px", "sample_batch_size", "sample_grid_max_rows", "validation_image",
        "validation_image_every_n_epochs", "save_validation_images", "metrics", "metrics_inception_weights",
        "metrics_lpips_backbone", "metrics_hps_checkpoint", "metrics_hps_model", "metrics_batch_size",
        "metrics_is_splits", "metrics_kid_subsets", "metrics_kid_subset_size", "keep_eval_models_on_device",
        "validation_image_percent",
    )
}  # fmt: skip


class EvaluationArgsError(ValueError):
    """An evaluation flag is invalid; the message names it."""


def _metric_list(text: str) -> list[str]:
    try:
        return score_math.parse_metrics(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_args(parser: argparse.ArgumentParser) -> None:
    """Flags for samples, validation images and scores (the original's names where it had them)."""
    g = parser.add_argument_group("sample grid (one row per sampled epoch, same seed per prompt)")
    g.add_argument("--save_samples", action="store_true", help="make the sample grid (row 1 = base model)")
    g.add_argument("--num_sample_images", type=positive_int, default=8, help="prompts in the grid")
    g.add_argument(
        "--sample_prompts",
        default=str(sampling.DEFAULT_SAMPLE_PROMPTS_FILE),
        help="UTF-8 file, one prompt per line (# comments); its first --num_sample_images prompts are used, "
        "training captions fill up when it has fewer",
    )
    g.add_argument("--save_samples_every_n_epochs", type=positive_int, default=10, help="a row every N epochs")
    g.add_argument("--start_save_samples_epoch", type=non_negative_int, default=0, help="first epoch with a row")
    g.add_argument("--sample_steps", type=positive_int, default=30, help="denoising steps (samples and validation)")
    g.add_argument("--sample_guidance_scale", type=float, default=5.0, help="classifier-free guidance scale")
    g.add_argument("--sample_seed", type=int, default=0, help="prompt i uses seed sample_seed + i in every row")
    g.add_argument("--sample_width_px", type=positive_int, default=None, help="sample width (default: model's)")
    g.add_argument("--sample_height_px", type=positive_int, default=None, help="sample height (default: model's)")
    g.add_argument(
        "--sample_batch_size", type=positive_int, default=1, help="images per pipeline call (samples, validation)"
    )
    g.add_argument(
        "--sample_grid_max_rows",
        type=int,
        default=20,
        help="image rows per grid file (>= 2); further rows go to the next sample_grid_NNN.png",
    )
    g = parser.add_argument_group("validation images and scores (IS, FID, KID, LPIPS, HPSv2.1)")
    g.add_argument("--validation_image", action="store_true", help="generate and score validation images")
    g.add_argument(
        "--validation_image_percent",
        type=positive_fraction,
        default=0.10,
        help="fraction of the items held out as validation images (the trainer holds them out)",
    )
    g.add_argument(
        "--validation_image_every_n_epochs", type=positive_int, default=10, help="at epoch 0 and every N epochs"
    )
    g.add_argument(
        "--save_validation_images", action="store_true", help="also write them to <run>/validation_images/epoch_N/"
    )
    g.add_argument(
        "--metrics",
        type=_metric_list,
        default=list(score_math.METRICS),
        help="comma list of fid,kid,is,lpips,hps (default: all; those without weights are skipped with a note)",
    )
    g.add_argument(
        "--metrics_inception_weights",
        default=None,
        help=f"FID/KID/IS: torch-fidelity's {scorers.INCEPTION_FILE_NAME} (default: the torch hub cache copy)",
    )
    g.add_argument("--metrics_lpips_backbone", default=None, help="LPIPS: torchvision alexnet (or vgg16) weights")
    g.add_argument("--metrics_hps_checkpoint", default=None, help="HPSv2: HPS_v2.1_compressed.pt")
    g.add_argument("--metrics_hps_model", default="ViT-H-14", help="open_clip architecture of the HPS checkpoint")
    g.add_argument("--metrics_batch_size", type=positive_int, default=16, help="images per scorer forward")
    g.add_argument("--metrics_kid_subsets", type=positive_int, default=100, help="KID: number of subsets")
    g.add_argument("--metrics_kid_subset_size", type=positive_int, default=1000, help="KID: images per subset")
    g.add_argument("--metrics_is_splits", type=positive_int, default=10, help="IS: number of splits")
    g.add_argument(
        "--keep_eval_models_on_device",
        action="store_true",
        help="keep the sampling pipeline and scorers on the GPU between evaluations (faster, uses memory)",
    )


def check_args(args: argparse.Namespace) -> None:
    """Reject bad combinations at start (message names the flag)."""
    if args.sample_grid_max_rows < 2:
        raise EvaluationArgsError("--sample_grid_max_rows must be >= 2 (the Base Model row plus one epoch row)")
    for flag, value in (("--sample_width_px", args.sample_width_px), ("--sample_height_px", args.sample_height_px)):
        if value is not None and value % 8:
            raise EvaluationArgsError(f"{flag} must be a multiple of 8 (the VAE's factor), got {value}")
    if args.save_samples:
        sampling.read_prompts_file(args.sample_prompts)  # raises naming --sample_prompts
