"""FP8 matmuls for the UNet's large linear layers (`--fp8 tensorwise|rowwise`), through torchao's float8 training.

What changes: each selected `nn.Linear` becomes torchao's `Float8Linear`. Its input and weight are cast to float8
(e4m3) with scales computed from the tensors themselves at every call (tensorwise: one scale per tensor, cuBLAS;
rowwise: one per row, power-of-2 scales, CUTLASS), the output gradient likewise (e5m2 tensorwise, e4m3 rowwise), and
the forward and both backward matmuls run in FP8 with bf16 (or fp32) outputs. H100/H200 and Ada cards run FP8
matmuls at twice the bf16 rate. Nothing else changes: the layer keeps its `weight` and `bias` parameters (same
names, shapes and dtypes), so the fp32 master weights, the optimizer state, checkpoints and saved pipelines are
exactly those of a bf16 run, and a run may be resumed with or without `--fp8`.

What stays bf16 (`keeps_high_precision`): layers whose matmuls are too small for FP8 to pay for its casts, or whose
inputs carry conditioning that is cheap to keep precise: the time and added-condition embeddings and each resnet's
`time_emb_proj` (one row per image), the cross-attention keys and values (77 text tokens per image), layers with a
dimension that is not a multiple of 16 (an FP8 matmul requirement) or below `--fp8_min_features`. Convolutions
(conv_in, conv_out, the resnets) are not linear layers and stay bf16.

Why torchao: it is PyTorch's own float8 training stack (used by torchtitan), with FSDP2 float8 all-gather and
torch.compile support; writing scaled-matmul casting by hand would copy it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

logger = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise")
CHOICES = ("none", *RECIPES)
DEFAULT_MIN_FEATURES = 1280  # SDXL: the 1280-channel stages (60 of 70 transformer blocks); see README, FP8
FP8_MIN_CAPABILITY = (8, 9)  # Ada (8.9), Hopper (9.0) and later have FP8 tensor cores
FP8_ALIGNMENT = 16  # torch._scaled_mm: both matrix dimensions multiples of 16

# Parts of a module's name that keep it bf16, with the reason (read by the tests and the log).
HIGH_PRECISION_NAMES = {
    "time_embedding": "timestep embedding: one row per image",
    "add_embedding": "added-condition embedding: one row per image",
    "time_emb_proj": "resnet time projection: one row per image",
    "attn2.to_k": "cross-attention key: 77 text tokens per image",
    "attn2.to_v": "cross-attention value: 77 text tokens per image",
}


class Fp8Error(RuntimeError):
    """FP8 training cannot run here; the message names the flag."""


def keeps_high_precision(fqn: str, in_features: int, out_features: int, min_features: int) -> str | None:
    """Why the linear layer `fqn` stays bf16, or None when it runs in FP8. Pure: the module filter's rule."""
    for part, reason in HIGH_PRECISION_NAMES.items():
        if part in fqn:
            return reason
    if in_features % FP8_ALIGNMENT or out_features % FP8_ALIGNMENT:
        return f"features {in_features}x{out_features} not multiples of {FP8_ALIGNMENT}"
    if min(in_features, out_features) < min_features:
        return f"features {in_features}x{out_features} below --fp8_min_features {min_features}"
    return None


def module_filter(min_features: int):
    """torchao's `module_filter_fn`: True for the layers that become Float8Linear."""

    def convert(module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        return keeps_high_precision(fqn, module.in_features, module.out_features, min_features) is None

    return convert


def support_error(device: torch.device) -> str | None:
    """Why `--fp8` cannot run on `device`, or None. On CPU torch has FP8 scaled matmuls too (correct, no faster:
    for tests and numerics checks); a CUDA card needs FP8 tensor cores."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--fp8 runs on CUDA GPUs with FP8 tensor cores (or on CPU for checks), not on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"--fp8: {name} has compute capability {capability[0]}.{capability[1]}; FP8 matmuls need "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell). Train without --fp8."
        )
    return None


def float8_config(recipe: str, fsdp_float8_all_gather: bool = False):
    """torchao's configuration for the recipe. With `fsdp_float8_all_gather` (tensorwise only), FSDP2 all-gathers
    the weights already cast to float8 (half the bytes of bf16), with scales precomputed after each optimizer step
    (`precompute_scales`)."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in RECIPES:
        raise Fp8Error(f"--fp8: unknown recipe {recipe!r}; use one of {CHOICES}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather:
        if recipe != "tensorwise":
            raise Fp8Error("--fp8: float8 all-gather under FSDP works with tensorwise scaling only")
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def uses_float8_all_gather(recipe: str, sharding: str, plain_fp32_shards: bool) -> bool:
    """Float8 all-gather where it helps: tensorwise under FSDP2 (it halves the all-gathered bytes and casts each
    weight once per step, from the fp32 shard). Only over plain fp32 shards on the GPU stepped after the backward:
    not with CPU offload (the cast would run on the CPU), bf16 stochastic weights or the step in backward (their
    optimizers step the shards tensor by tensor, which the float8 weight wrapper is not tested with)."""
    return recipe == "tensorwise" and sharding != "none" and plain_fp32_shards


FP8_ROW_MULTIPLE = 16  # torch._scaled_mm needs every matmul dimension divisible by 16, the token rows included


def _fp8_forward(forward, recipe: str):
    """Wrap a Float8Linear's forward so that any input shape works.

    Rows: the weight gradient's matmul has the input's rows (batch x tokens) as its inner dimension, which FP8
    matmuls need divisible by 16; aspect-ratio buckets at small batches are not (batch 2 of a 26 x 38 latent stage:
    1976 rows, measured on an H200). Such inputs are padded with zero rows, which change neither the output rows
    kept nor the weight gradient (a zero row adds nothing to x^T g) nor a tensorwise scale (amax of |x|).
    Layout (rowwise): torchao's row-scaled float8 tensor cannot be copied into a new layout, which `reshape` does
    for a non-contiguous input (diffusers' proj_in gets a permuted (B, H*W, C) view): make it contiguous in bf16
    first. Tensorwise copies the float8 tensor instead, at half the bytes, so its inputs are left as they are."""

    @functools.wraps(forward)
    def fp8_forward(x: torch.Tensor, *args, **kwargs):
        rows = x.numel() // x.shape[-1]
        missing = -rows % FP8_ROW_MULTIPLE
        if not missing:
            return forward(x.contiguous() if recipe == "rowwise" else x, *args, **kwargs)
        padded = torch.nn.functional.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, missing))
        out = forward(padded, *args, **kwargs)
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])

    return fp8_forward


