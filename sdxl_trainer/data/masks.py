"""Loss masks: where they come from (`<stem>.mask.png` beside an image, or its alpha channel with --alpha_mask),
how they are read (grey levels = weights in [0, 1]) and how they reach latent resolution (the image's own
bucket crop and scale, then the mean of each 8x8 pixel block: one weight per latent element).

White (255) trains a pixel fully, black (0) leaves it out of the loss, grey weighs in between. A mask must
have the image's size (after both are turned upright by their EXIF orientation); otherwise the item is
skipped and reported, because training it unmasked would silently ignore what the user asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl_trainer.data.buckets import ItemPlan

MASK_SUFFIX = ".mask.png"
LATENT_FACTOR = 8  # SDXL's VAE: one latent element per 8x8 pixels


def is_mask_file(name: str) -> bool:
    """`photo.mask.png` is the mask of `photo.<ext>`, never a training image of its own."""
    return name.lower().endswith(MASK_SUFFIX)


def mask_path_for(image_path: Path) -> Path:
    """Where an image's mask file would be: `<folder>/<stem>.mask.png`."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX)


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel ("L") of an image that has transparency (RGBA, LA, PA, palette with a transparent
    index), else None."""
    mode = image.mode
    if (mode == "P" and "transparency" in image.info) or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return image.getchannel("A")
    return None


def mask_weights(mask: Image.Image) -> Image.Image:
    """Any mask image to weights in [0, 1] (mode "F"): grey levels, 16-bit scaled, colour masks by luma; a mask
    with transparency counts transparent pixels as black."""
    alpha = alpha_channel(mask)
    if mask.mode.startswith("I") or mask.mode == "F":
        array = np.asarray(mask, dtype=np.float64)
        top = 65535.0 if mask.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if mask.mode == "F" and array.size and array.max() <= 1.0:
            top = 1.0
        weights = np.clip(array / top, 0.0, 1.0)
    else:
        weights = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    if alpha is not None:
        weights = weights * (np.asarray(alpha, dtype=np.float64) / 255.0)
    return Image.fromarray(weights.astype(np.float32), mode="F")


def check_mask_size(mask: Image.Image, image_size_wh: tuple[int, int], mask_name: str) -> None:
    if mask.size != tuple(image_size_wh):
        w, h = mask.size
        iw, ih = image_size_wh
        raise ValueError(f"mask {mask_name} is {w}x{h}, the image is {iw}x{ih}: they must match")


def mask_to_latent(weights: Image.Image, plan: ItemPlan, box: tuple[float, float, float, float] | None = None):
    """(1, H/8, W/8) float32 weights for a bucket of (W, H): the mask cropped and scaled exactly like the image
    (the region `box` of the source that the crop keeps, default the plan's source box, resampled to the bucket),
    then each latent element gets the mean of its 8x8 pixels, so an element half covered by white weighs 0.5."""
    bucket = weights.resize(plan.bucket_wh, Image.Resampling.BOX, box=box if box is not None else plan.source_box)
    pixels = torch.from_numpy(np.asarray(bucket, dtype=np.float32).copy()).clamp_(0.0, 1.0)
    return F.avg_pool2d(pixels[None, None], LATENT_FACTOR)[0]
