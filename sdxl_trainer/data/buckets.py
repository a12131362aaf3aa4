"""Aspect-ratio buckets, the category rule, the upscale decision and SDXL micro-conditioning (pure math).

The rule is the seed trainer's (seed_reference §2.5-2.6), generated here rather than tabled:
* a category key K is a multiple of 64; its buckets are every (W, H) on the 64-px grid with
  (K-64)^2 < W*H <= K^2 and 1/2 <= W/H <= 2, ordered by area (largest first), then by width;
* an image of size w x h has w64, h64 = each floored to 64 and s = floor(sqrt(w64*h64)); it is skipped
  when w64*h64 < min_resolution^2; its category is the smallest key in [min, max] that is >= s (it rounds
  up), or max_resolution when the image is larger than every key;
* its bucket is the one whose aspect is closest to the unfloored w/h (ties: the first in order).

Fixed against the seed (B9, B37):
* the cover resize is computed in integers, so the resized image always covers the bucket, crop
  offsets are never negative and there is no black border;
* the upscale path crops the source to the bucket's aspect first, so the upscaler never works on pixels
  the crop discards, and a factor below `upscale_min_factor` is plain resampling, not an upscaler pass;
* an upscaled item's original_size is the true source size (the seed floored it to the 64 grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

GRID_PX = 64
MAX_ASPECT = 2.0
# Beyond twice the buckets' widest aspect (4:1), the centre crop would keep less than half of the image and the
# short side would be enlarged by plain resampling while original_size still says "native": such an image is
# skipped with this reason instead (issue 16; `extreme_aspect`).
MAX_SOURCE_ASPECT = 2 * MAX_ASPECT


@cache
def buckets_for_key(key_px: int) -> tuple[tuple[int, int], ...]:
    """All (width_px, height_px) buckets of one category key, in the rule's order."""
    if key_px % GRID_PX or key_px <= 0:
        raise ValueError(f"category key {key_px} is not a positive multiple of {GRID_PX}")
    low, high = (key_px - GRID_PX) ** 2, key_px**2
    longest_px = math.isqrt(int(high * MAX_ASPECT))  # w <= 2h and w*h <= K^2 give w^2 <= 2 K^2
    found = []
    for w in range(GRID_PX, longest_px + 1, GRID_PX):
        for h in range(GRID_PX, longest_px + 1, GRID_PX):
            if low < w * h <= high and 2 * w >= h and 2 * h >= w:
                found.append((w, h))
    return tuple(sorted(found, key=lambda b: (-b[0] * b[1], b[0])))


def closest_bucket(key_px: int, width_px: int, height_px: int) -> tuple[int, int]:
    """The bucket of `key_px` whose aspect ratio is closest to width/height (first one on ties)."""
    aspect = width_px / height_px
    return min(buckets_for_key(key_px), key=lambda b: abs(b[0] / b[1] - aspect))


def floor_to_grid(value_px: int) -> int:
    return value_px // GRID_PX * GRID_PX


