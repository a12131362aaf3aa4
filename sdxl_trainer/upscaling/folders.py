"""`upscale.py`'s folder mode: every image below a folder upscaled by a factor into another folder, written
atomically, skipped files reported."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdxl_trainer.upscaling.model_files import UpscalerError
from sdxl_trainer.upscaling.upscaler import Upscaler

logger = logging.getLogger(__name__)


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


MAX_SCALE = 16.0  # beyond this the network's detail is gone and the output is plain resampling of it
MAX_OUTPUT_PIXELS = 2**28  # 16384 x 16384 (about 800 MB as RGB, several GB while resampling)


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
    if scale is not None and not (0 < scale <= MAX_SCALE and math.isfinite(scale)):
        raise UpscalerError(f"--scale must be a number in (0, {MAX_SCALE}], got {scale}")
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
        width, height = target_size(image.size, factor)
        if width * height > MAX_OUTPUT_PIXELS:  # refused here rather than killed for memory while resampling
            report.failed.append((src, f"output {width}x{height} is over {MAX_OUTPUT_PIXELS} pixels: lower --scale"))
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
