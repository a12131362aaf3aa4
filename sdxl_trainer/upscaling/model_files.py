"""Loading image-to-image networks (ESRGAN family, GFPGAN) through spandrel from local files only, with a
per-process cache, and the errors that name the flag to fix."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from sdxl_trainer.safe_load import safe_torch_load

logger = logging.getLogger(__name__)


MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


class UpscalerError(RuntimeError):
    """A clear, user-facing problem with an upscaler or face-restoration weights file or setting."""


# (real path, size, mtime, device, half) -> spandrel descriptor. A second Upscaler for the same file in the
# same process reuses the network instead of re-reading the file (the seed rebuilt it for every image).
_MODEL_CACHE: dict[tuple, object] = {}


def read_state_dict(path: Path) -> dict:
    """Tensors of a weights file without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return safe_torch_load(path)


def load_image_model(path: str | os.PathLike, flag: str, device: torch.device, half: bool = False):
    """Load a spandrel ``ImageModelDescriptor`` (eval mode, on ``device``; fp16 if ``half`` and the architecture
    supports it, else fp32: check ``descriptor.dtype``) from a local file.

    Raises UpscalerError naming ``flag`` and the file for a missing file, an unsupported suffix, an unreadable
    file or an architecture spandrel does not know."""
    import spandrel

    file = Path(path).expanduser()
    if not file.is_file():
        raise UpscalerError(
            f"{flag}: weights file {str(file)!r} does not exist (weights are never downloaded: pass the path "
            "of a local file, e.g. RealESRGAN_x4plus.pth from the Real-ESRGAN GitHub releases)"
        )
    if file.suffix.lower() not in MODEL_SUFFIXES:
        raise UpscalerError(f"{flag}: {str(file)!r} is not a weights file (expected one of {MODEL_SUFFIXES})")
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, str(device), half)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    try:
        state_dict = spandrel.canonicalize_state_dict(read_state_dict(file))
    except Exception as exc:  # noqa: BLE001 - any read failure becomes one clear message
        raise UpscalerError(f"{flag}: cannot read weights file {str(file)!r}: {exc}") from exc
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise UpscalerError(
            f"{flag}: unknown architecture in {str(file)!r}: spandrel {spandrel.__version__} recognises "
            "ESRGAN/Real-ESRGAN (RRDBNet), Real-ESRGAN Compact, GFPGAN and the other architectures it lists"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a detected but malformed file
        raise UpscalerError(f"{flag}: {str(file)!r} looks like a known architecture but fails to load: {exc}") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{flag}: {str(file)!r} is a {descriptor.architecture.name} model, not an image model")
    dtype = torch.float16 if half and descriptor.supports_half else torch.float32
    descriptor.model.to(device=device, dtype=dtype)
    descriptor.eval()
    _MODEL_CACHE[key] = descriptor
    logger.info("loaded %s (%s x%d) from %s", flag, descriptor.architecture.name, descriptor.scale, file)
    return descriptor


def clear_model_cache() -> None:
    """Forget every loaded network (frees its memory once no Upscaler holds it)."""
    _MODEL_CACHE.clear()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
