"""Every flag of the trainer, grouped by concern, and the checks that reject bad combinations at start.

Flag names and meanings follow the original trainer (seed_reference.md §1.1) plus the flags users of the
accelerate/diffusers example scripts expect. One parser holds everything: the evaluation flags (samples,
validation images and scores) and every group in `_flag_modules` are declared by their own modules.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from sdxl_trainer.arg_types import HelpFormatter, fraction, non_negative_int, positive_int
from sdxl_trainer.models import loading
from sdxl_trainer.training import allocator, compiling

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
OPTIMIZERS = ("adamw8bit", "adamw", "adafactor", "lion8bit", "prodigy")
SHARDING = ("auto", "none", "full_shard", "shard_grad_op", "no_shard", "hybrid_shard")
MIXED_PRECISION = ("bf16", "fp16", "no")
DEFAULT_COMPILE = "auto"  # --compile: transformers on one GPU without FSDP, else none (compiling.resolve_choice)
DEFAULT_SEED = 123  # the original's fallback seed: an unseeded run is still reproducible
DEFAULT_WARMUP_FRACTION = 0.02


class ArgsError(ValueError):
    """A flag value or combination is invalid; the message names the flag."""


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data (the cache written by sdxl_process_data_dir.py)")
    g.add_argument(
        "--cached_dataset_dirs",
        nargs="+",
        default=[],
        help="cache roots (every dataset cache below them is used) or single datasets' cache folders",
    )
    g.add_argument(
        "--cached_dataset_lists",
        nargs="+",
        default=[],
        help="older name: files or folders inside a dataset's cache folder; their dataset cache folder is used",
    )
    g.add_argument("--train_batch_size", type=positive_int, default=10, help="images per GPU per micro-step")
    g.add_argument(
        "--conditional_dropout_percent",
        type=fraction,
        default=0.1,
        help="fraction of items trained with the empty caption's embeddings (classifier-free guidance)",
    )
    g.add_argument(
        "--dataloader_num_workers", type=non_negative_int, default=2, help="CPU worker processes reading the cache"
    )
    g.add_argument("--set_seed", type=int, default=None, help=f"seed of every random choice (default {DEFAULT_SEED})")
    g.add_argument(
        "--max_resolution",
        type=int,
        default=None,
        help="if given, must equal the cache's --max_resolution (training uses the cache's buckets)",
    )
    g.add_argument("--min_resolution", type=int, default=None, help="if given, must equal the cache's value")
    g.add_argument("--upscale_to_resolution", type=int, default=None, help="if given, must equal the cache's value")
    g.add_argument(
        "--data_dir",
        default=None,
        help="the dataset folder the cache was built from (optional; validation scores read reference images)",
    )
    for old in ("--upscale_use_GFPGAN", "--save_upscale_samples"):
        g.add_argument(old, action="store_true", help="the original's re-caching flag: ignored with a warning")
    g.add_argument(
        "--verify_cached_dataset_hash_values",
        action="store_true",
        help="read and check every cached item file before training (checksum, values); bad items are named and left "
        "out of the plan (without it they are met, named and skipped during training)",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and precision")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="SDXL diffusers folder (or hub id in the local cache): UNet, noise-scheduler config, saved pipelines",
    )
    g.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISION,
        default="bf16",
        help="compute dtype of the UNet (master weights and gradient reduction stay fp32); fp16 adds loss scaling",
    )
    g.add_argument(
        "--weight_dtype",
        default="torch.float16",
        help="dtype of the saved pipelines: torch.float16 | torch.bfloat16 | torch.float32 (or fp16/bf16/fp32)",
    )
    g.add_argument(
        "--sharding",
        choices=SHARDING,
        default="auto",
        help="auto (default: none on one process, full_shard on several or with --cpu_offload), none (one process, "
        "no FSDP: flat bf16 weights + flat fp32 masters, the fastest on one GPU), or an FSDP2 strategy: full_shard, "
        "shard_grad_op, no_shard (replicate), hybrid_shard (multi-node)",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in the backward pass (less memory, about 25%% more compute); "
        "--no_gradient_checkpointing (or --no-gradient_checkpointing) turns it off (default: from --memory_plan)",
    )
    g.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                   help=argparse.SUPPRESS)  # fmt: skip
    g.add_argument(
        "--compile",
        choices=compiling.CHOICES,
        default=DEFAULT_COMPILE,
        help="regional torch.compile (Inductor) of the UNet's repeated blocks: compiled once per block shape in the "
        "first step, spatial sizes dynamic so that new aspect-ratio buckets reuse the graphs; 'none' runs eager; "
        f"auto: transformers on one GPU without FSDP, else none (default {DEFAULT_COMPILE})",
    )
    g.add_argument(
        "--cpu_offload",
        action="store_true",
        help="keep fp32 master weights, gradients and optimizer state in CPU RAM (FSDP2 CPUOffloadPolicy); the "
        "optimizer steps on the CPU: much slower, for a single 24 GB card (GPU only; use --optimizer adamw)",
    )
    loading.add_model_args(g)


def _add_optim_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning-rate schedule")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="optimizer, run on local shards (default: from --memory_plan; adamw8bit without a GPU)",
    )
    g.add_argument("--learning_rate", type=float, default=3e-5, help="peak learning rate")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW/Lion beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW/Lion beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="decoupled weight decay (all optimizers)")
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=None,
        help="clip the global gradient norm to this before each optimizer step (0 = no clipping, still measured; "
        "default 1.0, 0 with --optimizer_step_in_backward)",
    )
    g.add_argument(
        "--gradient_accumulation_steps", type=positive_int, default=60, help="micro-steps per optimizer step"
    )
    g.add_argument(
        "--learning_rate_scheduler",
        "--lr_scheduler",
        dest="learning_rate_scheduler",
        choices=LR_SCHEDULERS,
        default="constant_with_warmup",
        help="diffusers schedule; its length is the number of optimizer steps of the whole run",
    )
    g.add_argument(
        "--percent_lr_warm_up_steps",
        type=fraction,
        default=None,
        help=f"warm-up as a fraction of all optimizer steps (default {DEFAULT_WARMUP_FRACTION})",
    )
    g.add_argument("--lr_warmup_steps", type=non_negative_int, default=None, help="warm-up in optimizer steps")
    g.add_argument("--polynomial_lr_end", type=float, default=1e-8, help="final lr of the polynomial schedule")
    g.add_argument(
        "--polynomial_power",
        "--polynominal_power",
        dest="polynomial_power",
        type=float,
        default=1.0,
        help="power of the polynomial schedule (--polynominal_power is the original's spelling)",
    )
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_step_rules", default=None, help="piecewise_constant rules, e.g. '1:10,0.1:20,0.01'")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run length, output and logging")
    g.add_argument("--num_train_epochs", type=positive_int, default=200, help="epochs to train")
    g.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="optimizer steps to train; overrides --num_train_epochs (the run lasts as many epochs as needed)",
    )
    g.add_argument("--project_name", default="ABC", help="first part of the automatic run name")
    g.add_argument("--output_dir", default=None, help="run folder (default output/<run name>)")
    g.add_argument(
        "--log_dir",
        default=None,
        help="TensorBoard root: the run logs to <log_dir>/<run folder name> (default: <output_dir>/tensorboard)",
    )
    g.add_argument(
        "--max_nonfinite_steps",
        type=positive_int,
        default=10,
        help="stop when this many optimizer steps in a row had a non-finite loss or gradient",
    )


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints (full training state) and saved models")
    g.add_argument(
        "--checkpointing_steps",
        type=non_negative_int,
        default=0,
        help="write <output_dir>/checkpoints/step-<N>/ every N optimizer steps (default 0: by time only, "
        "--checkpointing_minutes, plus the end of the run and signals)",
    )
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None, help="keep only the newest K")
    g.add_argument(
        "--resume_from_checkpoint",
        "--load_saved_state",
        dest="resume_from_checkpoint",
        default=None,
        help="'auto' (newest complete checkpoint in <output_dir>/checkpoints, or start fresh) or a checkpoint folder",
    )
    g.add_argument(
        "--save_state",
        action="store_true",
        help="also write a checkpoint whenever a model is saved (the original's flag)",
    )
    g.add_argument("--save_model_every_n_epochs", type=positive_int, default=10, help="save a pipeline every N epochs")
    g.add_argument("--start_save_model_epoch", type=non_negative_int, default=0, help="first epoch that may be saved")
    g.add_argument(
        "--save_final_model",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="save the pipeline at the end of training as <output_dir>/final",
    )
    g.add_argument(
        "--save_single_file",
        action="store_true",
        help="also write each saved pipeline as one single-file .safetensors checkpoint (SGM layout)",
    )
    g.add_argument(
        "--handoff_dir",
        default=None,
        help="folder for handing the trained UNet to evaluation (default: /dev/shm if it has room, else the run dir)",
    )


def _add_validation_loss_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation loss (a deterministic hold-out)")
    g.add_argument("--validation_loss", action="store_true", help="hold out items and report their loss")
    g.add_argument("--validation_loss_percent", type=fraction, default=0.10, help="fraction of the items held out")
    g.add_argument(
        "--validation_loss_every_n_epochs",
        type=positive_int,
        default=10,
        help="validation loss at epoch 0 (base model) and every N epochs",
    )


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    _add_data_args(parser)
    _add_model_args(parser)
    _add_optim_args(parser)
    _add_run_args(parser)
    _add_checkpoint_args(parser)
    _add_validation_loss_args(parser)
    for module in _flag_modules():
        module.add_args(parser)
    return parser


def _flag_modules() -> list:
    """Modules that declare a group of the trainer's flags beside the code that uses them, each with
    `add_args(parser)` and `check_args(args)` (raising ValueError naming the flag). A new group of flags is a new
    module with those two functions, listed here."""
    from sdxl_trainer.evaluation import eval_args
    from sdxl_trainer.training import (
        cache_checks,
        ema_args,
        fp8_args,
        masked_loss_args,
        memory_args,
        objective_args,
        prodigy_args,
        report_args,
        run_args,
        step_cost_args,
    )

    return [
        eval_args, objective_args, fp8_args, run_args, masked_loss_args, memory_args, prodigy_args, ema_args,
        report_args, step_cost_args, cache_checks,
    ]  # fmt: skip


WEIGHT_DTYPES = {
    "torch.float16": "float16",
    "fp16": "float16",
    "float16": "float16",
    "torch.bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "torch.float32": "float32",
    "fp32": "float32",
    "float32": "float32",
}


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Reject bad values and combinations (message names the flag) and fill the resolved defaults."""
    if not args.cached_dataset_dirs and not args.cached_dataset_lists:
        raise ArgsError("--cached_dataset_dirs: give at least one cache folder (written by sdxl_process_data_dir.py)")
    if args.cpu_offload and not torch.cuda.is_available():
        raise ArgsError("--cpu_offload moves the weights off a GPU: it needs a CUDA GPU")
    try:
        loading.check_model_args(args.pretrained_model_name_or_path, args.single_file_config)
    except loading.ModelLoadError as exc:
        raise ArgsError(str(exc)) from exc
    if args.percent_lr_warm_up_steps is not None and args.lr_warmup_steps is not None:
        raise ArgsError("--percent_lr_warm_up_steps and --lr_warmup_steps: give warm-up as a fraction or a count")
    if args.percent_lr_warm_up_steps is None and args.lr_warmup_steps is None:
        args.percent_lr_warm_up_steps = DEFAULT_WARMUP_FRACTION
    if args.learning_rate_scheduler == "piecewise_constant" and not args.lr_step_rules:
        raise ArgsError("--lr_step_rules is required by --learning_rate_scheduler piecewise_constant")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ArgsError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if args.learning_rate_scheduler == "polynomial" and args.polynomial_lr_end >= args.learning_rate:
        raise ArgsError(
            f"--polynomial_lr_end {args.polynomial_lr_end} must be below --learning_rate {args.learning_rate}"
        )
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise ArgsError(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    if args.weight_dtype not in WEIGHT_DTYPES:
        raise ArgsError(f"--weight_dtype: unknown dtype {args.weight_dtype!r}; use one of {sorted(WEIGHT_DTYPES)}")
    args.weight_dtype = WEIGHT_DTYPES[args.weight_dtype]
    if args.optimizer == "adafactor" and args.mixed_precision == "fp16":
        raise ArgsError("--optimizer adafactor with --mixed_precision fp16: use bf16 (Adafactor has no loss scaling)")
    if args.validation_loss and args.validation_loss_percent <= 0:
        raise ArgsError("--validation_loss needs --validation_loss_percent > 0")
    for module in _flag_modules():
        try:
            module.check_args(args)
        except ArgsError:
            raise
        except ValueError as exc:  # each module's own error type (e.g. EvaluationArgsError), naming its flag
            raise ArgsError(str(exc)) from exc
    args.ignored_flags = [f"--{n}" for n in ("upscale_use_GFPGAN", "save_upscale_samples") if getattr(args, n)]
    if args.set_seed is None:
        args.set_seed = DEFAULT_SEED
    rp = args.resume_from_checkpoint
    if rp is not None and rp != "auto" and not Path(rp).is_dir():
        raise ArgsError(f"--resume_from_checkpoint: {rp} is not a checkpoint folder (or give 'auto')")
    if args.handoff_dir is not None and Path(args.handoff_dir).exists() and not Path(args.handoff_dir).is_dir():
        raise ArgsError(f"--handoff_dir: {args.handoff_dir} exists and is not a folder")
    return args


def run_name(args: argparse.Namespace, world_size: int) -> str:
    """The original's automatic run name (without the script file name), or the output folder's name."""
    if args.output_dir:
        return Path(args.output_dir).resolve().name
    res = f"_res{args.max_resolution}" if args.max_resolution else ""
    return (
        f"{args.project_name}_gpus{world_size}_bsz{args.train_batch_size}"
        f"_gradAccum{args.gradient_accumulation_steps}_lr{args.learning_rate}{res}"
    )


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse and validate; a bad flag exits with argparse's usage message naming it."""
    allocator.prefer_expandable_segments()  # before the memory plan's first look at the GPU initialises CUDA
    parser = build_parser(description)
    args = parser.parse_args(argv)
    try:
        return validate_args(args)
    except ArgsError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def flag_names(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """All option strings (used by the frozen-CLI test)."""
    parser = parser or build_parser()
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help")
