"""Load the parts of an SDXL pipeline from a local diffusers folder or a hub id (never downloading by surprise).

Every loader takes the user's `--pretrained_model_name_or_path`. The caching script needs the VAE, the
tokenizers and the text encoders; the trainer needs the UNet and the noise scheduler; sampling and saving
need the whole pipeline. Keeping the loading here means a single-file checkpoint or a VAE override is
handled once for all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the flag and the path."""


@dataclass
class TextEncoders:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module


def _local_only() -> bool:
    # A hub id is only read from the local hub cache unless the user explicitly allows downloads.
    return os.environ.get("SDXL_TRAINER_ALLOW_DOWNLOAD", "0") != "1"


def _check_source(path: str, flag: str) -> None:
    """Fail early, naming the flag, for a local path that does not exist (a hub id looks like `org/name`)."""
    p = Path(path)
    is_hub_id = not p.is_absolute() and not path.startswith(".") and path.count("/") == 1 and not p.exists()
    if not is_hub_id and not p.exists():
        raise ModelLoadError(f"{flag}: {path} does not exist")


def _wrap(flag: str, path: str, what: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{flag}: could not load the {what} from {path!r}: {exc}. Give a local diffusers SDXL folder "
        "(or a hub id already in the local hub cache; set SDXL_TRAINER_ALLOW_DOWNLOAD=1 to allow downloading)."
    )


def load_vae(pretrained: str, vae_override: str | None = None, flag: str = "--pretrained_model_name_or_path"):
    """The VAE of the base model, or `vae_override` (a diffusers AutoencoderKL folder or hub id)."""
    from diffusers import AutoencoderKL

    source, subfolder, used_flag = (vae_override, None, "--vae") if vae_override else (pretrained, "vae", flag)
    _check_source(source, used_flag)
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, local_files_only=_local_only())
    except Exception as exc:  # noqa: BLE001 - re-raised with the flag named
        raise _wrap(used_flag, source, "VAE", exc) from exc


def load_text_encoders(pretrained: str, flag: str = "--pretrained_model_name_or_path") -> TextEncoders:
    """Both CLIP tokenizers and text encoders (encoder 2 with its projection, as SDXL uses it)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _check_source(pretrained, flag)
    local = _local_only()
    try:
        return TextEncoders(
            tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", local_files_only=local),
            tokenizer_2=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", local_files_only=local),
            text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", local_files_only=local),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                pretrained, subfolder="text_encoder_2", local_files_only=local
            ),
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "tokenizers and text encoders", exc) from exc


def load_unet(pretrained: str, flag: str = "--pretrained_model_name_or_path", torch_dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    _check_source(pretrained, flag)
    try:
        return UNet2DConditionModel.from_pretrained(
            pretrained, subfolder="unet", torch_dtype=torch_dtype, local_files_only=_local_only()
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "UNet", exc) from exc


def load_noise_scheduler(pretrained: str, flag: str = "--pretrained_model_name_or_path"):
    """A DDPMScheduler built from the model's scheduler config (betas, steps, prediction type)."""
    from diffusers import DDPMScheduler

    _check_source(pretrained, flag)
    try:
        return DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", local_files_only=_local_only())
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "noise scheduler config", exc) from exc


def load_pipeline(
    pretrained: str,
    vae_override: str | None = None,
    torch_dtype=torch.float32,
    flag: str = "--pretrained_model_name_or_path",
):
    """The whole StableDiffusionXLPipeline (for samples, validation images and saving)."""
    from diffusers import StableDiffusionXLPipeline

    _check_source(pretrained, flag)
    kwargs = {}
    if vae_override:
        kwargs["vae"] = load_vae(pretrained, vae_override).to(torch_dtype)
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            pretrained, torch_dtype=torch_dtype, local_files_only=_local_only(), **kwargs
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "SDXL pipeline", exc) from exc
