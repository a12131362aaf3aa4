"""Super-resolution of training images: any ESRGAN-family weights file through spandrel, tiled, to an exact size.

The network runs at its native scale (x4 for RealESRGAN_x4plus) over overlapping tiles of at most
``tile_px``² input pixels, so any image fits in memory; PIL's Lanczos filter then resamples the result to the
exact requested size. Optionally GFPGAN restores the faces (``sdxl_trainer.face_restore``). Weights come only
from local files; each file is read once per process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
# Bumped whenever the pixels this module produces for the same weights and settings change.
UPSCALE_ALGORITHM_VERSION = 1


class UpscalerError(RuntimeError):
    """A clear, user-facing problem with an upscaler or face-restoration weights file or setting."""


# --------------------------------------------------------------------------------------------------
# Loading weights (once per process)
# --------------------------------------------------------------------------------------------------

# (real path, size, mtime, device, half) -> spandrel descriptor. A second Upscaler for the same file in the
# same process reuses the network instead of re-reading the file (the seed rebuilt it for every image).
_MODEL_CACHE: dict[tuple, object] = {}


def read_state_dict(path: Path) -> dict:
    """Tensors of a weights file without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


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


# --------------------------------------------------------------------------------------------------
# Tiling (pure functions)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One network call: the input window and the part of it (the core) whose output is kept."""

    window: tuple[int, int, int, int]  # (left, top, right, bottom) in input pixels, what the network sees
    core: tuple[int, int, int, int]  # (left, top, right, bottom) in input pixels, a partition of the image


def axis_tiles(length_px: int, window_px: int, overlap_px: int, align_px: int = 1) -> list[tuple[int, int, int]]:
    """Split one image axis into ``(core_start, core_end, window_start)`` triples.

    Cores partition ``[0, length_px)`` into near-equal pieces. Every window has the same length
    ``window_length(length_px, window_px, align_px)`` (so tiles batch together) and holds its core plus at least
    ``overlap_px`` of context on each side that is inside the image; windows at the borders are shifted
    inwards instead of shrinking. The context is discarded afterwards, which hides the seams.

    ``align_px`` > 1 (pixel-unshuffle models such as RealESRGAN_x2plus fold 2x2 or 4x4 pixel blocks into
    channels) puts every boundary on a multiple of it, so each tile folds the same blocks as the whole image
    would; ``length_px`` must then be a multiple of ``align_px`` (pad the image first).
    """
    if length_px <= 0 or align_px <= 0 or length_px % align_px:
        raise ValueError(f"length_px {length_px} must be a positive multiple of align_px {align_px}")
    units = length_px // align_px
    window_units = window_length(length_px, window_px, align_px) // align_px
    if window_px <= 0 or units <= window_units:
        return [(0, length_px, 0)]
    overlap_units = math.ceil(overlap_px / align_px)
    core_units = window_units - 2 * overlap_units
    if core_units <= 0:
        raise ValueError(f"tile of {window_px} px leaves no core with an overlap of {overlap_px} px per side")
    count = math.ceil(units / core_units)
    bounds = [round(i * units / count) for i in range(count + 1)]
    tiles = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        window_start = min(max(start - overlap_units, 0), units - window_units)
        tiles.append((start * align_px, end * align_px, window_start * align_px))
    return tiles


def window_length(length_px: int, window_px: int, align_px: int = 1) -> int:
    """Length of every window along an axis: the whole axis, or ``window_px`` rounded down to ``align_px``."""
    if window_px <= 0:
        return length_px
    return min(length_px, max(window_px // align_px, 1) * align_px)


def plan_tiles(width_px: int, height_px: int, tile_px: int, overlap_px: int, align_px: int = 1) -> list[Tile]:
    """The tiles of a ``width_px`` x ``height_px`` image; one whole-image tile when ``tile_px`` is 0 or larger."""
    win_w = window_length(width_px, tile_px, align_px)
    win_h = window_length(height_px, tile_px, align_px)
    tiles = []
    for y0, y1, wy in axis_tiles(height_px, tile_px, overlap_px, align_px):
        for x0, x1, wx in axis_tiles(width_px, tile_px, overlap_px, align_px):
            tiles.append(Tile(window=(wx, wy, wx + win_w, wy + win_h), core=(x0, y0, x1, y1)))
    return tiles


def pad_to_multiple(tensor: torch.Tensor, align_px: int) -> torch.Tensor:
    """Pad (C, H, W) on the right and bottom to multiples of ``align_px``: reflect, then replicate where the
    image is too small to reflect (the same padding spandrel applies to a whole image)."""
    height, width = tensor.shape[-2:]
    pad_w, pad_h = -width % align_px, -height % align_px
    if not (pad_w or pad_h):
        return tensor
    reflect_w, reflect_h = min(pad_w, width - 1), min(pad_h, height - 1)
    tensor = torch.nn.functional.pad(tensor[None], (0, reflect_w, 0, reflect_h), mode="reflect")
    tensor = torch.nn.functional.pad(tensor, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return tensor[0]


# --------------------------------------------------------------------------------------------------
# Image <-> tensor
# --------------------------------------------------------------------------------------------------


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey images ("I;16", or "I" as PIL opens 16-bit PNGs) scaled to 8 bits: PIL's own convert clips
    them at 255, which turns most of the picture white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(array, 0, 65535) >> 8).astype(np.uint8))
    return image


def pil_to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1]; 3 channels from RGB, 1 from luminance."""
    array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 with rounding (on the tensor's device, so only bytes cross to the CPU)."""
    return tensor.float().clamp(0, 1).mul(255.0).round().to(torch.uint8)


