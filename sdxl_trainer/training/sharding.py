"""Sharding the UNet with PyTorch's FSDP2 (`fully_shard`), mixed precision, activation checkpointing, and a
check that the sharding asked for is really in effect.

Why FSDP2 and not accelerate's FSDP plugin: the plugin cannot run on CPU (launched without a GPU it
silently trains unsharded or as DDP, dependencies.md §9), while `fully_shard` runs the same code on
GPUs over NCCL and in CI over gloo. accelerate (or torchrun) is only the launcher.

Strategies, all expressed as a device mesh plus `reshard_after_forward`:
  full_shard     1-D mesh over all ranks; parameters re-sharded after forward (ZeRO-3)
  shard_grad_op  1-D mesh; parameters stay gathered from forward to backward (ZeRO-2 style)
  no_shard       2-D mesh (world, 1): replicated everywhere, gradients all-reduced (DDP-equivalent)
  hybrid_shard   2-D mesh (nodes, GPUs per node): sharded inside a machine, replicated across machines
  none           one process, no FSDP: flat bf16 compute weights and flat fp32 master weights (flat_master.py)
  auto           (default) none on one process, full_shard on several or with --cpu_offload

With --master_weights bf16_stochastic the sharded parameters are bf16 (no fp32 masters): the compute dtype is
theirs, so FSDP2 casts nothing; gradients are still reduced in fp32, then kept in bf16.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from sdxl_trainer.distributed import DistInfo
from sdxl_trainer.training import partial_checkpointing

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


class ShardingError(RuntimeError):
    """Sharding was asked for (--sharding) and is not in effect."""


def resolve_strategy(strategy: str, info: DistInfo, cpu_offload: bool) -> str:
    """`auto`: no FSDP on one process (nothing to shard: flat_master.py, measured faster), FULL_SHARD on several
    or with --cpu_offload (FSDP2's offload is the way a 24 GiB card holds the optimizer)."""
    if strategy == "auto":
        return "none" if info.world_size == 1 and not cpu_offload else "full_shard"
    if strategy == "none" and info.world_size > 1:
        raise ShardingError(
            f"--sharding none trains in one process; this run has {info.world_size}: use full_shard (or auto)"
        )
    if strategy == "none" and cpu_offload:
        raise ShardingError("--cpu_offload is FSDP2's CPU offload: use --sharding full_shard (or auto) with it")
    return strategy


def build_mesh(strategy: str, info: DistInfo) -> DeviceMesh:
    device_type = info.device.type
    if strategy in ("full_shard", "shard_grad_op", "none"):  # none: one process, the mesh only names its group
        return init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("shard",))
    if strategy == "no_shard":
        return init_device_mesh(device_type, (info.world_size, 1), mesh_dim_names=("replicate", "shard"))
    if strategy == "hybrid_shard":
        return init_device_mesh(
            device_type, (info.num_nodes, info.local_world_size), mesh_dim_names=("replicate", "shard")
        )
    raise ShardingError(f"--sharding: unknown strategy {strategy!r}")