def convert(unet: torch.nn.Module, recipe: str, min_features: int, fsdp_float8_all_gather: bool = False) -> dict:
    """Swap the selected linear layers of `unet` (in place; before FSDP sharding, the flat layout and compilation)
    for torchao's Float8Linear. Returns counts for the log: layers and weight elements converted and kept."""
    from torchao.float8 import convert_to_float8_training

    linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen = {n for n, m in linears.items() if module_filter(min_features)(m, n)}
    convert_to_float8_training(
        unet, module_filter_fn=module_filter(min_features), config=float8_config(recipe, fsdp_float8_all_gather)
    )
    for name in chosen:
        layer = unet.get_submodule(name)
        layer.forward = _fp8_forward(layer.forward, recipe)
    converted_elements = sum(linears[n].weight.numel() for n in chosen)
    all_elements = sum(m.weight.numel() for m in linears.values())
    report = {
        "fp8_layers": len(chosen),
        "bf16_linear_layers": len(linears) - len(chosen),
        "fp8_weight_share": round(converted_elements / max(all_elements, 1), 3),
    }
    if not chosen:
        raise Fp8Error(
            f"--fp8 {recipe}: no linear layer of the UNet qualifies (--fp8_min_features {min_features}); lower it "
            "or train without --fp8"
        )
    return report


def eager_warning(device_type: str, compile_choice: str) -> str | None:
    """Why FP8 without compilation is slow on a GPU, or None: eager, each Float8Linear's casts and scaled matmuls
    go through torchao's float8 tensor subclass, dispatched in Python op by op, so the step becomes host-bound
    (measured on an H200 at batch 2: 1.51 images/s against bf16's 7.18). Compiled, the casts fuse into kernels."""
    if device_type != "cuda" or compile_choice != "none":
        return None
    return (
        "--fp8 with --compile none: eager float8 is host-bound (torchao's float8 tensors dispatch in Python; 1.51 "
        "images/s against bf16's 7.18 at batch 2 on an H200); give --compile transformers (also under FSDP2)"
    )


@dataclasses.dataclass
class Fp8Plan:
    """What `--fp8` does in this run: `convert(unet)` before sharding/flat layout/compilation; `report` for the log."""

    recipe: str | None  # None: --fp8 none, convert does nothing
    min_features: int = DEFAULT_MIN_FEATURES
    float8_all_gather: bool = False
    report: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def for_run(
        cls, choice: str, min_features: int, device: torch.device, sharding: str, plain_fp32_shards: bool,
        compile_choice: str = "none",
    ):  # fmt: skip
        """The plan for the resolved --sharding and --compile; raises Fp8Error where FP8 cannot run (cards without
        FP8)."""
        if choice == "none":
            return cls(None)
        error = support_error(device)
        if error:
            raise Fp8Error(error)
        if device.type == "cpu":
            logger.warning("--fp8 on CPU: torch's CPU FP8 matmuls give FP8's numerics but no speed-up (for checks)")
        slow = eager_warning(device.type, compile_choice)
        if slow:
            logger.warning(slow)
        return cls(choice, min_features, uses_float8_all_gather(choice, sharding, plain_fp32_shards))

    def convert(self, unet: torch.nn.Module) -> None:
        if self.recipe is not None:
            self.report = convert(unet, self.recipe, self.min_features, self.float8_all_gather)
            self.report["float8_all_gather"] = self.float8_all_gather


def plain_weights(state: dict) -> dict:
    """`state` (a model state dict, changed in place and returned) with torchao's float8 all-gather wrapper around a
    weight replaced by the fp32 tensor it wraps (same storage: loading into it still loads into the model).
    Checkpoints and saved pipelines then hold plain tensors under the usual names, as a bf16 run writes them."""
    from torch.distributed.tensor import DTensor

    for key, value in state.items():
        local = value._local_tensor if isinstance(value, DTensor) else value
        if type(local).__name__ != "WeightWithDynamicFloat8CastTensor":  # no torchao import in runs without it
            continue
        if isinstance(value, DTensor):
            state[key] = DTensor.from_local(
                local._tensor, value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
            )
        else:
            state[key] = local._tensor
    return state


def precompute_scales(unet: torch.nn.Module) -> None:
    """After each optimizer step under float8 all-gather: every float8 weight's scale in one all-reduce
    (torchao's recommendation; otherwise each FSDP unit computes its own at its all-gather)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(unet)
