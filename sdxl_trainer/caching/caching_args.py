"""Flags of the caching step (`sdxl_process_data_dir.py`), declared once, and their start-up checks.

Names and meanings follow the seed's caching script where a flag existed there; every check that can fail
does so before any model is loaded, with a message that names the flag.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from sdxl_trainer.arg_types import HelpFormatter
from sdxl_trainer.caching import text_chunks
from sdxl_trainer.data.images import DEFAULT_MAX_IMAGE_PIXELS


class CachingArgsError(ValueError):
    """A bad flag or flag combination; the message names the flag."""


def _f(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class CachingArgs:
    data_dir: str = _f("data", "dataset folder, read recursively (never written to)")
    cache_dir: str = _f("cache", "cache root; this dataset goes to <cache_dir>/<basename>/")
    basename: str | None = _f(None, "the dataset's name in the cache (default: the data folder's name)")
    pretrained_model_name_or_path: str = _f(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "SDXL diffusers folder (or a hub id already in the local hub cache): tokenizers, text encoders and VAE",
    )  # fmt: skip
    vae: str | None = _f(None, "VAE override (a diffusers AutoencoderKL folder), e.g. the fp16-fix VAE")
    single_file_config: str | None = _f(
        None,
        "a diffusers SDXL folder whose configs, tokenizers and scheduler describe the checkpoint (e.g. SDXL base's); "
        "required when --pretrained_model_name_or_path is a single-file .safetensors checkpoint",
    )
    min_resolution: int = _f(256, "smallest category key; images whose 64-floored area is below its square are skipped")
    max_resolution: int = _f(1024, "largest category key; larger images are downscaled into it")
    upscale_to_resolution: int | None = _f(
        None, "upscale images whose category is below this key to it (needs --upscaler_model)"
    )
    upscale_min_factor: float = _f(1.1, "below this enlargement, plain Lanczos resampling replaces the upscaler")
    upscaler_model: str | None = _f(None, "ESRGAN-family weights file (e.g. RealESRGAN_x4plus.pth)")
    upscale_use_GFPGAN: bool = _f(False, "restore faces with GFPGAN after upscaling (needs --face_restore_model)")
    face_restore_model: str | None = _f(None, "GFPGAN weights file (e.g. GFPGANv1.4.pth)")
    save_upscale_samples: str | None = _f(None, "folder (outside the data folder) for before/after upscale JPEGs")
    batch_size: int = _f(8, "images per VAE batch on a GPU (8 at 1024 px needs ~16 GiB; on CPU: one by one)")
    num_workers: int | None = _f(None, "DataLoader workers that decode and resize images (default: CPUs/processes)")
    mixed_precision: str = _f("bf16", "autocast dtype on a GPU: bf16, fp16 or no (CPU always runs fp32)")
    cache_dtype: str = _f("fp16", "dtype of the stored tensors: fp16, bf16 or fp32")
    seed: int = _f(0, "seeds torch's RNG (the cache itself stores posterior mean and std, nothing random)")
    num_shards: int = _f(1, "split the items over this many independent launches (e.g. machines)")
    shard_index: int = _f(0, "which of the --num_shards parts this launch caches (0-based)")
    max_image_pixels: int = _f(DEFAULT_MAX_IMAGE_PIXELS, "refuse larger images (decompression bombs)")
    verify_hashes: bool = _f(False, "re-hash every image even when its size and mtime are unchanged")
    alpha_mask: bool = _f(
        False,
        "use each image's alpha channel as its loss mask (opaque = trained, transparent = ignored) when it has no "
        "<stem>.mask.png; the pixels are still composited onto white",
    )
    max_token_length: int = _f(
        77,
        "caption length in CLIP positions: 77, 154 or 231 (1-3 chunks of <BOS> + 75 tokens + <EOS>, encoded apart and "
        "concatenated); longer captions are truncated and counted in the report",
    )

    @property
    def dataset_cache_dir(self) -> Path:
        return Path(self.cache_dir).resolve() / self.basename

    def validate(self) -> None:
        """Raise CachingArgsError naming the flag for any bad value or combination."""
        data = Path(self.data_dir)
        if not data.is_dir():
            raise CachingArgsError(f"--data_dir {self.data_dir}: no such folder")
        data = data.resolve()
        if self.basename is None:
            self.basename = data.name
        if not self.basename or "/" in self.basename or self.basename in (".", ".."):
            raise CachingArgsError(f"--basename {self.basename!r}: must be a plain folder name")
        cache = Path(self.cache_dir).resolve()
        if cache == data or data in cache.parents:
            raise CachingArgsError(f"--cache_dir {self.cache_dir}: is inside --data_dir; the data folder is read-only")
        if self.dataset_cache_dir == data:
            raise CachingArgsError(
                f"--cache_dir {self.cache_dir} with --basename {self.basename}: the dataset's cache folder would be "
                "the data folder itself; choose another --cache_dir or --basename"
            )
        for flag in ("min_resolution", "max_resolution", "upscale_to_resolution"):
            value = getattr(self, flag)
            if value is not None and (value <= 0 or value % 64):
                raise CachingArgsError(f"--{flag} {value}: must be a positive multiple of 64")
        if self.max_resolution < self.min_resolution:
            raise CachingArgsError(
                f"--max_resolution {self.max_resolution} is below --min_resolution {self.min_resolution}"
            )
        if self.upscale_to_resolution is not None:
            if not self.min_resolution < self.upscale_to_resolution <= self.max_resolution:
                raise CachingArgsError(
                    f"--upscale_to_resolution {self.upscale_to_resolution}: must be above --min_resolution and at "
                    f"most --max_resolution ({self.min_resolution}..{self.max_resolution})"
                )
            if not self.upscaler_model:
                raise CachingArgsError(
                    "--upscale_to_resolution needs --upscaler_model (an ESRGAN-family weights file such as "
                    "RealESRGAN_x4plus.pth; nothing is downloaded)"
                )
        for flag in ("upscaler_model", "face_restore_model"):
            value = getattr(self, flag)
            if value and not Path(value).is_file():
                raise CachingArgsError(f"--{flag} {value}: no such file")
        if self.upscale_use_GFPGAN and not self.face_restore_model:
            raise CachingArgsError("--upscale_use_GFPGAN needs --face_restore_model (a GFPGAN weights file)")
        if self.face_restore_model and not self.upscale_use_GFPGAN:
            self.upscale_use_GFPGAN = True  # giving the weights file is asking for it
        if self.save_upscale_samples:
            samples = Path(self.save_upscale_samples).resolve()
            if samples == data or data in samples.parents:
                raise CachingArgsError(f"--save_upscale_samples {self.save_upscale_samples}: is inside --data_dir")
        if self.upscale_min_factor < 1.0:
            raise CachingArgsError(f"--upscale_min_factor {self.upscale_min_factor}: must be >= 1")
        if self.batch_size < 1:
            raise CachingArgsError(f"--batch_size {self.batch_size}: must be >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise CachingArgsError(f"--num_workers {self.num_workers}: must be >= 0")
        if self.mixed_precision not in ("bf16", "fp16", "no"):
            raise CachingArgsError(f"--mixed_precision {self.mixed_precision}: choose bf16, fp16 or no")
        if self.cache_dtype not in ("fp16", "bf16", "fp32"):
            raise CachingArgsError(f"--cache_dtype {self.cache_dtype}: choose fp16, bf16 or fp32")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise CachingArgsError(
                f"--shard_index {self.shard_index} --num_shards {self.num_shards}: need 0 <= index < shards"
            )
        if self.max_token_length not in text_chunks.MAX_TOKEN_LENGTHS:
            raise CachingArgsError(f"--max_token_length {self.max_token_length}: choose 77, 154 or 231")
        if self.max_image_pixels < 64 * 64:
            raise CachingArgsError(f"--max_image_pixels {self.max_image_pixels}: too small")
        for flag in ("pretrained_model_name_or_path", "vae"):
            value = getattr(self, flag)
            # A local path must exist; "org/name" may be a hub id (read from the local hub cache only).
            looks_local = value and (value.startswith((".", "/", "~")) or value.count("/") != 1)
            if looks_local and not Path(value).expanduser().exists():
                raise CachingArgsError(f"--{flag} {value}: no such folder")
        from sdxl_trainer.models import loading

        try:
            loading.check_model_args(self.pretrained_model_name_or_path, self.single_file_config)
        except loading.ModelLoadError as exc:
            raise CachingArgsError(str(exc)) from exc
        loading.set_single_file_config(self.single_file_config)

    def resolved_num_workers(self, world_size: int) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return max(0, min(8, (os.cpu_count() or 1) // max(1, world_size) - 1))


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    for f in fields(CachingArgs):
        flag, help_text = f"--{f.name}", f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, default=f.default, help=help_text + shown)
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> CachingArgs:
    """Parse and validate; a bad flag exits with status 2 and a message naming it (argparse's convention)."""
    parser = build_parser(description)
    args = CachingArgs(**vars(parser.parse_args(argv)))
    try:
        args.validate()
    except CachingArgsError as exc:
        parser.error(str(exc))
    return args
