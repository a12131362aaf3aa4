"""The key mapping between diffusers' SDXL layout and the original (SGM) single-file layout.

The original layout is Stability's generative-models one, which ComfyUI, Automatic1111/Forge and
diffusers' `from_single_file` read: the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`, CLIP ViT-L (HF layout) under `conditioner.embedders.0.transformer.` and OpenCLIP
bigG under `conditioner.embedders.1.model.`. The key mapping is tables and pure functions over state
dicts (files are written by `models.single_file`). The UNet and VAE block indices are computed from the
model's own keys (levels, layers per block, which levels have attention), so SDXL base and the tiny test
model go through the same code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."


VAE_PREFIX = "first_stage_model."


TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."


TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


# Module names, diffusers -> original. Parameter names (weight/bias) are never changed.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


UNET_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


VAE_RESNET_LAYERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}


VAE_RESAMPLERS = {("encoder.down", "downsamplers"): "downsample", ("decoder.up", "upsamplers"): "upsample"}


VAE_ATTENTION_LAYERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


TEXT_ENCODER_2_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}


TEXT_ENCODER_2_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


# OpenCLIP stores one packed input projection per layer, in this order.
QKV_ORDER = ("q_proj", "k_proj", "v_proj")


_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


_VAE_BLOCK = re.compile(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")


_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


_TE2_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


class ConversionError(ValueError):
    """Input that cannot be converted; the message starts with the flag or argument to fix."""


def _rename_module(rest: str, table: Mapping[str, str], what: str) -> str:
    """`rest` is `module.param`; map the module through `table` (an unknown module is an error, not a drop)."""
    module, _, param = rest.rpartition(".")
    if module not in table:
        raise ConversionError(f"unknown {what} parameter {rest!r}: this is not an SDXL-shaped model")
    return f"{table[module]}.{param}"


def unet_layers_per_block(keys: list[str]) -> int:
    """Resnets per down level, read from the keys (SDXL: 2; up levels always hold one more)."""
    down = {int(m[4]) for k in keys if (m := _UNET_BLOCK.match(k)) and m[1] == "down" and m[3] == "resnets"}
    up = {int(m[4]) for k in keys if (m := _UNET_BLOCK.match(k)) and m[1] == "up" and m[3] == "resnets"}
    if not down or max(up, default=-1) != max(down) + 1:
        raise ConversionError("the UNet's down and up blocks do not have the layout of an SDXL UNet")
    return max(down) + 1


def _unet_block_name(side: str, level: int, kind: str, index: int, rest: str, per_level: int, slot: int) -> str:
    """Name of one parameter of `{side}_blocks.{level}.{kind}.{index}.{rest}` in the original layout."""
    if side == "down":
        position = 1 + level * per_level + index  # input block 0 is conv_in
        if kind == "resnets":
            return f"input_blocks.{position}.0.{_rename_module(rest, UNET_RESNET_LAYERS, 'UNet resnet')}"
        if kind == "attentions":
            return f"input_blocks.{position}.1.{rest}"
        if kind == "downsamplers" and index == 0:  # a block of its own after the level's resnets
            return f"input_blocks.{(level + 1) * per_level}.0.{_rename_module(rest, {'conv': 'op'}, 'UNet')}"
    else:
        position = level * per_level + index
        if kind == "resnets":
            return f"output_blocks.{position}.0.{_rename_module(rest, UNET_RESNET_LAYERS, 'UNet resnet')}"
        if kind == "attentions":
            return f"output_blocks.{position}.1.{rest}"
        if kind == "upsamplers" and index == 0:  # inside the level's last block, after its attention if any
            return f"output_blocks.{level * per_level + per_level - 1}.{slot}.{rest}"
    raise ConversionError(f"unknown UNet parameter {side}_blocks.{level}.{kind}.{index}.{rest}")


def convert_unet_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel -> `model.diffusion_model.*` (tensors are passed through unchanged).

    In the original layout each down level is `layers_per_block` input blocks plus one downsampler block
    and each up level is `layers_per_block + 1` output blocks, the last also holding the upsampler.
    Transformer internals have the same names in both layouts.
    """
    keys = list(sd)
    per_level = unet_layers_per_block(keys) + 1
    up_with_attention = {
        int(m[2]) for k in keys if (m := _UNET_BLOCK.match(k)) and m[1] == "up" and m[3] == "attentions"
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if block := _UNET_BLOCK.match(key):
            level = int(block[2])
            slot = 2 if level in up_with_attention else 1
            name = _unet_block_name(block[1], level, block[3], int(block[4]), block[5], per_level, slot)
        elif mid := _UNET_MID.match(key):
            kind, index, rest = mid[1], int(mid[2]), mid[3]
            if kind == "resnets":  # middle_block is resnet, attention, resnet
                name = f"middle_block.{2 * index}.{_rename_module(rest, UNET_RESNET_LAYERS, 'UNet resnet')}"
            elif index == 0:
                name = f"middle_block.1.{rest}"
            else:
                raise ConversionError(f"unknown UNet parameter {key!r}")
        else:
            name = _rename_module(key, UNET_TOP_LEVEL, "UNet")
        out[UNET_PREFIX + name] = tensor
    return out


def convert_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> `first_stage_model.*`.

    The decoder's levels are numbered from the bottom in the original (`up.3` is diffusers' `up_blocks.0`),
    and the mid-block attention projections are 1x1 convolutions there, so (out, in) becomes (out, in, 1, 1).
    """
    up_levels = {int(m[2]) for k in sd if (m := _VAE_BLOCK.match(k)) and m[1] == "decoder.up"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if block := _VAE_BLOCK.match(key):
            part, level, kind, index, rest = block[1], int(block[2]), block[3], int(block[4]), block[5]
            if part == "decoder.up":
                level = max(up_levels) - level
            if kind == "resnets":
                name = f"{part}.{level}.block.{index}.{_rename_module(rest, VAE_RESNET_LAYERS, 'VAE resnet')}"
            elif (part, kind) in VAE_RESAMPLERS and index == 0:
                name = f"{part}.{level}.{VAE_RESAMPLERS[part, kind]}.{rest}"
            else:
                raise ConversionError(f"unknown VAE parameter {key!r}")
        elif mid := _VAE_MID.match(key):
            half, kind, index, rest = mid[1], mid[2], int(mid[3]), mid[4]
            if kind == "resnets":
                name = f"{half}.mid.block_{index + 1}.{_rename_module(rest, VAE_RESNET_LAYERS, 'VAE resnet')}"
            elif index == 0:
                name = f"{half}.mid.attn_1.{_rename_module(rest, VAE_ATTENTION_LAYERS, 'VAE attention')}"
                if tensor.ndim == 2:  # q, k, v, proj_out weights
                    tensor = tensor.reshape(*tensor.shape, 1, 1)
            else:
                raise ConversionError(f"unknown VAE parameter {key!r}")
        else:
            name = _rename_module(key, VAE_TOP_LEVEL, "VAE")
        out[VAE_PREFIX + name] = tensor
    return out


def _with_text_model(key: str) -> str:
    # transformers 5 saves CLIPTextModel without its `text_model.` wrapper; the original layout keeps it.
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def convert_text_encoder_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (transformers CLIPTextModel) -> `conditioner.embedders.0.transformer.text_model.*`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.endswith("position_ids"):  # a 0..76 index buffer every loader rebuilds, not a weight
            continue
        name = _with_text_model(key)
        if not name.startswith(
            ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")
        ):
            raise ConversionError(f"unknown text encoder parameter {key!r}: expected a CLIPTextModel")
        out[TEXT_ENCODER_PREFIX + name] = tensor
    return out


def convert_text_encoder_2_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG (transformers CLIPTextModelWithProjection) -> `conditioner.embedders.1.model.*`.

    q/k/v are packed into one `in_proj_weight`/`in_proj_bias` per layer and the projection is stored
    transposed (OpenCLIP computes `x @ text_projection`).
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if key.endswith("position_ids"):
            continue
        name = _with_text_model(key)
        if layer := _TE2_LAYER.match(name):
            index, module, param = int(layer[1]), layer[2], layer[3]
            if module.startswith("self_attn.") and module.removeprefix("self_attn.") in QKV_ORDER:
                packed.setdefault((index, param), {})[module.removeprefix("self_attn.")] = tensor
                continue
            part = _rename_module(f"{module}.{param}", TEXT_ENCODER_2_LAYER_PARTS, "text encoder 2")
            new = f"transformer.resblocks.{index}.{part}"
        elif name == "text_projection.weight":
            new, tensor = TEXT_ENCODER_2_TOP_LEVEL[name], tensor.T.contiguous()
        elif name in TEXT_ENCODER_2_TOP_LEVEL:
            new = TEXT_ENCODER_2_TOP_LEVEL[name]
        else:
            raise ConversionError(f"unknown text encoder 2 parameter {key!r}: expected a CLIPTextModelWithProjection")
        out[TEXT_ENCODER_2_PREFIX + new] = tensor
    for (index, param), parts in sorted(packed.items()):
        missing = [p for p in QKV_ORDER if p not in parts]
        if missing:
            raise ConversionError(f"text encoder 2 layer {index} lacks {', '.join(missing)} {param}")
        packed_name = f"transformer.resblocks.{index}.attn.in_proj_{param}"
        out[TEXT_ENCODER_2_PREFIX + packed_name] = torch.cat([parts[p] for p in QKV_ORDER], dim=0)
    if TEXT_ENCODER_2_PREFIX + "text_projection" not in out:
        raise ConversionError("text encoder 2 has no text_projection: expected a CLIPTextModelWithProjection")
    return out


def convert_pipeline_state_dicts(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The four parts as one flat original-layout state dict (the prefixes keep them apart)."""
    return {
        **convert_unet_state_dict(unet),
        **convert_vae_state_dict(vae),
        **convert_text_encoder_state_dict(text_encoder),
        **convert_text_encoder_2_state_dict(text_encoder_2),
    }
