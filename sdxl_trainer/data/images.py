"""Find image/caption pairs in a data folder and load images as clean RGB, refusing or reporting bad files.

The data folder is only ever read. A missing caption is an empty caption; a caption that is not UTF-8 is
decoded as Windows-1252 (Latin-1 as the last resort); both are reported. An image that cannot be used is
skipped with a reason (`ImageSkip`), never a crash of the whole run.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from sdxl_trainer.data import masks
from sdxl_trainer.data.buckets import ItemPlan

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
# A decompression bomb (a small file that decodes to gigapixels) must be refused before it is decoded.
# 2^27 px is e.g. 16384 x 8192: far above any training size, about 400 MB decoded.
DEFAULT_MAX_IMAGE_PIXELS = 2**27
_WHITE = (255, 255, 255)


class ImageSkip(Exception):
    """This file cannot be used; str(exc) is the reason shown in the report."""


@dataclass(frozen=True)
class DataItem:
    image_path: Path  # absolute
    relpath: str  # POSIX, relative to the data folder: the item's identity in the cache
    caption: str
    caption_note: str | None  # why the caption needs attention (missing, not UTF-8), for the report
    mask_path: Path | None = None  # `<stem>.mask.png` beside the image, when there is one (`data.masks`)


# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's mark).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _utf16_without_bom(raw: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when NULs sit in every other byte (ASCII-range text saved as UTF-16, no mark)."""
    if len(raw) < 2 or len(raw) % 2 or b"\x00" not in raw:
        return None
    odd, even = raw[1::2].count(0), raw[0::2].count(0)
    if odd >= len(raw) // 4 and even == 0:
        return "utf-16-le"
    if even >= len(raw) // 4 and odd == 0:
        return "utf-16-be"
    return None


