"""The memory plan (`--memory_plan`): from the GPU's memory, the batch and the world size, pick gradient
checkpointing, master weights, optimizer, the optimizer step in backward and CPU offload. Pure: no GPU needed.

Rungs, fastest first (`auto` takes the first whose estimate fits; a named plan is taken as is). Flags given
explicitly replace the rung's value before the estimate, so they always win and the estimate stays true:

  fast         fp32 master weights, torch AdamW, no checkpointing          (1.92x the original recipe, H200)
  fast_8bit    fp32 master weights, AdamW8bit, no checkpointing
  fast_bf16    bf16 weights with stochastic rounding, AdamW8bit, no checkpointing
  balanced     fp32 master weights, AdamW8bit, checkpointing               (the defaults before the plan)
  lean         bf16 weights with stochastic rounding, AdamW8bit, checkpointing (the flat layout on one GPU)
  lean_release lean + the optimizer step in backward: no gradients held at once
  lean_state_offload  lean_release + the optimizer state in CPU RAM, on the GPU one chunk's at a time
  offload      fp32 master weights, AdamW, checkpointing, FSDP2 CPU offload of weights, gradients and state

The estimate is per rank, for full-size SDXL base (2.57 B parameters) at 1024 px, from the step's measured peaks
on an H200 (README, Memory): activations per image without checkpointing 6.5 GiB eager, 5.7 with the transformer
blocks compiled (what `--compile auto` gives in the flat layout), 0.65 with checkpointing; bytes per
parameter from the layout (flat one-process: bf16 compute copy + fp32 master, and their gradients; FSDP2:
sharded over the shard group, plus the largest FSDP unit's transients, `unit_gib`); plus a fixed allowance for
kernels' workspaces, one tensor's fp32 copy for stochastic rounding and the allocator's fragmentation. A rung
fits when its estimate is within `USABLE_FRACTION` of the card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GIB = 2**30
SDXL_UNET_PARAMETERS = 2_567_463_684
# By gradient checkpointing, 1024 px, measured on an H200. With it, from the flat layout's compiled peaks under a
# 24 GiB cap (bench/results/memory_release_h200_2026-12-03.jsonl and memory_lean_h200_2026-12-03.jsonl), which this
# slope and FIXED_GIB meet within 0.6 GiB: lean B8 20.0, lean B16 25.5 (uncapped), lean B12 out of memory above
# 22.3; lean_release B1 11.0, B16 20.8, B20 out of memory above 22.9. (0.41 came from eager FSDP2 runs; 0.52 with
# a fixed 1.5 met lean B8 alone and under-counted batch 16 by 1.3 GiB.)
ACTIVATION_GIB_PER_IMAGE = {True: 0.65, False: 6.5}
# Without checkpointing, the transformer blocks compiled (--compile transformers, blocks or stages): Inductor's fused
# GEGLU and norms keep fewer intermediates for backward. Measured over the same 48.4 GiB of weights, gradients, state
# and allowance as the eager slope (6.45 from 99.5 GiB at batch 8 and 125.3 at 12, train_flat_h200_2026-11-25b.jsonl):
# bf16 115.9 at batch 12 (5.63 per image), FP8 103.6 at 12 and 122.1 at 16 (4.63 = 5.63 - FP8's 1.0;
# fp8_h200_2026-12-03b/c.jsonl), --compile blocks 113.3 at 12. Rounded up so the estimate stays above each of them.
COMPILED_NO_CHECKPOINT_GIB_PER_IMAGE = 5.7
# --fp8 without checkpointing: the converted layers keep their inputs for backward in float8 (1 byte, not 2).
# Measured at batch 12 on an H200: 115.9 GiB bf16, 103.6 FP8 tensorwise or rowwise (bench/results/
# fp8_h200_2026-12-03*.jsonl; FP8 at batch 16: 122.1). With checkpointing those inputs are recomputed, not kept:
# no saving counted.
FP8_SAVED_GIB_PER_IMAGE = 1.0
FIXED_GIB = 0.6  # workspaces, fragmentation, one chunk's fp32 copy for stochastic rounding
# Parameters of the largest FSDP unit: SDXL's first up block, or its largest layer (a 1280-channel resnet).
LARGEST_UNIT_PARAMETERS = {"blocks": 1_206_568_960, "layers": 49_164_800}
FSDP_UNITS_AUTO_BELOW_GIB = 64  # --fsdp_units auto: layers on smaller cards, blocks (fewer, larger) above
USABLE_FRACTION = 0.92
OPEN_CHUNKS_GIB = 0.3  # the flat step in backward: gradient buffers of the chunks a backward has open (a few)
PLANS = ("auto", "fast", "fast_8bit", "fast_bf16", "balanced", "lean", "lean_release", "lean_state_offload", "offload")
PLAN_FIELDS = (
    "gradient_checkpointing", "master_weights", "optimizer", "optimizer_step_in_backward", "offload_optimizer_state",
    "cpu_offload",
)  # fmt: skip
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion8bit": 1.0, "adafactor": 0.05, "prodigy": 16.0}
# Optimizers whose step needs every tensor's statistics before any tensor moves: never stepped tensor by tensor
# (bf16 weights with stochastic rounding, the step in backward), so `auto` skips those rungs for them.
WHOLE_STEP_OPTIMIZERS = ("prodigy",)


@dataclass(frozen=True)
class Recipe:
    gradient_checkpointing: bool
    master_weights: str  # fp32 | bf16_stochastic
    optimizer: str
    optimizer_step_in_backward: bool
    cpu_offload: bool
    offload_optimizer_state: bool = False


RUNGS = {
    "fast": Recipe(False, "fp32", "adamw", False, False),
    "fast_8bit": Recipe(False, "fp32", "adamw8bit", False, False),
    "fast_bf16": Recipe(False, "bf16_stochastic", "adamw8bit", False, False),
    "balanced": Recipe(True, "fp32", "adamw8bit", False, False),
    "lean": Recipe(True, "bf16_stochastic", "adamw8bit", False, False),
    "lean_release": Recipe(True, "bf16_stochastic", "adamw8bit", True, False),
    "lean_state_offload": Recipe(True, "bf16_stochastic", "adamw8bit", True, False, offload_optimizer_state=True),
    "offload": Recipe(True, "fp32", "adamw", False, True),
}
CPU_PLAN = "balanced"  # no GPU: today's CPU behaviour (the test suite's defaults)


def steps_tensor_by_tensor(recipe: Recipe) -> bool:
    """bf16 weights and the step in backward run the optimizer on one tensor (or flat chunk) at a time."""
    return recipe.master_weights == "bf16_stochastic" or recipe.optimizer_step_in_backward


def uses_fsdp(recipe: Recipe, world_size: int) -> bool:
    """What `--sharding auto` picks: the flat one-process layout unless several processes or CPU offload."""
    return world_size > 1 or recipe.cpu_offload


def fsdp_units(choice: str, gpu_gib: float | None) -> str:
    """`--fsdp_units auto`: per layer on cards under 64 GiB (the transients of SDXL's 1.2 B-parameter up block
    would not fit beside the state), per block above (fewer collectives); per block without a GPU (as before)."""
    if choice != "auto":
        return choice
    return "layers" if gpu_gib is not None and gpu_gib < FSDP_UNITS_AUTO_BELOW_GIB else "blocks"


def unit_gib(units: str, shard: int) -> float:
    """Transient memory of the largest FSDP unit in backward: its gathered bf16 weights and unsharded bf16 gradient,
    plus (sharded over several ranks) the fp32 reduce-scatter input and output. On one rank FSDP2 needs no
    reduce-scatter buffers (measured: FULL_SHARD on one H200 peaked 2.4 GiB above weights, state and activations)."""
    n = LARGEST_UNIT_PARAMETERS[units]
    return n * (2 if shard == 1 else 8 + 4 / shard) / GIB


def activation_gib_per_image(
    gradient_checkpointing: bool, checkpointed_fraction: float = 1.0, fp8: bool = False, compiled: bool = False
) -> float:
    """Activations per 1024-px image (`compiled`: the transformer blocks are compiled). With part of the transformer
    blocks not checkpointed (`--gradient_checkpointing_fraction`), their share of the difference is counted as if
    every activation the checkpointing saves lived in transformer blocks: an upper bound (resnets stay
    checkpointed; not measured)."""
    full = COMPILED_NO_CHECKPOINT_GIB_PER_IMAGE if compiled else ACTIVATION_GIB_PER_IMAGE[False]
    full -= FP8_SAVED_GIB_PER_IMAGE if fp8 else 0.0
    low = ACTIVATION_GIB_PER_IMAGE[True]
    return low + (1.0 - checkpointed_fraction) * (full - low) if gradient_checkpointing else full


def estimate_gib(recipe: Recipe, batch: int, world_size: int = 1, shard_size: int | None = None,
                 parameters: int = SDXL_UNET_PARAMETERS, units: str = "layers",
                 checkpointed_fraction: float = 1.0, fp8: bool = False, compiled: bool = False) -> float:  # fmt: skip
    """Peak GPU memory per rank (GiB) of one training step with `batch` images of 1024 px per rank (`fp8`: --fp8;
    `compiled`: the transformer blocks are compiled)."""
    shard = shard_size or world_size
    bf16 = recipe.master_weights == "bf16_stochastic"
    state = 0.0 if recipe.offload_optimizer_state else OPTIMIZER_STATE_BYTES[recipe.optimizer]
    if not uses_fsdp(recipe, world_size):
        # Flat layout: fp32 masters + bf16 compute copy and both gradients; bf16 weights: one copy, one gradient.
        # The step in backward holds no flat gradient, only the chunks' still open (gradient_release.py).
        weights, grads = (2, 2) if bf16 else (6, 6)
        open_chunks = 0.0
        if recipe.optimizer_step_in_backward:
            grads, open_chunks = 0, OPEN_CHUNKS_GIB
        model_gib = parameters * (weights + grads + state) / GIB + open_chunks
    else:
        weights = 2 if bf16 else 4
        grads = 0 if recipe.optimizer_step_in_backward else weights
        per_param = 0 if recipe.cpu_offload else weights + grads + state
        model_gib = parameters * per_param / shard / GIB + unit_gib(units, shard)
    activations = batch * activation_gib_per_image(recipe.gradient_checkpointing, checkpointed_fraction, fp8, compiled)
    return round(model_gib + activations + FIXED_GIB, 1)


def ema_gib(shard: int, parameters: int = SDXL_UNET_PARAMETERS) -> float:
    """`--use_ema` on the GPU: fp32 shadows of this rank's shards (training/ema.py)."""
    return parameters * 4 / shard / GIB


