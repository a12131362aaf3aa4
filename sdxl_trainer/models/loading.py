"""Load the parts of an SDXL pipeline from a local diffusers folder or a hub id (never downloading by surprise).

Every loader takes the user's `--pretrained_model_name_or_path`. The caching script needs the VAE, the
tokenizers and the text encoders; the trainer needs the UNet and the noise scheduler; sampling and saving
need the whole pipeline. Keeping the loading here means a single-file checkpoint or a VAE override is
handled once for all of them.

Single-file checkpoints: `pretrained` may also be one `.safetensors` file in the original SGM layout
(SDXL base, a community fine-tune, or our own `convert_diffusers_to_original_sdxl.py` output). Such a file
holds weights only, so the configs, tokenizers and scheduler come from a local diffusers SDXL folder named
by `--single_file_config` (passed as `single_file_config=` to each loader, or once for the process with
`set_single_file_config`). Nothing is fetched from a hub for it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_trainer.models import single_file_keys


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


SINGLE_FILE_FLAG = "--single_file_config"
# Parts of a single-file checkpoint, by the key prefix they live under (the original SGM layout).
SINGLE_FILE_PARTS = {
    "UNet": single_file_keys.UNET_PREFIX,
    "VAE": single_file_keys.VAE_PREFIX,
    "text encoder": single_file_keys.TEXT_ENCODER_PREFIX,
    "text encoder 2": single_file_keys.TEXT_ENCODER_2_PREFIX,
}

# Process-wide default for `single_file_config=` (set once from the parsed flag by the scripts).
_single_file_config: str | None = None


def add_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add `--single_file_config DIR` (scripts that accept `--pretrained_model_name_or_path` add this too)."""
    parser.add_argument(
        SINGLE_FILE_FLAG,
        default=None,
        metavar="DIR",
        help="a diffusers SDXL folder whose configs, tokenizers and scheduler describe the checkpoint, e.g. SDXL "
        "base's; required when --pretrained_model_name_or_path is a single-file .safetensors checkpoint",
    )


def set_single_file_config(path: str | os.PathLike | None) -> None:
    """Set the process-wide config folder used when a loader gets no `single_file_config=`."""
    global _single_file_config
    _single_file_config = None if path is None else str(path)


def is_single_file(pretrained: str | os.PathLike) -> bool:
    """True for an existing file (a checkpoint), False for a folder or hub id."""
    return Path(pretrained).is_file()


def check_model_args(
    pretrained: str, single_file_config: str | None, flag: str = "--pretrained_model_name_or_path"
) -> None:
    """Check the flag pair at start-up; raises ModelLoadError naming the flag to fix."""
    if is_single_file(pretrained):
        _resolve_single_file(pretrained, single_file_config, flag)
    elif single_file_config is not None:
        raise ModelLoadError(
            f"{SINGLE_FILE_FLAG} is only used with a single-file checkpoint, but {flag} {pretrained} is not a file"
        )


def _resolve_single_file(pretrained: str, single_file_config: str | None, flag: str) -> str | None:
    """The config folder to use when `pretrained` is a single file, None when it is a folder or hub id."""
    if not is_single_file(pretrained):
        return None
    if Path(pretrained).suffix != ".safetensors":
        raise ModelLoadError(
            f"{flag}: {pretrained} is not a .safetensors file; only safetensors single files are read (a .ckpt is a "
            "pickle that can run code when loaded; convert it to safetensors with a trusted tool first)"
        )
    config = single_file_config if single_file_config is not None else _single_file_config
    if config is None:
        raise ModelLoadError(
            f"{SINGLE_FILE_FLAG}: {flag} {pretrained} is a single-file checkpoint, which holds weights only; give "
            f"{SINGLE_FILE_FLAG} DIR, a local diffusers SDXL folder (e.g. SDXL base's) for its configs and tokenizers"
        )
    if not (Path(config) / "model_index.json").is_file():
        raise ModelLoadError(
            f"{SINGLE_FILE_FLAG}: {config} is not a local diffusers pipeline folder (no model_index.json); "
            "give the folder of SDXL base or of the model the checkpoint was made from"
        )
    return config


def _require_parts(pretrained: str, parts: tuple[str, ...], flag: str) -> None:
    """Fail with the flag named when a single file lacks a part (e.g. a UNet-only file asked for its VAE)."""
    from safetensors import safe_open

    try:
        with safe_open(pretrained, framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - a damaged or non-safetensors file
        raise ModelLoadError(f"{flag}: {pretrained} is not a readable safetensors file: {exc}") from exc
    missing = [p for p in parts if not any(k.startswith(SINGLE_FILE_PARTS[p]) for k in keys)]
    if missing:
        expected = ", ".join(f"{SINGLE_FILE_PARTS[p]}*" for p in missing)
        raise ModelLoadError(
            f"{flag}: {pretrained} holds no {' or '.join(missing)} weights (no {expected} keys); a single-file "
            "SDXL checkpoint in the original layout holds the UNet, the VAE and both text encoders"
        )


def load_vae(
    pretrained: str,
    vae_override: str | None = None,
    flag: str = "--pretrained_model_name_or_path",
    *,
    single_file_config: str | None = None,
):
    """The VAE of the base model, or `vae_override` (a diffusers AutoencoderKL folder or hub id)."""
    from diffusers import AutoencoderKL

    source, subfolder, used_flag = (vae_override, None, "--vae") if vae_override else (pretrained, "vae", flag)
    _check_source(source, used_flag)
    config = None if vae_override else _resolve_single_file(pretrained, single_file_config, flag)
    try:
        if config is not None:
            _require_parts(pretrained, ("VAE",), flag)
            return AutoencoderKL.from_single_file(pretrained, config=config, subfolder="vae", local_files_only=True)
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, local_files_only=_local_only())
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the flag named
        raise _wrap(used_flag, source, "VAE", exc) from exc


