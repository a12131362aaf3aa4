"""Discovery and image loading: every bad or unusual input is converted or skipped with a reason."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_trainer.data.buckets import plan_item
from sdxl_trainer.data.images import ImageSkip, discover_items, load_image, region_to_upscale, render_to_bucket

RED = (220, 30, 30)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height whose pixels are all zero: tiny on disk, huge decoded (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_discovery_is_recursive_sorted_and_reads_captions(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.tiff", "sub/e.bmp", "f.jpeg", "g.tif", ".hidden/x.png"]:
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format={"jpg": "JPEG", "tif": "TIFF"}.get(rel[-3:].lower()))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "b.txt").write_text("  a caption \n", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes("\ufeffwith a BOM".encode())
    (tmp_path / "sub" / "c.txt").write_bytes("caf\xe9 cr\xe8me".encode("cp1252"))
    items, skipped = discover_items(tmp_path)
    assert [i.relpath for i in items] == [
        "a.JPG", "b.png", "f.jpeg", "g.tif", "sub/c.webp", "sub/deeper/d.tiff", "sub/e.bmp"
    ]  # fmt: skip
    by = {i.relpath: i for i in items}
    assert by["b.png"].caption == "a caption" and by["b.png"].caption_note is None
    assert by["a.JPG"].caption == "with a BOM"
    assert by["sub/c.webp"].caption == "café crème" and "not UTF-8" in by["sub/c.webp"].caption_note
    assert by["f.jpeg"].caption == "" and "no caption" in by["f.jpeg"].caption_note
    assert all(i.image_path.is_absolute() for i in items) and skipped == []


def test_unreadable_caption_skips_the_pair_with_a_reason(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").mkdir()  # a folder where the caption should be: reading it fails
    items, skipped = discover_items(tmp_path)
    assert items == [] and skipped[0][0] == "x.png" and "caption unreadable" in skipped[0][1]


def _roundtrip(image: Image.Image, tmp_path: Path, name: str, **save) -> Image.Image:
    path = tmp_path / name
    image.save(path, **save)
    return load_image(path)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (*RED, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    out = _roundtrip(rgba, tmp_path, "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((1, 0))) and out.getpixel((5, 5)) == RED

    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.putpixel((0, 0), 0)
    out = _roundtrip(palette, tmp_path, "p.png", transparency=0)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 3)) == RED

    la = Image.merge("LA", (Image.new("L", (16, 16), 40), Image.new("L", (16, 16), 255)))
    la.putpixel((0, 0), (40, 0))
    out = _roundtrip(la, tmp_path, "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 3)) == (40, 40, 40)


def test_other_modes_convert_to_the_right_rgb(tmp_path):
    base = Image.new("RGB", (32, 32), RED)
    out = _roundtrip(base.convert("CMYK"), tmp_path, "c.jpg", quality=95)
    assert np.abs(np.asarray(out, int) - RED).max() <= 6  # not inverted, not shifted

    ramp = np.tile(np.array([0, 32768, 65535], dtype=np.uint16), (4, 1))
    out = _roundtrip(Image.fromarray(ramp), tmp_path, "g16.png")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]  # scaled, not clipped to white

    out = _roundtrip(Image.new("L", (8, 8), 77), tmp_path, "g.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)
    out = _roundtrip(Image.new("1", (8, 8), 1), tmp_path, "b.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    out = _roundtrip(base, tmp_path, "w.webp", lossless=True)
    assert out.getpixel((0, 0)) == RED
    out = _roundtrip(Image.fromarray(np.full((8, 8), 0.5, np.float32), "F"), tmp_path, "f.tiff")
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_sixteen_bit_rgb_png_from_the_sample_dataset(repo_root):
    out = load_image(repo_root / "sample_dataset" / "formats" / "rgb16.png")
    assert out.mode == "RGB" and out.getpixel((0, 0))[2] == 117  # 30000 / 65535 * 255


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (20, 40), (0, 0, 255))
    upright.paste(RED, (0, 0, 20, 5))  # a red band at the top when shown upright
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers rotate 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    out = _roundtrip(stored, tmp_path, "r.jpg", exif=exif, quality=95)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[1, 10], np.asarray(out)[38, 10]
    assert top[0] > 180 and bottom[2] > 180


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a readable image"),
    ],
)
def test_empty_and_garbage_files_are_skipped(tmp_path, content, reason):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ImageSkip, match=reason):
        load_image(path)


def test_truncated_files_are_skipped(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageSkip, match="truncated or damaged"):
        load_image(tmp_path / "t.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buffer, "PNG")
    (tmp_path / "t.png").write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ImageSkip):
        load_image(tmp_path / "t.png")


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 30000, 30000)  # 900 Mpx, a few hundred KB on disk
    assert bomb.stat().st_size < 2_000_000
    started = time.perf_counter()
    with pytest.raises(ImageSkip, match="refused"):
        load_image(bomb)
    assert time.perf_counter() - started < 2.0
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(ImageSkip, match="max_image_pixels 5000"):
        load_image(small, max_image_pixels=5000)
    assert load_image(small, max_image_pixels=10000).size == (100, 100)


def test_rendered_bucket_has_no_black_border_where_the_seed_had_one():
    image = Image.new("RGB", (1100, 1681), RED)
    plan = plan_item(1100, 1681, 512, 1536)  # the seed made 1088x1663 and padded a black row
    out = np.asarray(render_to_bucket(image, plan))
    assert out.shape == (1664, 1088, 3)
    assert np.abs(out.astype(int) - RED).max() <= 1


def test_rendered_bucket_is_the_centre_crop():
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255  # white middle third
    plan = plan_item(300, 100, 64, 128)  # category 128 wants <= 2:1: the sides are cropped
    out = np.asarray(render_to_bucket(Image.fromarray(array), plan)).astype(int)
    bw = plan.bucket_wh[0]
    assert out[:, bw // 2].min() > 200  # the centre stays
    region = region_to_upscale(Image.fromarray(array), plan)
    assert abs(region.width / region.height - plan.bucket_wh[0] / plan.bucket_wh[1]) < 0.05
