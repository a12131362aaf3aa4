"""Generate sample_dataset/: ~30 synthetic image/caption pairs that exercise the caching pipeline.

Everything is drawn here (gradients, shapes), so the folder holds no third-party images and stays small.
It covers aspect ratios 1:3 to 3:1, sizes below --min_resolution 256 and above --max_resolution 1024,
transparency (RGBA, palette with a transparent index, grayscale+alpha), CMYK, EXIF rotation, WebP, 16-bit
PNGs, BMP, TIFF, sub-folders, a file name with spaces, '#' and non-ASCII letters, an image without a
caption, a caption in Windows-1252 (not UTF-8) and a caption longer than 77 tokens. Deterministic.

    python scripts/make_sample_dataset.py --output sample_dataset
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "orange", "purple", "teal", "yellow", "pink", "brown", "grey"]
SHAPES = ["circle", "square", "triangle", "ring", "stripe"]


def drawing(width: int, height: int, seed: int) -> tuple[Image.Image, str]:
    """A gradient background with a few flat shapes (compresses well) and a caption describing it."""
    rng = random.Random(seed)
    c0, c1 = np.array([rng.randrange(256) for _ in range(3)]), np.array([rng.randrange(256) for _ in range(3)])
    t = np.linspace(0.0, 1.0, width)[None, :, None] * 0.6 + np.linspace(0.0, 1.0, height)[:, None, None] * 0.4
    image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    words = []
    for _ in range(rng.randint(1, 3)):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        words.append(f"a {colour} {shape}")
        x, y = rng.randrange(width), rng.randrange(height)
        r = max(4, min(width, height) // rng.randint(4, 8))
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "ring":
            draw.ellipse(box, outline=colour, width=max(2, r // 4))
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        else:
            draw.rectangle((0, y - r // 3, width, y + r // 3), fill=colour)
    return image, " and ".join(words) + f" on a gradient background, {width}x{height}"


def write_png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot save this mode)."""
    height, width, _ = array.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    )


def with_alpha(image: Image.Image, seed: int) -> Image.Image:
    """RGBA: a transparent border and a soft transparent hole."""
    w, h = image.size
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.full((h, w), 255, np.uint8)
    alpha[np.hypot(xx - w * 0.6, yy - h * 0.4) < min(w, h) * 0.2] = 0
    alpha[: h // 10] = 0
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return rgba


def make(output: Path) -> list[Path]:
    if output.exists():
        shutil.rmtree(output)
    (output / "landscapes").mkdir(parents=True)
    (output / "portraits" / "deep").mkdir(parents=True)
    (output / "formats").mkdir()
    written: list[Path] = []

    def save(rel: str, image: Image.Image, caption: str | None, **kwargs) -> None:
        path = output / rel
        image.save(path, **kwargs)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(path)

    # Aspect ratios 1:3 ... 3:1 at modest sizes (fast on CPU), JPEG/PNG.
    plain = [
        ("landscapes/wide_3x1.jpg", 768, 256),
        ("landscapes/wide_5x2.jpg", 640, 256),
        ("landscapes/wide_2x1.png", 512, 256),
        ("landscapes/wide_16x9.jpg", 480, 270),
        ("landscapes/wide_4x3.jpg", 400, 300),
        ("landscapes/wide_3x2.png", 384, 256),
        ("square_300.png", 300, 300),
        ("square_512.jpg", 512, 512),
        ("portraits/tall_3x4.jpg", 300, 400),
        ("portraits/tall_2x3.png", 256, 384),
        ("portraits/tall_1x2.jpg", 256, 512),
        ("portraits/deep/tall_2x5.jpg", 256, 640),
        ("portraits/deep/tall_1x3.jpg", 256, 768),
        ("odd_size_301x277.png", 301, 277),
        ("odd_size_700x490.jpg", 700, 490),
    ]
    for i, (rel, w, h) in enumerate(plain):
        image, caption = drawing(w, h, seed=i)
        save(rel, image, caption, **({"quality": 85} if rel.endswith(".jpg") else {"optimize": True}))

    # Below --min_resolution 256 (skipped as too small) and above --max_resolution 1024 (downscaled).
    image, caption = drawing(200, 150, seed=100)
    save("too_small_200x150.png", image, caption)
    image, caption = drawing(1400, 1100, seed=101)
    save("large_1400x1100.jpg", image, caption, quality=80)

    # Colour modes and containers.
    image, caption = drawing(320, 320, seed=200)
    save("formats/rgba_transparent.png", with_alpha(image, 200), "transparent: " + caption)
    palette = drawing(320, 288, seed=201)[0].quantize(colors=16)
    palette.putpixel((0, 0), 0)
    ImageDraw.Draw(palette).rectangle((0, 0, 319, 40), fill=0)
    save("formats/palette_transparent.png", palette, "palette with a transparent band", transparency=0)
    gray = drawing(288, 288, seed=202)[0].convert("L")
    la = Image.merge("LA", (gray, with_alpha(gray.convert("RGB"), 202).getchannel("A")))
    save("formats/gray_alpha.png", la, "grayscale with alpha")
    save("formats/gray.png", gray, "plain grayscale")
    image, caption = drawing(320, 256, seed=203)
    save("formats/cmyk.jpg", image.convert("CMYK"), "cmyk: " + caption, quality=85)
    image, caption = drawing(256, 384, seed=204)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display; the stored pixels are landscape
    save("formats/exif_rotated.jpg", image.transpose(Image.Transpose.ROTATE_90), caption + ", shown upright", exif=exif)
    image, caption = drawing(384, 288, seed=205)
    save("formats/webp_image.webp", image, "webp: " + caption, quality=80)
    image, caption = drawing(288, 384, seed=206)
    save("formats/bmp_image.bmp", image, None)
    (output / "formats/bmp_image.txt").write_bytes(("bmp, caption in Windows-1252: café, " + caption).encode("cp1252"))
    image, caption = drawing(320, 320, seed=207)
    save("formats/tiff_image.tiff", image, "tiff: " + caption, compression="tiff_deflate")
    ramp = (np.linspace(0, 65535, 320)[None, :] * np.linspace(0.2, 1.0, 256)[:, None]).astype(np.uint16)
    save("formats/gray16.png", Image.fromarray(ramp), "a 16-bit grayscale ramp")
    rgb16 = np.stack([ramp, ramp[::-1], np.full_like(ramp, 30000)], axis=-1)
    write_png16_rgb(output / "formats/rgb16.png", rgb16)
    (output / "formats/rgb16.txt").write_text("a 16-bit colour ramp\n", encoding="utf-8")
    written.append(output / "formats/rgb16.png")

    # Names and captions that broke the seed: spaces, '#', non-ASCII; no caption; > 77 tokens.
    image, caption = drawing(352, 288, seed=300)
    save("Jock - LOSERS #8 café ñandú.jpg", image, caption, quality=85)
    image, _ = drawing(288, 352, seed=301)
    save("no_caption.png", image, None)
    image, caption = drawing(320, 384, seed=302)
    long_caption = (caption + ". ") + " ".join(
        f"detail number {n} shows a {COLOURS[n % 10]} {SHAPES[n % 5]} beside another shape" for n in range(14)
    )
    save("long_caption.jpg", image, long_caption, quality=85)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="sample_dataset", help="folder to (re)create")
    args = parser.parse_args(argv)
    written = make(Path(args.output))
    total = sum(p.stat().st_size for p in Path(args.output).rglob("*") if p.is_file())
    print(f"wrote {len(written)} images to {args.output} ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
