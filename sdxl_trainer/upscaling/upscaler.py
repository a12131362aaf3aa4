"""Super-resolution of training images: any ESRGAN-family weights file through spandrel, tiled, to an exact size.

The network runs at its native scale (x4 for RealESRGAN_x4plus) over overlapping tiles of at most
``tile_px``² input pixels, so any image fits in memory; PIL's Lanczos filter then resamples the result to the
exact requested size. Optionally GFPGAN restores the faces (``sdxl_trainer.upscaling.face_restore``). Weights come only
from local files; each file is read once per process.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from PIL import Image

from sdxl_trainer.upscaling.model_files import UpscalerError, file_sha256, load_image_model
from sdxl_trainer.upscaling.tiles import (
    Tile,
    _chunks,
    _crop,
    pad_to_multiple,
    pil_to_tensor,
    plan_tiles,
    resize_exact,
    tensor_to_uint8,
    to_8bit,
    uint8_to_pil,
)

logger = logging.getLogger(__name__)


# Bumped whenever the pixels this module produces for the same weights and settings change.
UPSCALE_ALGORITHM_VERSION = 1


class Upscaler:
    """An ESRGAN-family super-resolution network (plus optional GFPGAN faces), loaded once per process.

    ``tile_px``: largest input window the network sees at once (0: whole image); ``tile_overlap_px``: context
    added around each tile and cropped away afterwards; ``batch_size``: tiles or equal-size images per network
    call; ``half``: fp16 on CUDA (ignored with a warning on CPU, where fp16 convolutions are slow or missing).
    """

    def __init__(
        self,
        model_path: str,
        face_restore_model_path: str | None = None,
        device: str | torch.device = "cpu",
        tile_px: int = 512,
        half: bool = False,
        *,
        tile_overlap_px: int = 16,
        batch_size: int = 4,
        model_flag: str = "--model",
        face_restore_flag: str = "--face_restore_model",
        min_face_px: int = 32,
    ) -> None:
        self.device = _parse_device(device)
        if tile_px < 0 or (0 < tile_px <= 2 * tile_overlap_px) or tile_overlap_px < 0:
            raise UpscalerError(
                f"--tile {tile_px} must be 0 (no tiling) or larger than twice the overlap ({tile_overlap_px} px)"
            )
        if batch_size < 1:
            raise UpscalerError(f"--batch_size {batch_size}: must be at least 1")
        if half and self.device.type != "cuda":
            logger.warning("--half needs a CUDA device; running the upscaler in fp32 on %s", self.device)
            half = False
        self.tile_px = tile_px
        self.tile_overlap_px = tile_overlap_px
        self.batch_size = batch_size
        self.model_path = str(model_path)
        self.model_flag = model_flag
        self.model = load_image_model(model_path, model_flag, self.device, half)
        if self.model.purpose not in ("SR", "Restoration") or self.model.scale < 1:
            hint = f"; pass it as {face_restore_flag}" if self.model.purpose == "FaceSR" else ""
            raise UpscalerError(
                f"{model_flag}: {model_path!r} is a {self.model.architecture.name} {self.model.purpose} model, "
                f"not a super-resolution model{hint}"
            )
        if self.model.input_channels not in (1, 3) or self.model.output_channels != self.model.input_channels:
            raise UpscalerError(
                f"{model_flag}: {model_path!r} maps {self.model.input_channels} to {self.model.output_channels} "
                "channels; only RGB->RGB and grey->grey models are supported"
            )
        self.dtype = self.model.dtype
        if half and self.dtype != torch.float16:
            logger.warning("%s does not support fp16; running it in fp32", self.model.architecture.name)
        self.scale = int(self.model.scale)
        # pixel-unshuffle models need tile boundaries on multiples of their block size
        self.align_px = int(self.model.size_requirements.multiple_of)
        if tile_px and (tile_px // self.align_px) - 2 * math.ceil(tile_overlap_px / self.align_px) <= 0:
            raise UpscalerError(f"--tile {tile_px} is too small for this model with --tile_overlap {tile_overlap_px}")
        self.face_restorer = None
        if face_restore_model_path:
            from sdxl_trainer.upscaling.face_restore import FaceRestorer

            self.face_restorer = FaceRestorer(
                face_restore_model_path, self.device, flag=face_restore_flag, min_face_px=min_face_px
            )
        self.faces_restored = 0  # running total, for reports

    @property
    def architecture(self) -> str:
        return self.model.architecture.name

    def fingerprint(self) -> dict:
        """What shapes the pixels: for cache fingerprints (content hashes, not paths, so moved files match)."""
        info = {
            "algorithm_version": UPSCALE_ALGORITHM_VERSION,
            "model_sha256": file_sha256(self.model_path),
            "architecture": self.architecture,
            "scale": self.scale,
            "dtype": str(self.dtype).removeprefix("torch."),
            "face_restore_model_sha256": None,
        }
        if self.face_restorer is not None:
            info["face_restore_model_sha256"] = file_sha256(self.face_restorer.model_path)
            info["face_detector"] = self.face_restorer.detector_name
        return info

    def upscale(self, image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
        """Return the image upscaled to exactly size_wh (network at its native scale, then resampled)."""
        return self.upscale_many([image], [size_wh])[0]

    def upscale_many(self, images: Sequence[Image.Image], sizes_wh: Sequence[tuple[int, int]]) -> list[Image.Image]:
        """Upscale several images; tiles of equal shape (also across images) share one network call.

        Output modes: L/LA stay grey, everything else becomes RGB; an alpha channel is resized with Lanczos."""
        if len(images) != len(sizes_wh):
            raise ValueError("one target size per image")
        for size in sizes_wh:
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"target size must be (width_px, height_px) >= 1, got {size}")
        channels = self.model.input_channels
        images = [to_8bit(image) for image in images]
        native = self.run_network([pil_to_tensor(image, channels) for image in images])
        results = []
        for image, out, size_wh in zip(images, native, sizes_wh, strict=True):
            result = resize_exact(uint8_to_pil(out), size_wh)
            if self.face_restorer is not None:
                restored, count = self.face_restorer.restore_faces(image.convert("RGB"), result.convert("RGB"))
                self.faces_restored += count
                result = restored if result.mode == "RGB" else restored.convert(result.mode)
            results.append(_restore_mode(image, result, size_wh))
        return results

    @torch.inference_mode()
    def run_network(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(C, H, W) [0, 1] float tensors -> (C, H*scale, W*scale) uint8 CPU tensors, tiled and batched."""
        scale, align = self.scale, self.align_px
        padded = [pad_to_multiple(t, align) for t in images]
        outputs = [torch.empty((t.shape[0], t.shape[1] * scale, t.shape[2] * scale), dtype=torch.uint8) for t in padded]
        by_shape: dict[tuple[int, int], list[tuple[int, Tile]]] = defaultdict(list)
        for index, tensor in enumerate(padded):
            for tile in plan_tiles(tensor.shape[2], tensor.shape[1], self.tile_px, self.tile_overlap_px, align):
                left, top, right, bottom = tile.window
                by_shape[(bottom - top, right - left)].append((index, tile))
        for jobs in by_shape.values():
            for chunk in _chunks(jobs, self.batch_size):
                batch = torch.stack([_crop(padded[i], tile.window) for i, tile in chunk])
                result = tensor_to_uint8(self.model(batch.to(self.device, self.dtype))).cpu()
                for (index, tile), out in zip(chunk, result, strict=True):
                    wx, wy = tile.window[:2]
                    x0, y0, x1, y1 = tile.core
                    outputs[index][:, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = out[
                        :, (y0 - wy) * scale : (y1 - wy) * scale, (x0 - wx) * scale : (x1 - wx) * scale
                    ]
        # drop the alignment padding
        return [out[:, : t.shape[1] * scale, : t.shape[2] * scale] for out, t in zip(outputs, images, strict=True)]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UpscalerError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UpscalerError(f"--device {device}: CUDA is not available on this machine")
    return parsed


def _restore_mode(source: Image.Image, result: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """Give the result the source's grey/colour kind and its alpha channel (alpha is not super-resolved)."""
    grey = source.mode in ("L", "LA", "I", "I;16", "F", "1")
    result = result.convert("L" if grey else "RGB")
    if "A" in source.getbands() or (source.mode == "P" and "transparency" in source.info):
        alpha = source.convert("RGBA").getchannel("A").resize(tuple(size_wh), Image.Resampling.LANCZOS)
        result = result.convert("LA" if grey else "RGBA")
        result.putalpha(alpha)
    return result
