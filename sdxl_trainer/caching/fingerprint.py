"""The settings fingerprint of a cache: which models, resolutions and upscaler shaped its image half and
its text half, so a changed setting re-encodes only what it affects.

Models are identified by the content of their files (sha256), not by path: a moved model folder keeps its
cache; a changed VAE or text encoder recomputes the latents or the embeddings, and only those."""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.caching.file_hashing import FileHasher

# Bump when the pixels or tensors produced for the same inputs and settings change.
GEOMETRY_VERSION = 1  # bucket rule, resampling, colour conversion


TEXT_VERSION = 1  # tokenisation and hidden-state selection


def _local_model_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:  # a hub id: its snapshot in the local hub cache, if any (never downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001
        return None


def _identity(
    hasher: FileHasher, name_or_path: str, subfolders: list[str | None], single_file_config: str | None = None
) -> dict:
    if Path(name_or_path).is_file():  # a single-file checkpoint: its bytes, plus the configs that describe it
        config = _identity(hasher, single_file_config, subfolders) if single_file_config else None
        return {"file": hasher.file(Path(name_or_path)), "config": config}
    root = _local_model_dir(name_or_path)
    if root is None:
        return {"unresolved": name_or_path}
    out = {}
    for sub in subfolders:
        folder = root / sub if sub else root
        out[sub or "."] = hasher.folder(folder) if folder.is_dir() else None
    return out


def model_identity(
    hasher: FileHasher, name_or_path: str, subfolders: list[str | None], single_file_config: str | None = None
) -> dict:
    """What identifies a model's parts by content (the trainer compares its own models with a cache's)."""
    return _identity(hasher, name_or_path, subfolders, single_file_config)


def upscale_settings(args: CachingArgs, hasher: FileHasher) -> dict | None:
    if not args.upscale_to_resolution:
        return None
    from sdxl_trainer.upscaling.upscaler import UPSCALE_ALGORITHM_VERSION

    return {
        "to_resolution": args.upscale_to_resolution,
        "min_factor": args.upscale_min_factor,
        "model_sha256": hasher.file(Path(args.upscaler_model)),
        "face_restore_sha256": hasher.file(Path(args.face_restore_model)) if args.upscale_use_GFPGAN else None,
        "algorithm_version": UPSCALE_ALGORITHM_VERSION,
        # fp16 and fp32 networks give slightly different pixels: switching recomputes the upscaled items
        "half": args.mixed_precision != "no" and torch.cuda.is_available(),
    }


def build_fingerprint(args: CachingArgs, hasher: FileHasher) -> dict:
    """{"image": what shapes the latents, "text": what shapes the embeddings, "info": readable, not compared}."""
    model = args.pretrained_model_name_or_path
    image_extra = {"alpha_mask": True} if args.alpha_mask else {}  # absent when off: older caches stay valid
    text_extra = {}
    if args.max_token_length != 77:  # absent at the default: caches built before the flag existed stay valid
        text_extra["max_token_length"] = args.max_token_length
    config = args.single_file_config
    vae = _identity(hasher, args.vae, [None]) if args.vae else _identity(hasher, model, ["vae"], config)
    return {
        "image": {
            "vae": vae,
            "min_resolution": args.min_resolution,
            "max_resolution": args.max_resolution,
            "upscale": upscale_settings(args, hasher),
            "mixed_precision": args.mixed_precision,
            "cache_dtype": args.cache_dtype,
            "geometry_version": GEOMETRY_VERSION,
            **image_extra,
        },
        "text": {
            "encoders": _identity(
                hasher, model, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"], config
            ),
            "mixed_precision": args.mixed_precision,
            "cache_dtype": args.cache_dtype,
            "text_version": TEXT_VERSION,
            **text_extra,
        },
        "info": {  # readable, never hashed: the trainer reads vae_path (its --vae default) and data_dir (never written)
            "model": model,
            "vae": args.vae,
            "vae_path": str(Path(args.vae).resolve()) if args.vae and Path(args.vae).exists() else args.vae,
            "data_dir": str(Path(args.data_dir).resolve()),
            "upscaler_model": args.upscaler_model and Path(args.upscaler_model).name,
        },
    }
