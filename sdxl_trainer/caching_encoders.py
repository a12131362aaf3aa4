"""The models of the caching step (VAE and both text encoders, loaded only when needed) and the settings
fingerprint that says which cached tensors they invalidate.

Models are identified by the content of their files (sha256), not by path: a moved model folder keeps its
cache; a changed VAE or text encoder recomputes the latents or the embeddings, and only those.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from sdxl_trainer import models
from sdxl_trainer.cache import atomic_write_json
from sdxl_trainer.caching_args import CachingArgs

# Bump when the pixels or tensors produced for the same inputs and settings change.
GEOMETRY_VERSION = 1  # bucket rule, resampling, colour conversion
TEXT_VERSION = 1  # tokenisation and hidden-state selection
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}
HASH_MEMO_FILE = ".file_hashes.json"


class FileHasher:
    """sha256 of files, memoised by (path, size, mtime) so an unchanged multi-GB model is hashed once."""

    def __init__(self, memo_path: Path | None = None):
        self.memo_path = memo_path
        self.memo: dict[str, str] = {}
        if memo_path and memo_path.is_file():
            with contextlib.suppress(OSError, ValueError):
                self.memo = json.loads(memo_path.read_text(encoding="utf-8"))
        self.changed = False

    def file(self, path: Path) -> str:
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in self.memo:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            self.memo[memo_key], self.changed = digest.hexdigest(), True
        return self.memo[memo_key]

    def folder(self, folder: Path) -> str:
        """One hash over every file below `folder` (relative names and contents)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{path.relative_to(folder).as_posix()}={self.file(path)};".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.memo_path and self.changed:
            atomic_write_json(self.memo_path, self.memo)


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


def upscale_settings(args: CachingArgs, hasher: FileHasher) -> dict | None:
    if not args.upscale_to_resolution:
        return None
    from sdxl_trainer import upscale

    return {
        "to_resolution": args.upscale_to_resolution,
        "min_factor": args.upscale_min_factor,
        "model_sha256": hasher.file(Path(args.upscaler_model)),
        "face_restore_sha256": hasher.file(Path(args.face_restore_model)) if args.upscale_use_GFPGAN else None,
        "algorithm_version": getattr(upscale, "UPSCALE_ALGORITHM_VERSION", None),
        # fp16 and fp32 networks give slightly different pixels: switching recomputes the upscaled items
        "half": args.mixed_precision != "no" and torch.cuda.is_available(),
    }


def build_fingerprint(args: CachingArgs, hasher: FileHasher) -> dict:
    """{"image": what shapes the latents, "text": what shapes the embeddings, "info": readable, not compared}."""
    model = args.pretrained_model_name_or_path
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
        },
        "text": {
            "encoders": _identity(
                hasher, model, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"], config
            ),
            "mixed_precision": args.mixed_precision,
            "cache_dtype": args.cache_dtype,
            "text_version": TEXT_VERSION,
        },
        "info": {
            "model": model,
            "vae": args.vae,
            "upscaler_model": args.upscaler_model and Path(args.upscaler_model).name,
        },
    }


class Encoders:
    """VAE and text encoders on one device, each loaded on first use (a run with nothing to do loads none)."""

    def __init__(self, args: CachingArgs, device: torch.device):
        self.args, self.device = args, device
        self.store_dtype = _DTYPES[args.cache_dtype]
        self._vae = None
        self._text = None

    def _autocast(self):
        if self.device.type != "cuda" or self.args.mixed_precision == "no":
            return contextlib.nullcontext()  # CPU: plain fp32 (exact, and fp16 CPU kernels are slow)
        return torch.autocast("cuda", dtype=_DTYPES[self.args.mixed_precision])

    @property
    def vae(self):
        if self._vae is None:
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # few distinct bucket shapes: tuned kernels pay off
            vae = models.load_vae(self.args.pretrained_model_name_or_path, self.args.vae)
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    @property
    def text(self) -> models.TextEncoders:
        if self._text is None:
            text = models.load_text_encoders(self.args.pretrained_model_name_or_path)
            for encoder in (text.text_encoder, text.text_encoder_2):
                encoder.to(self.device).eval().requires_grad_(False)
            self._text = text
        return self._text

    @torch.inference_mode()
    def encode_images(self, pixels_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, 3) uint8 -> (latent_mean, latent_std), each (B, C, H/8, W/8), scaled like SDXL latents,
        in the cache dtype, on the encoders' device (kernels queued, not waited for). The pixels stay
        channels-last on the host (stacking them is a plain copy); the device reorders them."""
        vae = self.vae
        x = pixels_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().contiguous()
        x = x.div_(127.5).sub_(1.0)
        with self._autocast():
            posterior = vae.encode(x).latent_dist
        scale = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        mean = (posterior.mean.float() - shift) * scale
        std = posterior.std.float() * scale
        return mean.to(self.store_dtype), std.to(self.store_dtype)  # on the device: the caller copies them back

    @torch.inference_mode()
    def encode_texts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """SDXL's conditioning: both encoders' penultimate hidden states side by side (B, 77, D1+D2), the
        second encoder's projected pooled output (B, D_pool), and each caption's token count (for reports)."""
        text = self.text
        hidden, pooled, lengths = [], None, []
        for tokenizer, encoder in ((text.tokenizer, text.text_encoder), (text.tokenizer_2, text.text_encoder_2)):
            max_length = tokenizer.model_max_length
            tokens = tokenizer(
                captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
            if not lengths:
                lengths = [len(ids) for ids in tokenizer(captions, truncation=False).input_ids]
            ids = tokens.input_ids
            if self.device.type == "cuda":
                # A blocking copy from pageable memory waits for every kernel queued before it (the batch's
                # VAE encode): measured on the H200 as the caching loop's main stall.
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            with self._autocast():
                out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds.float()
        prompt = torch.cat(hidden, dim=-1)
        return prompt.to(self.store_dtype), pooled.to(self.store_dtype), lengths


def resolve_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
