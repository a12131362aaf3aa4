"""Saving the trained model: the gathered full UNet (rank 0 only), fp16 diffusers pipelines, and the handoff
file through which evaluation on every rank reads the trained UNet.

Only rank 0 ever holds the full state dict (FSDP2 gathers it to rank 0's CPU); the other ranks keep just
their shards. The pipeline is the base pipeline (--pretrained_model_name_or_path) with the trained UNet.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl_trainer.atomic_files import give_umask_mode_tree
from sdxl_trainer.models import loading
from sdxl_trainer.training import prediction

HANDOFF_FILE = "unet.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_handoff_dir(run_dir: Path, needed_bytes: int, num_nodes: int, tag: str = "") -> Path:
    """/dev/shm (a RAM disk: no disk writes of ~10 GB per evaluation) when it exists with room and every
    process is on this machine; otherwise a folder in the run directory (shared storage on clusters). `tag`
    (a hash of the run folder's full path) keeps two runs whose folders share a name apart."""
    shm = Path("/dev/shm")
    if num_nodes == 1 and shm.is_dir() and os.access(shm, os.W_OK):
        if shutil.disk_usage(shm).free > needed_bytes * 1.2:
            return shm / f"sdxl_trainer_handoff_{os.getuid()}_{run_dir.name}_{tag}".rstrip("_")
    return run_dir / "handoff"


def write_handoff(full_state_dict: dict[str, torch.Tensor], handoff_dir: Path) -> Path:
    """Rank 0: the full fp32 UNet as one safetensors file, written atomically."""
    handoff_dir.mkdir(parents=True, exist_ok=True)
    path = handoff_dir / HANDOFF_FILE
    fd, tmp = tempfile.mkstemp(prefix=".unet.", suffix=".tmp", dir=handoff_dir)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in full_state_dict.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_handoff(handoff_dir: Path) -> None:
    (handoff_dir / HANDOFF_FILE).unlink(missing_ok=True)
    try:
        handoff_dir.rmdir()
    except OSError:
        pass  # not empty (the user's own folder) or already gone


def empty_unet(pretrained: str):
    """The base UNet's architecture on the meta device: shapes and names, no weights loaded or allocated."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(loading.load_unet_config(pretrained))


def _unet_from_state_dict(pretrained: str, full_state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """The base UNet's architecture with the trained weights in `dtype`, built without loading base weights."""
    unet = empty_unet(pretrained)
    unet.load_state_dict({k: v.to(dtype) for k, v in full_state_dict.items()}, strict=True, assign=True)
    return unet


def save_pipeline(
    pretrained: str,
    full_state_dict: dict[str, torch.Tensor],
    out_dir: Path,
    dtype_name: str,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
    vae: str | None = None,
) -> Path:
    """Rank 0: base pipeline + trained UNet, saved as a diffusers folder (written to a temp folder, renamed).
    `vae`: a VAE folder replacing the base's (the trainer's --vae: the VAE the cache was built with).
    The scheduler is the base's, changed to the trained target and schedule (`prediction.inference_scheduler`)."""
    dtype = DTYPES[dtype_name]
    unet = _unet_from_state_dict(pretrained, full_state_dict, dtype)
    pipe = loading.load_pipeline(pretrained, vae_override=vae, torch_dtype=dtype, unet=unet)  # vae: the cache's
    pipe.scheduler = prediction.inference_scheduler(pipe.scheduler, prediction_type, zero_terminal_snr)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "trainer_info.json").write_text(
            json.dumps({"base_model": pretrained, "unet_dtype": dtype_name}, indent=1), encoding="utf-8"
        )
        give_umask_mode_tree(tmp)  # mkdtemp makes 0700 and save_pretrained 0600 files: unreadable by others
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def save_single_file(pipeline_dir: Path, dtype_name: str) -> Path:
    """The saved pipeline also as one original-layout checkpoint `<pipeline_dir>.safetensors`."""
    from sdxl_trainer.models import single_file

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype_name]
    out = pipeline_dir.with_name(pipeline_dir.name + ".safetensors")
    return single_file.save_single_file(pipeline_dir, out, dtype=short, overwrite=True)


def link_final(run_dir: Path, saved_name: str) -> None:
    """`final` (and `final.safetensors`) as relative links to a pipeline already saved at the last step."""
    for suffix in ("", ".safetensors"):
        target, link = run_dir / f"{saved_name}{suffix}", run_dir / f"final{suffix}"
        if not target.exists():
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(target.name, target_is_directory=target.is_dir())
