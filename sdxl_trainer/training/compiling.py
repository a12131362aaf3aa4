"""Regional `torch.compile` of the SDXL UNet: each repeated block is compiled on its own.

Why regional: compiling the whole 2.6 B-parameter UNet takes many minutes, and one compiled block serves every
layer of the same class and input shape (dynamo treats parameters as inputs), so the UNet's ~70 transformer
blocks and ~22 resnets cost a handful of compilations. The fusions that matter (GroupNorm + SiLU, GEGLU,
LayerNorm, residual adds) live inside the blocks anyway.
"""

from __future__ import annotations

import shutil

import torch

# Class names (as diffusers spells them) compiled by each --compile choice.
REGIONS = {
    "none": (),
    "transformers": ("BasicTransformerBlock",),
    "blocks": ("BasicTransformerBlock", "ResnetBlock2D"),
    # Whole attention stages (norm + projections + all their transformer blocks) and the resamplers too.
    "stages": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
}

CHOICES = ("auto", *REGIONS)

# A compiled block recompiles for every distinct input shape it meets: SDXL has 12 resnet shapes per bucket and
# dynamo gives up (falls back to eager) after 8 by default.
RECOMPILE_LIMIT = 256


def resolve_choice(choice: str, device_type: str, sharding: str) -> str:
    """`auto` is what measured faster (README, Performance): the transformer blocks on one GPU without FSDP
    (+10 % for the default recipe; they hold no convolutions, so new bucket shapes never recompile), eager
    under FSDP2 (regional compilation measured slower there) and on CPU (Inductor's C++ compile costs
    minutes, no measured gain). Triton builds its launchers with the system C compiler: without one, eager."""
    if choice != "auto":
        return choice
    if device_type == "cuda" and sharding == "none" and has_c_compiler():
        return "transformers"
    return "none"


def has_c_compiler() -> bool:
    """Triton builds its kernel launchers with the system C compiler: without one, compiling for CUDA fails."""
    return bool(shutil.which("cc") or shutil.which("gcc"))


def compile_regions(model: torch.nn.Module, choice: str, dynamic: bool | None = None, backend: str = "inductor") -> int:
    """Compiles every sub-module whose class is in REGIONS[choice] in place; returns how many were compiled."""
    names = REGIONS[choice]
    if not names:
        return 0
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT
    )
    # A square first bucket would otherwise tie height and width to one symbol (duck shaping), and the first
    # non-square bucket would recompile every block.
    torch.fx.experimental._config.use_duck_shape = False
    count = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.compile(dynamic=dynamic, backend=backend)
            count += 1
    return count