def choose(plan: str, gpu_gib: float | None, batch: int, world_size: int = 1, fixed: dict | None = None,
           shard_size: int | None = None, units: str = "auto", extra_gib: float = 0.0,
           checkpointed_fraction: float = 1.0, fp8: bool = False,
           compiled_by_layout: dict[str, bool] | None = None) -> tuple[str, Recipe, float | None]:  # fmt: skip
    """(rung name, recipe, estimate GiB) for `--memory_plan plan`. `fixed`: flags given explicitly (they replace
    the rung's values). `gpu_gib` None = no GPU: `auto` keeps the CPU defaults (`CPU_PLAN`), no estimate.
    `extra_gib`: memory the plan does not decide but must leave room for (an EMA on the GPU).
    `checkpointed_fraction`: `--gradient_checkpointing_fraction` (given by the user; the plan never lowers it).
    `fp8`: --fp8 is on (smaller activations without checkpointing). `compiled_by_layout`: whether the transformer
    blocks will be compiled, under {"flat": ..., "fsdp": ...} (`--compile auto` compiles in the flat layout only);
    none given: eager."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    units = fsdp_units(units, gpu_gib)
    compiled_by_layout = compiled_by_layout or {}

    def estimate(recipe: Recipe) -> float:
        compiled = compiled_by_layout.get("fsdp" if uses_fsdp(recipe, world_size) else "flat", False)
        gib = estimate_gib(
            recipe, batch, world_size, shard_size, units=units, checkpointed_fraction=checkpointed_fraction, fp8=fp8,
            compiled=compiled,
        )  # fmt: skip
        return round(gib + extra_gib, 1)

    if plan not in PLANS:
        raise ValueError(f"--memory_plan: unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if plan == "auto" and gpu_gib is None:
        plan = CPU_PLAN
    if plan != "auto":
        recipe = replace(RUNGS[plan], **fixed)
        if gpu_gib is None:
            return plan, recipe, None
        return plan, recipe, estimate(recipe)
    usable = gpu_gib * USABLE_FRACTION
    candidates = [(name, replace(r, **fixed)) for name, r in RUNGS.items()]
    if fixed.get("optimizer") in WHOLE_STEP_OPTIMIZERS:
        candidates = [(n, r) for n, r in candidates if not steps_tensor_by_tensor(r)] or candidates
    for name, recipe in candidates:
        est = estimate(recipe)
        if est <= usable:
            return name, recipe, est
    name, recipe = candidates[-1]  # nothing fits by the estimate: the leanest, and the log says so
    return name, recipe, estimate(recipe)


def describe(name: str, recipe: Recipe, estimate: float | None, gpu_gib: float | None, batch: int, world: int) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in asdict(recipe).items())
    if estimate is None:
        return f"memory plan {name} (no GPU: no estimate): {fields}"
    fits = "fits" if estimate <= gpu_gib * USABLE_FRACTION else "DOES NOT FIT by the estimate"
    return (
        f"memory plan {name}: {fields}; estimate {estimate} GiB per rank for batch {batch} at 1024 px on "
        f"{world} process(es), {fits} in {gpu_gib:.1f} GiB"
    )