def category_key(width_px: int, height_px: int, min_resolution: int, max_resolution: int) -> int | None:
    """Category key of an image, or None when its 64-floored area is below min_resolution^2 (skipped)."""
    area64 = floor_to_grid(width_px) * floor_to_grid(height_px)
    if area64 < min_resolution**2:
        return None
    side = math.isqrt(area64)
    smallest_at_least = -(-max(side, min_resolution) // GRID_PX) * GRID_PX
    return min(smallest_at_least, max_resolution)


def cover_resize(width_px: int, height_px: int, bucket_wh: tuple[int, int]) -> tuple[int, int]:
    """Size of the image scaled (keeping its aspect) to just cover the bucket; never short of it.

    Integer arithmetic: the binding side equals the bucket side exactly, the other side is floored and
    still >= the bucket side (the seed's float version could come out 1 px short, B9)."""
    bw, bh = bucket_wh
    if bw * height_px >= bh * width_px:  # width binds
        return bw, max(bh, height_px * bw // width_px)
    return max(bw, width_px * bh // height_px), bh


def centre_crop_top_left(resized_wh: tuple[int, int], bucket_wh: tuple[int, int]) -> tuple[int, int]:
    """(top_px, left_px) of a centred bucket-sized crop of the resized image; never negative."""
    return (resized_wh[1] - bucket_wh[1]) // 2, (resized_wh[0] - bucket_wh[0]) // 2


@dataclass(frozen=True)
class ItemPlan:
    """How one image becomes one bucket-sized training image, and its SDXL micro-conditioning."""

    source_wh: tuple[int, int]
    category_key: int
    bucket_wh: tuple[int, int]
    resized_wh: tuple[int, int]  # the whole image scaled to cover the bucket
    crop_top_left: tuple[int, int]  # (top, left) of the bucket inside resized_wh
    use_upscaler: bool  # run the upscaler network (else plain resampling)
    scale: float  # resized / source (> 1: enlarged)
    original_size_hw: tuple[int, int]

    @property
    def target_size_hw(self) -> tuple[int, int]:
        return self.bucket_wh[1], self.bucket_wh[0]

    @property
    def source_box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in source pixels of the region that ends up in the bucket."""
        sx = self.resized_wh[0] / self.source_wh[0]
        sy = self.resized_wh[1] / self.source_wh[1]
        top, left = self.crop_top_left
        bw, bh = self.bucket_wh
        return left / sx, top / sy, (left + bw) / sx, (top + bh) / sy

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        return (*self.original_size_hw, *self.crop_top_left, *self.target_size_hw)


def extreme_aspect(width_px: int, height_px: int) -> str | None:
    """The reason to skip an image whose aspect ratio is beyond MAX_SOURCE_ASPECT, or None when it fits."""
    aspect = max(width_px / height_px, height_px / width_px)
    if aspect <= MAX_SOURCE_ASPECT:
        return None
    return (
        f"extreme aspect ratio {width_px}x{height_px} ({aspect:.1f}:1): beyond {MAX_SOURCE_ASPECT:g}:1 the "
        f"{MAX_ASPECT:g}:1 buckets would crop away more than half of it; crop it first"
    )


def wants_upscale(
    width_px: int, height_px: int, category_px: int, upscale_to_resolution: int | None
) -> bool:  # fmt: skip
    """The seed's condition (§2.7): floored area <= upscale_to^2 and category below upscale_to."""
    if not upscale_to_resolution:
        return False
    area64 = floor_to_grid(width_px) * floor_to_grid(height_px)
    return area64 <= upscale_to_resolution**2 and category_px < upscale_to_resolution


def plan_item(
    width_px: int,
    height_px: int,
    min_resolution: int,
    max_resolution: int,
    upscale_to_resolution: int | None = None,
    upscale_min_factor: float = 1.1,
) -> ItemPlan | None:
    """The whole per-image geometry; None when the image is too small (below min_resolution^2)."""
    key = category_key(width_px, height_px, min_resolution, max_resolution)
    if key is None:
        return None
    upscale = wants_upscale(width_px, height_px, key, upscale_to_resolution)
    if upscale:
        # Straight to the upscale_to bucket: the region kept is cut from the source first, so the upscaler
        # only sees pixels that are trained on (the seed upscaled the whole image, then cropped, B37).
        key = int(upscale_to_resolution)
    bucket = closest_bucket(key, width_px, height_px)
    resized = cover_resize(width_px, height_px, bucket)
    scale = max(resized[0] / width_px, resized[1] / height_px)
    use_upscaler = upscale and scale >= upscale_min_factor
    # original_size (§2.9): "native quality" (= target) unless an upscaler invented the detail; then the
    # true pre-upscale size tells the UNet how little real detail there was.
    original = (height_px, width_px) if use_upscaler else (bucket[1], bucket[0])
    return ItemPlan(
        source_wh=(width_px, height_px),
        category_key=key,
        bucket_wh=bucket,
        resized_wh=resized,
        crop_top_left=centre_crop_top_left(resized, bucket),
        use_upscaler=use_upscaler,
        scale=scale,
        original_size_hw=original,
    )
