"""A training checkpoint's UNet as a diffusers pipeline (and, if asked, one single file), without resuming.

Why: pipelines are written only at the epochs and the end a run chose; a checkpoint (`checkpoints/step-<N>/`)
holds the trained weights too, in torch.distributed.checkpoint's layout, split by the processes that wrote it. A
run stopped before its next save, or whose checkpoint came from a cluster of another size (a resume needs the same
number of processes), still holds a model: this reads it in one process (DCP reshards whatever layout wrote it,
the flat one-process layout or FSDP2 on any number of ranks) and saves it with the base model's VAE and text
encoders exactly as the trainer's own pipeline save does. The checkpoint is verified against its manifest first
and never written to. Exported: the trained weights (the model the next step would continue from), not an EMA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from sdxl_trainer.models import loading
from sdxl_trainer.training import checkpoint_integrity as integrity
from sdxl_trainer.training import saving


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message names the flag."""


def read_unet_weights(checkpoint: Path, pretrained: str) -> dict[str, torch.Tensor]:
    """The checkpoint's UNet weights in fp32 on the CPU, whatever process layout wrote them."""
    shapes = saving.empty_unet(pretrained).state_dict()
    weights = {name: torch.empty(t.shape, dtype=torch.float32) for name, t in shapes.items()}
    try:
        dcp.load(weights, storage_reader=dcp.HuggingFaceStorageReader(str(checkpoint / "model")))
    except (CheckpointException, RuntimeError, ValueError) as exc:
        raise ExportError(
            f"--checkpoint {checkpoint} does not hold the weights of {pretrained}'s UNet (another base model? give "
            f"--pretrained_model_name_or_path the run's): {str(exc)[:300]}"
        ) from exc
    return weights


def export(checkpoint: Path, output: Path, pretrained: str | None = None, vae: str | None = None,
           weight_dtype: str | None = None, single_file: bool = False, overwrite: bool = False) -> Path:  # fmt: skip
    """Write `output` (a pipeline folder) from `checkpoint`; the base model, VAE and dtype default to the run's."""
    checkpoint, output = Path(checkpoint), Path(output)
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"--checkpoint {checkpoint}: not a checkpoint folder of this trainer ({exc})") from exc
    problems = integrity.verify_checkpoint(checkpoint)
    if problems:
        raise ExportError(f"--checkpoint {checkpoint} is damaged or incomplete:\n  " + "\n  ".join(problems))
    if output.resolve().is_relative_to(checkpoint.resolve()):
        raise ExportError(f"--output {output} is inside --checkpoint {checkpoint}, which is never written to")
    for path in [output, *([output.with_name(output.name + ".safetensors")] if single_file else [])]:
        if path.exists() and not overwrite:
            raise ExportError(f"{path} exists (--output): give --overwrite to replace it, or another --output")
    pretrained = pretrained or config["pretrained_model_name_or_path"]
    loading.set_single_file_config(config.get("single_file_config"))
    try:
        weights = read_unet_weights(checkpoint, pretrained)
    except loading.ModelLoadError as exc:
        raise ExportError(f"{exc} (the run's base model; give --pretrained_model_name_or_path if it moved)") from exc
    dtype_name = weight_dtype or config.get("weight_dtype", "float16")
    out = saving.save_pipeline(
        pretrained, weights, output, dtype_name, config.get("prediction_type"), config.get("zero_terminal_snr", False),
        vae=vae or config.get("vae"),
    )  # fmt: skip
    if single_file:
        saving.save_single_file(out, dtype_name)
    return out
