"""Flags of the memory plan (issue 14): `--memory_plan`, `--gpu_memory_gib`, `--master_weights`, `--fsdp_units`,
`--gradient_checkpointing_fraction`, `--optimizer_step_in_backward`, `--offload_optimizer_state`; `check_args`
resolves the plan into the flags it decides (`--optimizer`, `--gradient_checkpointing`, `--master_weights`,
`--optimizer_step_in_backward`, `--offload_optimizer_state`, `--cpu_offload`, and `--max_grad_norm`), keeping every
value given explicitly."""

from __future__ import annotations

import argparse
import os

import torch

from sdxl_trainer.training import compiling, fused_adamw8bit, memory_plan, partial_checkpointing

MASTER_WEIGHTS = ("fp32", "bf16_stochastic")
DEFAULT_MAX_GRAD_NORM = 1.0

RESUME_RULES = {
    "memory_plan": "may_change",  # what it decides is in the flags below and in --optimizer etc., checked there
    "gpu_memory_gib": "may_change",
    "master_weights": "must_match",  # the checkpoint's weights are fp32 masters or bf16 weights
    "optimizer_step_in_backward": "must_match",  # other chunks (flat layout) or per-tensor optimizers (FSDP2)
    "fsdp_units": "may_change",  # which modules gather together; the shards and their state are the same
    "gradient_checkpointing_fraction": "may_change",  # recomputation gives the same activations
    "offload_optimizer_state": "may_change",  # the same state, kept in CPU RAM or on the GPU
}


# What a checkpoint written before these flags existed did: fp32 masters, the ordinary step (resume_check compares
# a flag missing from a checkpoint's config.json with this, not with the parser's None = "from the plan").
RESUME_DEFAULTS = {"master_weights": "fp32", "optimizer_step_in_backward": False, "offload_optimizer_state": False}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory plan (what fits the card, fastest first)")
    g.add_argument(
        "--memory_plan",
        choices=memory_plan.PLANS,
        default="auto",
        help="auto (default): from the GPU's memory, the batch and the number of processes, the fastest of fast, "
        "fast_8bit, fast_bf16, balanced, lean, lean_release, lean_state_offload, offload whose estimate fits (no "
        "GPU: balanced, the CPU defaults); or one of them by name. It sets --optimizer, --gradient_checkpointing, "
        "--master_weights, --optimizer_step_in_backward, --offload_optimizer_state, --cpu_offload and "
        "--max_grad_norm where they are not given; the choice and its estimate are logged at start",
    )
    g.add_argument(
        "--gpu_memory_gib",
        type=float,
        default=None,
        help="GPU memory the plan may use, in GiB (default: the GPU's memory free at start)",
    )
    g.add_argument(
        "--master_weights",
        choices=MASTER_WEIGHTS,
        default=None,
        help="fp32: fp32 master weights, bf16 compute copies; bf16_stochastic: the weights themselves are bf16, "
        "updated with stochastic rounding (no fp32 copy; needs --mixed_precision bf16) (default: from the plan)",
    )
    g.add_argument(
        "--fsdp_units",
        choices=("auto", "blocks", "layers"),
        default="auto",
        help="FSDP2 units: blocks (each down/mid/up block) or layers (each transformer layer and resnet as well: "
        "smaller gathers and gradient buffers; SDXL's first up block holds 1.2 B parameters); auto (default): "
        f"layers on GPUs under {memory_plan.FSDP_UNITS_AUTO_BELOW_GIB} GiB, blocks otherwise",
    )
    g.add_argument(
        "--gradient_checkpointing_fraction",
        type=float,
        default=1.0,
        help="with gradient checkpointing, the fraction of the UNet's transformer blocks that are checkpointed "
        "(recomputed in backward), spread evenly; the others keep their activations: faster, more memory (up to "
        "~0.084 GiB per 1024-px image per block of SDXL's 70). Resnets are always checkpointed. 0.5 is SimpleTuner's "
        "--gradient_checkpointing_interval 2. Counted in the plan's estimate (default: 1, all)",
    )
    g.add_argument(
        "--optimizer_step_in_backward",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="step the weights in backward as soon as their gradient is final and free the gradient (gradient "
        "release: each flat chunk on one process, each parameter's shard under FSDP2; no global-norm clipping: "
        "needs --max_grad_norm 0; no fp16) (default: from the plan)",
    )
    g.add_argument(
        "--offload_optimizer_state",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the optimizer state in pinned CPU RAM and bring each chunk's (or tensor's) to the GPU for its "
        "step only (AdamW8bit on SDXL: 4.8 GiB less on the GPU, that much host-device copying per step each way; "
        "a CUDA GPU; with --master_weights bf16_stochastic or --optimizer_step_in_backward, not with --cpu_offload "
        "or the fused 8-bit step) (default: from the plan)",
    )


def _free_and_total_gib() -> tuple[float, float] | None:
    """(GiB the plan may use, the GPU's total GiB) of this process's GPU; None without one. What it may use is the
    memory free at start: on a 24 GB card a desktop or another process often holds a GiB or two, which the plan's
    margin (`memory_plan.USABLE_FRACTION`) was not meant to absorb."""
    if not torch.cuda.is_available():
        return None
    device = int(os.environ.get("LOCAL_RANK", "0"))
    free, total = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device)) / memory_plan.GIB, total / memory_plan.GIB