def decode_caption(raw: bytes) -> tuple[str, str | None]:
    """(text stripped, note): a byte-order mark decides (UTF-8, UTF-16, UTF-32, as Windows Notepad writes them);
    else UTF-8, UTF-16 recognised by its NULs, then Windows-1252 and Latin-1 as the last resorts (noted)."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding).strip(), None
            except UnicodeDecodeError:
                break  # a mark but not that encoding: fall through to the guesses below
    try:
        return raw.decode("utf-8").strip(), None
    except UnicodeDecodeError:
        pass
    encoding = _utf16_without_bom(raw)
    if encoding:
        try:
            return raw.decode(encoding).strip(), f"caption is {encoding.upper()} without a byte-order mark"
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("cp1252").strip(), "caption is not UTF-8: read as Windows-1252"
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip(), "caption is not UTF-8: read as Latin-1"


def read_caption(caption_path: Path | None) -> tuple[str, str | None]:
    """(caption text stripped, note). Missing -> ("", note). Raises OSError when it exists but cannot be read."""
    try:
        if caption_path is None:
            raise FileNotFoundError
        raw = caption_path.read_bytes()
    except FileNotFoundError:
        return "", "no caption file: trained with an empty caption"
    return decode_caption(raw)


def caption_files(filenames: list[str]) -> dict[str, str]:
    """stem -> caption file name in one folder: `<stem>.txt`, or `<stem>.TXT`/`.Txt`... (cameras and Windows
    tools write upper case) when there is no lower-case one."""
    found: dict[str, str] = {}
    for name in sorted(filenames):
        stem, dot, ext = name.rpartition(".")
        if dot and ext.lower() == "txt" and (stem not in found or ext == "txt"):
            found[stem] = name
    return found


def discover_items(data_dir: Path) -> tuple[list[DataItem], list[tuple[str, str]]]:
    """Every image below data_dir (recursive, hidden folders and files ignored), sorted by relative path.

    Returns (items, skipped) where skipped holds (relpath, reason) for pairs whose caption is unreadable."""
    data_dir = Path(data_dir).resolve()
    items: list[DataItem] = []
    skipped: list[tuple[str, str]] = []
    masks_found: set[Path] = set()
    masks_used: set[Path] = set()
    for folder, dirnames, filenames in os.walk(data_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        captions = caption_files(filenames + dirnames)  # a folder named like a caption is reported unreadable
        for name in filenames:
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if masks.is_mask_file(name):  # a loss mask, not a training image
                masks_found.add(path)
                continue
            relpath = path.relative_to(data_dir).as_posix()
            mask = masks.mask_path_for(path)
            has_mask = mask.is_file()
            if has_mask:
                masks_used.add(mask)
            try:
                caption_name = captions.get(path.stem)
                caption, note = read_caption(Path(folder) / caption_name if caption_name else None)
            except OSError as exc:
                skipped.append((relpath, f"caption unreadable: {exc.strerror or exc}"))
                continue
            items.append(DataItem(path, relpath, caption, note, mask if has_mask else None))
    for orphan in sorted(masks_found - masks_used):
        skipped.append((orphan.relative_to(data_dir).as_posix(), "mask without an image of the same stem"))
    items.sort(key=lambda i: i.relpath)
    return items, skipped


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """High bit-depth grayscale (I;16*, I, F) to 8-bit RGB by scaling, not clipping (PIL's convert clips)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if array.size and np.nanmax(array) <= 1.0 else 255.0
    else:
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    eight_bit = np.clip(np.nan_to_num(array) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (CMYK print profiles, Adobe RGB...) to reach sRGB; no profile: unchanged."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain conversion below
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency composited onto white, 16-bit scaled, CMYK/palette converted."""
    mode = image.mode
    if (mode == "P" and "transparency" in image.info) or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(image)
    image = _to_srgb(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_checked(data: bytes, max_image_pixels: int) -> Image.Image:
    """Decode, refusing images over the pixel limit before their pixels are decoded."""
    # PIL's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that) follows our limit
    # while we decode; the process-wide setting is restored afterwards.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_image_pixels:
                raise ImageSkip(
                    f"refused: {width}x{height} = {width * height} px is over --max_image_pixels {max_image_pixels}"
                )
            image.load()
            return image
    except ImageSkip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkip(f"refused as a decompression bomb (over --max_image_pixels {max_image_pixels}): {exc}") from exc
    except UnidentifiedImageError:
        raise ImageSkip("not a readable image (unknown or damaged format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageSkip(f"truncated or damaged: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_oriented(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data: bytes | None = None):
    """Open, check, decode and orient (EXIF) one image file, in its own colour mode; raises ImageSkip.

    `data`: the file's bytes when the caller already read them (to hash exactly what is decoded)."""
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageSkip(f"unreadable: {exc.strerror or exc}") from exc
    if not data:
        raise ImageSkip("empty file (0 bytes)")
    image = _open_checked(data, max_image_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
        pass
    return image


def as_rgb(image: Image.Image) -> Image.Image:
    """`to_rgb`, with a failure reported as ImageSkip."""
    try:
        return to_rgb(image)
    except Exception as exc:  # noqa: BLE001
        raise ImageSkip(f"colour mode {image.mode} could not be converted: {exc}") from exc


def load_image(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data: bytes | None = None) -> Image.Image:
    """Open, check, decode, orient (EXIF) and convert one image to RGB; raises ImageSkip with the reason.

    `data`: the file's bytes when the caller already read them (to hash exactly what is decoded)."""
    return as_rgb(load_oriented(path, max_image_pixels, data))


def render_to_bucket(image: Image.Image, plan: ItemPlan) -> Image.Image:
    """The bucket-sized training image by plain resampling: the kept region, scaled in one LANCZOS pass
    (the same pixels as a cover resize then centre crop, without resampling the discarded part)."""
    return image.resize(plan.bucket_wh, Image.Resampling.LANCZOS, box=plan.source_box, reducing_gap=3.0)


def upscale_region_box(size_wh: tuple[int, int], plan: ItemPlan) -> tuple[int, int, int, int]:
    """The source box that the crop keeps, in whole pixels (what the upscaler sees)."""
    x0, y0, x1, y1 = plan.source_box
    return max(0, round(x0)), max(0, round(y0)), min(size_wh[0], round(x1)), min(size_wh[1], round(y1))


def region_to_upscale(image: Image.Image, plan: ItemPlan) -> Image.Image:
    """The part of the source that the crop keeps (whole pixels), which is all the upscaler needs to see."""
    return image.crop(upscale_region_box(image.size, plan))