def build_mp_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """Compute in bf16/fp16 on gathered parameters; master weights stay fp32 (sharded) and gradients are
    reduced in fp32, so small per-rank gradients are not lost to fp16/bf16 rounding in the sum."""
    compute = COMPUTE_DTYPES[mixed_precision]
    if compute is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def unet_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units: every down, mid and up block (the root wraps what is left: conv_in, time and
    added-condition embeddings, conv_out)."""
    blocks = list(unet.down_blocks)
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(unet.mid_block)
    blocks += list(unet.up_blocks)
    return blocks


# FSDP units finer than a block (`--fsdp_units layers`): SDXL's first up block alone holds 1.21 B of the 2.57 B
# parameters, so a block-sized unit means gathering 2.4 GB of bf16 weights and, in backward, its unsharded
# gradient plus fp32 reduce-scatter buffers (~11 GiB per rank in a world of 2): more than a 24 GiB card can spare.
# Per transformer layer and resnet the largest unit is 49 M parameters.
LAYER_UNITS = ("BasicTransformerBlock", "ResnetBlock2D")


def unit_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in block.modules() if type(m).__name__ in LAYER_UNITS]


def apply_fsdp(
    unet: torch.nn.Module,
    mesh: DeviceMesh,
    strategy: str,
    mp_policy: MixedPrecisionPolicy,
    cpu_offload: bool = False,
    units: str = "blocks",
) -> torch.nn.Module:
    """Shard the UNet in place (layers if `units == "layers"`, then blocks, then the root, as FSDP2 requires: inner
    units first) and return it.

    Parameters must be fp32 here: they become the sharded fp32 master weights. With `cpu_offload` the shards,
    their gradients (and so the optimizer, which steps the local shards) live in pinned CPU memory; each block
    is copied to the GPU for its forward and backward only.
    """
    offload = CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()
    reshard = strategy != "shard_grad_op"
    blocks = unet_blocks(unet)
    for i, block in enumerate(blocks):
        if units == "layers":
            for layer in unit_layers(block):
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy,
                            offload_policy=offload)  # fmt: skip
        # The last block's parameters are needed first in backward: keeping them gathered saves one
        # all-gather per step (as torchtitan does for its last transformer block).
        fully_shard(
            block,
            mesh=mesh,
            reshard_after_forward=reshard and i < len(blocks) - 1,
            mp_policy=mp_policy,
            offload_policy=offload,
        )
    fully_shard(unet, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy, offload_policy=offload)
    return unet


def expected_placements(strategy: str) -> tuple:
    if strategy in ("full_shard", "shard_grad_op"):
        return (Shard(0),)
    return (Replicate(), Shard(0))


def verify_sharding(unet: torch.nn.Module, mesh: DeviceMesh, strategy: str) -> dict[str, int]:
    """Refuse to train when the sharding asked for is not what the parameters show.

    Returns counts for the log: parameters, local and global elements on this rank.
    """
    if not isinstance(unet, FSDPModule):
        raise ShardingError(f"--sharding {strategy}: the UNet is not an FSDP2 module; refusing to train unsharded")
    want = expected_placements(strategy)
    local = total = 0
    params = list(unet.parameters())
    for name, p in unet.named_parameters():
        if not isinstance(p, DTensor):
            raise ShardingError(f"--sharding {strategy}: parameter {name} is not sharded (plain tensor)")
        if tuple(p.placements) != want or p.device_mesh != mesh:
            raise ShardingError(f"--sharding {strategy}: parameter {name} has placements {p.placements}, want {want}")
        local += p.to_local().numel()
        total += p.numel()
    shard_size = mesh.size(mesh.ndim - 1)
    # Sharded over k ranks, this rank must hold about 1/k of the elements (FSDP2 pads dim 0 to k rows).
    if shard_size > 1 and local > total / shard_size * 1.05 + 1024 * len(params):
        raise ShardingError(
            f"--sharding {strategy}: this rank holds {local} of {total} elements, expected about 1/{shard_size}"
        )
    units = sum(isinstance(m, FSDPModule) for m in unet.modules())
    return {"parameters": len(params), "local_elements": local, "global_elements": total, "shard_size": shard_size,
            "fsdp_units": units}  # fmt: skip


def build_sharded_unet(
    pretrained: str,
    info: DistInfo,
    mesh: DeviceMesh,
    strategy: str,
    mixed_precision: str,
    gradient_checkpointing: bool,
    load_base_weights: bool = True,
    cpu_offload: bool = False,
    convert=None,
    weights_dtype: torch.dtype = torch.float32,
    units: str = "blocks",
    checkpointed_fraction: float = 1.0,
) -> torch.nn.Module:
    """The UNet built on the meta device, sharded, then filled with the base weights streamed from rank 0.
    `convert(unet)`, if given, changes module types before sharding (FP8 linear layers, training/fp8.py).
    `weights_dtype`: the sharded weights' dtype (fp32 masters, or bf16 with --master_weights bf16_stochastic).

    No rank but rank 0 ever holds a full fp32 copy in CPU RAM (the original loaded one per rank, B30).
    When resuming, the checkpoint fills the shards instead (`load_base_weights=False`).
    """
    from diffusers import UNet2DConditionModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from sdxl_trainer.models import loading

    config = loading.load_unet_config(pretrained)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(weights_dtype)
    unet.train()
    if convert is not None:
        convert(unet)
    if gradient_checkpointing:
        # diffusers' per-resnet/per-transformer checkpointing recomputes inside each FSDP unit, whose parameters
        # FSDP2 has already gathered for the backward pass, so both compose.
        partial_checkpointing.enable(unet, checkpointed_fraction)
    apply_fsdp(unet, mesh, strategy, build_mp_policy(mixed_precision), cpu_offload, units)
    unet.to_empty(device="cpu" if cpu_offload else info.device)
    if load_base_weights:
        full = loading.load_unet(pretrained, torch_dtype=weights_dtype).state_dict() if info.is_main_process else {}
        set_model_state_dict(unet, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    return unet


def build_single_process_unet(pretrained: str, gradient_checkpointing: bool, load_base_weights: bool = True,
                              checkpointed_fraction: float = 1.0):  # fmt: skip
    """The UNet for `--sharding none`: fp32 weights on the CPU (the base model's, or uninitialized when a
    checkpoint will fill them), for `flat_master.FlatMasterOptimizer` to move into its flat buffers."""
    from diffusers import UNet2DConditionModel

    from sdxl_trainer.models import loading

    if load_base_weights:
        unet = loading.load_unet(pretrained, torch_dtype=torch.float32)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(loading.load_unet_config(pretrained))
        unet.to_empty(device="cpu")
    unet.train()
    if gradient_checkpointing:
        partial_checkpointing.enable(unet, checkpointed_fraction)
    return unet