def uint8_to_pil(tensor: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 CPU tensor -> RGB or L image."""
    array = tensor.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def resize_exact(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """Lanczos resample (antialiased when shrinking) to exactly ``size_wh``; no-op when already that size."""
    if image.size == tuple(size_wh):
        return image
    return image.resize(tuple(size_wh), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------------
# The upscaler
# --------------------------------------------------------------------------------------------------


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
            from sdxl_trainer.face_restore import FaceRestorer

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


def _crop(tensor: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    left, top, right, bottom = box
    return tensor[:, top:bottom, left:right]


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _restore_mode(source: Image.Image, result: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """Give the result the source's grey/colour kind and its alpha channel (alpha is not super-resolved)."""
    grey = source.mode in ("L", "LA", "I", "I;16", "F", "1")
    result = result.convert("L" if grey else "RGB")
    if "A" in source.getbands() or (source.mode == "P" and "transparency" in source.info):
        alpha = source.convert("RGBA").getchannel("A").resize(tuple(size_wh), Image.Resampling.LANCZOS)
        result = result.convert("LA" if grey else "RGBA")
        result.putalpha(alpha)
    return result


# --------------------------------------------------------------------------------------------------
# Files and folders (the upscale.py command)
# --------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def target_size(size_wh: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size_wh`` times ``scale``, rounded, at least 1 px per side."""
    return max(1, round(size_wh[0] * scale)), max(1, round(size_wh[1] * scale))


def list_images(input_path: Path) -> list[Path]:
    """One file, or every image below a folder (recursively, sorted)."""
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise UpscalerError(f"--input: {str(input_path)!r} is neither a file nor a folder")
    return sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _is_within(path: Path, folder: Path) -> bool:
    return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents


@dataclass
class FolderReport:
    written: list[Path]
    skipped_existing: list[Path]
    failed: list[tuple[Path, str]]  # (input, reason)


def upscale_files(
    upscaler: Upscaler,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    scale: float | None = None,
    output_format: str = "png",
    overwrite: bool = False,
) -> FolderReport:
    """Upscale one image or a folder tree into ``output_dir`` (same relative paths, ``output_format`` files).

    ``scale`` defaults to the network's native scale. The input is never written to (an output folder inside
    it is refused), outputs are written atomically, existing outputs are kept unless ``overwrite``, and an
    unreadable image is reported and skipped."""
    from PIL import ImageOps

    source, target = Path(input_path), Path(output_dir)
    if source.is_dir() and _is_within(target, source):
        raise UpscalerError(
            f"--output {str(target)!r} is inside --input {str(source)!r}: the input is never written to"
        )
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise UpscalerError(f"--scale must be a positive number, got {scale}")
    factor = float(scale) if scale is not None else float(upscaler.scale)
    files = list_images(source)
    root = source if source.is_dir() else source.parent
    report = FolderReport([], [], [])
    pending: list[tuple[Path, Path, Image.Image]] = []

    def flush() -> None:
        images = [image for _, _, image in pending]
        try:
            results = upscaler.upscale_many(images, [target_size(image.size, factor) for image in images])
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. out of memory: report, keep going
            report.failed.extend((src, f"upscaling failed: {exc}") for src, _, _ in pending)
            pending.clear()
            return
        for (src, dst, _), result in zip(pending, results, strict=True):
            _save_atomic(result, dst)
            report.written.append(dst)
            logger.info("%s -> %s (%dx%d)", src, dst, *result.size)
        pending.clear()

    for src in files:
        dst = (target / src.relative_to(root)).with_suffix(OUTPUT_FORMATS[output_format])
        if dst.exists() and dst.resolve() == src.resolve():
            report.failed.append((src, f"output {dst} would replace the input (choose another --output)"))
            continue
        if dst.exists() and not overwrite:
            report.skipped_existing.append(dst)
            continue
        try:
            with Image.open(src) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for broken files
            report.failed.append((src, f"unreadable image: {exc}"))
            continue
        pending.append((src, dst, image))
        if len(pending) >= upscaler.batch_size:
            flush()
    if pending:
        flush()
    return report


def _save_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temp, format={".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[path.suffix], quality=95)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
