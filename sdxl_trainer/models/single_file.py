"""Saving a diffusers SDXL folder as one original-layout (SGM) `.safetensors` file, as ComfyUI, A1111 and
kohya load it: weights read part by part, keys renamed by `single_file_keys`, cast, metadata added."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from sdxl_trainer.atomic_files import give_umask_mode
from sdxl_trainer.models.single_file_keys import PIPELINE_PARTS, ConversionError, convert_pipeline_state_dicts

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_dtype(dtype: torch.dtype | str) -> tuple[str, torch.dtype]:
    """('fp16', torch.float16) from 'fp16', 'float16', 'torch.float16', 'half' or torch.float16."""
    aliases = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
    text = str(dtype).removeprefix("torch.")
    for name, value in DTYPES.items():
        if dtype == value or aliases.get(text, text) == name:
            return name, value
    raise ConversionError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


def cast_floating(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in `dtype`; integer tensors (none in SDXL weights) left alone."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _pick(files: list[Path], where: Path) -> Path | None:
    """The non-variant file when there is one (`model.safetensors` over `model.fp16.safetensors`), else the only one."""
    plain = [f for f in files if f.name.count(".") == 1 or f.name.endswith(".safetensors.index.json")]
    if plain or len(files) <= 1:
        return (plain or files or [None])[0]
    raise ConversionError(f"--model_path: {where} holds several weight variants ({', '.join(f.name for f in files)})")


def find_weight_files(part_dir: Path) -> list[Path]:
    """The weight files of one pipeline part: a sharded safetensors set, one safetensors file or a `.bin`."""
    index = _pick(sorted(part_dir.glob("*.safetensors.index*.json")), part_dir)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [part_dir / shard for shard in shards]
    for pattern in ("*.safetensors", "*.bin"):
        found = _pick(sorted(part_dir.glob(pattern)), part_dir)
        if found is not None:
            return [found]
    raise ConversionError(f"--model_path: {part_dir} holds no weights (*.safetensors or *.bin)")


def load_part_state_dict(part_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read one part's weights on CPU, casting each tensor as it is read (keeps peak memory at the output size)."""
    from safetensors import safe_open

    sd: dict[str, torch.Tensor] = {}
    for file in find_weight_files(part_dir):
        if file.suffix == ".bin":  # old pipelines; weights_only refuses to run pickled code
            sd.update(cast_floating(torch.load(file, map_location="cpu", weights_only=True, mmap=True), dtype))
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(key)
                sd[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return sd


def check_sdxl_pipeline_dir(pipeline_dir: Path) -> None:
    """Raise ConversionError naming --model_path unless the folder is a diffusers SDXL (base-style) pipeline."""
    if not pipeline_dir.is_dir():
        raise ConversionError(f"--model_path: {pipeline_dir} is not a folder (expected a diffusers SDXL pipeline)")
    index_file = pipeline_dir / "model_index.json"
    if not index_file.is_file():
        raise ConversionError(
            f"--model_path: {pipeline_dir} has no model_index.json, so it is not a diffusers pipeline"
        )
    index = json.loads(index_file.read_text(encoding="utf-8"))
    missing = [p for p in PIPELINE_PARTS if not (index.get(p) or [None])[0] or not (pipeline_dir / p).is_dir()]
    if missing:
        raise ConversionError(
            f"--model_path: {pipeline_dir} ({index.get('_class_name', 'unknown')}) lacks {', '.join(missing)}; "
            "an SDXL base-style pipeline has unet, vae, text_encoder and text_encoder_2 (SD 1.x/2.x have one text "
            "encoder, the SDXL refiner has no text_encoder)"
        )
    unet_config = json.loads((pipeline_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    if unet_config.get("addition_embed_type") != "text_time":
        raise ConversionError(f"--model_path: the UNet in {pipeline_dir} is not an SDXL UNet (no text_time embedding)")


def single_file_metadata(pipeline_dir: Path, dtype_name: str) -> dict[str, str]:
    """Provenance stored in the file's header. Only the folder's name, so a shared file reveals no local paths."""
    from sdxl_trainer import __version__

    return {
        "format": "pt",
        "source": pipeline_dir.resolve().name,
        "dtype": dtype_name,
        "sdxl_trainer_version": __version__,
        # Stability's model-spec keys, which UIs read to recognise the architecture.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    }


def save_single_file(
    pipeline_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: torch.dtype | str = "fp16",
    overwrite: bool = False,
) -> Path:
    """Write the pipeline's UNet, VAE and both text encoders as one original-layout `.safetensors` file.

    Written to a temporary file in the target folder and renamed into place, so a killed run never leaves a
    truncated checkpoint. Raises ConversionError (naming the flag) for a folder that is not an SDXL
    pipeline, an existing output without `overwrite`, or an output name not ending in `.safetensors`.
    """
    from safetensors.torch import save_file

    pipeline_dir, out_path = Path(pipeline_dir), Path(out_path)
    dtype_name, torch_dtype = parse_dtype(dtype)
    if out_path.suffix != ".safetensors":
        raise ConversionError(f"--checkpoint_path: {out_path} must end in .safetensors (the only format written)")
    if out_path.is_dir():
        raise ConversionError(f"--checkpoint_path: {out_path} is a folder; give a file name ending in .safetensors")
    if out_path.exists() and not overwrite:
        raise ConversionError(f"--checkpoint_path: {out_path} exists; pass --overwrite to replace it")
    check_sdxl_pipeline_dir(pipeline_dir)
    if out_path.resolve().is_relative_to(pipeline_dir.resolve()):
        raise ConversionError(
            f"--checkpoint_path: {out_path} is inside --model_path {pipeline_dir}; the converter never writes into "
            "or over its input: choose a path outside that folder"
        )
    parts = {part: load_part_state_dict(pipeline_dir / part, torch_dtype) for part in PIPELINE_PARTS}
    sd = convert_pipeline_state_dicts(**parts)
    del parts
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp_name, metadata=single_file_metadata(pipeline_dir, dtype_name))
        give_umask_mode(tmp_name)  # mkstemp makes 0600
        os.replace(tmp_name, out_path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return out_path