def _shard_size(sharding: str, world: int) -> int:
    if sharding == "no_shard":
        return 1
    if sharding == "hybrid_shard":
        return int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return world


def _compiled_by_layout(args: argparse.Namespace) -> dict[str, bool]:
    """Whether the transformer blocks will be compiled in either layout the plan may lead to (compiled blocks keep
    fewer activations); setup.py resolves `--compile` the same way once the layout is known."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = {"flat": "none", "fsdp": "full_shard"}
    shardings = auto if args.sharding == "auto" else dict.fromkeys(auto, args.sharding)
    return {layout: compiling.resolve_choice(args.compile, device, s) != "none" for layout, s in shardings.items()}


def check_args(args: argparse.Namespace) -> None:
    """Resolve the plan into the flags it decides (explicit values win), then refuse what cannot work."""
    if args.gpu_memory_gib is not None and args.gpu_memory_gib <= 0:
        raise ValueError(f"--gpu_memory_gib must be positive, got {args.gpu_memory_gib}")
    partial_checkpointing.check_fraction(args.gradient_checkpointing_fraction)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    measured = None if args.gpu_memory_gib is not None else _free_and_total_gib()
    gpu_gib = args.gpu_memory_gib if measured is None else measured[0]
    fixed = {f: getattr(args, f) for f in memory_plan.PLAN_FIELDS if f != "cpu_offload"}
    fixed["cpu_offload"] = True if args.cpu_offload else None  # a store_true flag: only "on" is explicit
    args.fsdp_units = memory_plan.fsdp_units(args.fsdp_units, gpu_gib)
    shard = _shard_size(args.sharding, world)
    on_gpu_ema = getattr(args, "use_ema", False) and getattr(args, "ema_device", "gpu") == "gpu"
    name, recipe, estimate = memory_plan.choose(
        args.memory_plan, gpu_gib, args.train_batch_size, world, fixed, shard, args.fsdp_units,
        memory_plan.ema_gib(shard) if on_gpu_ema else 0.0, args.gradient_checkpointing_fraction, args.fp8 != "none",
        _compiled_by_layout(args),
    )  # fmt: skip
    for field in memory_plan.PLAN_FIELDS:
        setattr(args, field, getattr(recipe, field))
    if args.max_grad_norm is None:
        args.max_grad_norm = 0.0 if args.optimizer_step_in_backward else DEFAULT_MAX_GRAD_NORM
    args.memory_plan_chosen = name
    args.memory_plan_summary = memory_plan.describe(name, recipe, estimate, gpu_gib, args.train_batch_size, world)
    if measured:
        args.memory_plan_summary += f" (free at start, of {measured[1]:.1f} GiB)"
    if args.gradient_checkpointing and args.gradient_checkpointing_fraction < 1.0:
        args.memory_plan_summary += (
            f"; {args.gradient_checkpointing_fraction:g} of the transformer blocks checkpointed (the rest keep "
            "their activations)"
        )

    if args.cpu_offload and not torch.cuda.is_available():
        raise ValueError(f"--cpu_offload (memory plan {name}) moves the weights off a GPU: it needs a CUDA GPU")
    if args.offload_optimizer_state:
        _check_state_offload(args, name)
    if args.master_weights == "bf16_stochastic" and args.mixed_precision != "bf16":
        raise ValueError(
            f"--master_weights bf16_stochastic trains bf16 weights: it needs --mixed_precision bf16, not "
            f"{args.mixed_precision} (or --master_weights fp32)"
        )
    if args.optimizer_step_in_backward:
        if args.max_grad_norm > 0:
            raise ValueError(
                "--optimizer_step_in_backward steps each tensor before the others have gradients, so global-norm "
                f"clipping (--max_grad_norm {args.max_grad_norm}) is impossible: give --max_grad_norm 0 (the norm "
                "is still measured and logged) or --no-optimizer_step_in_backward"
            )
        if args.mixed_precision == "fp16":
            raise ValueError(
                "--optimizer_step_in_backward with --mixed_precision fp16: loss scaling must see every gradient "
                "before any step; use bf16"
            )


def _check_state_offload(args: argparse.Namespace, plan: str) -> None:
    """What `--offload_optimizer_state` needs: a GPU to offload from and the per-tensor step (tensorwise.py)."""
    flag = f"--offload_optimizer_state (memory plan {plan})"
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} moves the optimizer state off a GPU: it needs a CUDA GPU")
    if args.cpu_offload:
        raise ValueError(
            f"{flag} with --cpu_offload: FSDP2's offload already keeps the state in CPU RAM; give one of them (the "
            "plan turns --cpu_offload on when nothing else fits by its estimate)"
        )
    if args.master_weights != "bf16_stochastic" and not args.optimizer_step_in_backward:
        raise ValueError(
            f"{flag} moves the state chunk by chunk around the step that bf16 weights or the step in backward take: "
            "give --master_weights bf16_stochastic or --optimizer_step_in_backward"
        )
    if fused_adamw8bit.chosen(args):
        raise ValueError(f"{flag} is not done by the fused 8-bit step: use --adamw_kernel foreach")