def load_text_encoders(
    pretrained: str, flag: str = "--pretrained_model_name_or_path", *, single_file_config: str | None = None
) -> TextEncoders:
    """Both CLIP tokenizers and text encoders (encoder 2 with its projection, as SDXL uses it)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _check_source(pretrained, flag)
    config = _resolve_single_file(pretrained, single_file_config, flag)
    local = _local_only()
    try:
        if config is not None:
            from diffusers import StableDiffusionXLPipeline

            _require_parts(pretrained, ("text encoder", "text encoder 2"), flag)
            # The pipeline loader is diffusers' public route to the text encoders of a single file; the
            # components passed as None are skipped, not loaded.
            pipe = StableDiffusionXLPipeline.from_single_file(
                pretrained, config=config, local_files_only=True, unet=None, vae=None, scheduler=None
            )
            return TextEncoders(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
        return TextEncoders(
            tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", local_files_only=local),
            tokenizer_2=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", local_files_only=local),
            text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", local_files_only=local),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                pretrained, subfolder="text_encoder_2", local_files_only=local
            ),
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "tokenizers and text encoders", exc) from exc


def load_unet(
    pretrained: str,
    flag: str = "--pretrained_model_name_or_path",
    torch_dtype=torch.float32,
    *,
    single_file_config: str | None = None,
):
    from diffusers import UNet2DConditionModel

    _check_source(pretrained, flag)
    config = _resolve_single_file(pretrained, single_file_config, flag)
    try:
        if config is not None:
            _require_parts(pretrained, ("UNet",), flag)
            return UNet2DConditionModel.from_single_file(
                pretrained, config=config, subfolder="unet", torch_dtype=torch_dtype, local_files_only=True
            )
        return UNet2DConditionModel.from_pretrained(
            pretrained, subfolder="unet", torch_dtype=torch_dtype, local_files_only=_local_only()
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "UNet", exc) from exc


def load_noise_scheduler(
    pretrained: str, flag: str = "--pretrained_model_name_or_path", *, single_file_config: str | None = None
):
    """A DDPMScheduler built from the model's scheduler config (betas, steps, prediction type).

    For a single file the scheduler config comes from the config folder: a v-prediction fine-tune needs a
    folder whose scheduler says `prediction_type: v_prediction`.
    """
    from diffusers import DDPMScheduler

    _check_source(pretrained, flag)
    config = _resolve_single_file(pretrained, single_file_config, flag)
    source = config if config is not None else pretrained
    try:
        return DDPMScheduler.from_pretrained(
            source, subfolder="scheduler", local_files_only=True if config is not None else _local_only()
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap(SINGLE_FILE_FLAG if config else flag, source, "noise scheduler config", exc) from exc


def load_unet_config(
    pretrained: str, flag: str = "--pretrained_model_name_or_path", *, single_file_config: str | None = None
) -> dict:
    """The UNet's diffusers config (to build it on the meta device): the folder's, or the config folder's."""
    from diffusers import UNet2DConditionModel

    _check_source(pretrained, flag)
    config = _resolve_single_file(pretrained, single_file_config, flag)
    source = config if config is not None else pretrained
    try:
        return dict(
            UNet2DConditionModel.load_config(
                source, subfolder="unet", local_files_only=True if config is not None else _local_only()
            )
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap(SINGLE_FILE_FLAG if config else flag, source, "UNet config", exc) from exc


def load_pipeline(
    pretrained: str,
    vae_override: str | None = None,
    torch_dtype=torch.float32,
    flag: str = "--pretrained_model_name_or_path",
    *,
    single_file_config: str | None = None,
    **components,
):
    """The whole StableDiffusionXLPipeline (for samples, validation images and saving).

    `components` replace parts without loading them, e.g. `unet=trained_unet` when saving a pipeline.
    """
    from diffusers import StableDiffusionXLPipeline

    _check_source(pretrained, flag)
    config = _resolve_single_file(pretrained, single_file_config, flag)
    kwargs = dict(components)
    if vae_override:
        kwargs["vae"] = load_vae(pretrained, vae_override).to(torch_dtype)
    try:
        if config is not None:
            needed = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
            _require_parts(pretrained, tuple(part for name, part in needed.items() if name not in kwargs), flag)
            return StableDiffusionXLPipeline.from_single_file(
                pretrained, config=config, torch_dtype=torch_dtype, local_files_only=True, **kwargs
            )
        return StableDiffusionXLPipeline.from_pretrained(
            pretrained, torch_dtype=torch_dtype, local_files_only=_local_only(), **kwargs
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap(flag, pretrained, "SDXL pipeline", exc) from exc
