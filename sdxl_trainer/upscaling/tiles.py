"""Pure helpers of tiled upscaling: tile plans with overlap and alignment, padding, and PIL/tensor
conversions."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


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


def _crop(tensor: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    left, top, right, bottom = box
    return tensor[:, top:bottom, left:right]


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
