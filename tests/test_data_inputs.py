"""Inputs read correctly (issue 16): captions in UTF-16 or with an upper-case .TXT, extreme aspect ratios skipped
with a reason, caching from a single file whose config folder says float16 on a CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sdxl_trainer.data.buckets import MAX_SOURCE_ASPECT, extreme_aspect
from sdxl_trainer.data.images import decode_caption, discover_items


@pytest.mark.parametrize(
    ("raw", "note"),
    [
        ("un café ñandú".encode("utf-16"), None),  # Notepad's "Unicode": a BOM, little-endian
        ("un café ñandú".encode("utf-16-be"), "UTF-16-BE without a byte-order mark"),
        ("un café ñandú".encode("utf-16-le"), "UTF-16-LE without a byte-order mark"),
        ("un café ñandú".encode("utf-8-sig"), None),
        ("un café ñandú".encode("utf-32"), None),
        ("un café ñandú".encode(), None),
    ],
)
def test_captions_are_decoded_by_their_byte_order_mark_or_their_nuls(raw, note):
    text, got_note = decode_caption(raw)
    assert text == "un café ñandú" and "\x00" not in text
    assert got_note == note or (note and note in (got_note or ""))


def test_windows_1252_is_still_the_noted_fallback():
    assert decode_caption("café".encode("cp1252")) == ("café", "caption is not UTF-8: read as Windows-1252")


def test_upper_case_txt_and_utf16_captions_are_found_and_read(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "IMG.JPG")
    (tmp_path / "IMG.TXT").write_text("an upper-case caption", encoding="utf-8")
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    (tmp_path / "photo.txt").write_bytes("a UTF-16 caption".encode("utf-16"))
    Image.new("RGB", (64, 64)).save(tmp_path / "both.png")
    (tmp_path / "both.TXT").write_text("upper", encoding="utf-8")
    (tmp_path / "both.txt").write_text("lower", encoding="utf-8")
    items, skipped = discover_items(tmp_path)
    got = {i.relpath: (i.caption, i.caption_note) for i in items}
    assert got == {
        "IMG.JPG": ("an upper-case caption", None),
        "photo.png": ("a UTF-16 caption", None),
        "both.png": ("lower", None),
    }
    assert skipped == []


def test_extreme_aspect_ratios_are_skipped_with_a_reason_and_the_bucket_range_is_not():
    assert extreme_aspect(4000, 64) and "62.5:1" in extreme_aspect(4000, 64)
    assert extreme_aspect(64, 4000)
    assert extreme_aspect(3000, 1000) is None and extreme_aspect(400, 100) is None  # 3:1 and 4:1 are cropped
    assert MAX_SOURCE_ASPECT == 4.0


def test_caching_skips_an_extreme_aspect_image_naming_the_reason(tmp_path, tiny_model_dir):
    from sdxl_trainer.caching.caching_args import CachingArgs
    from sdxl_trainer.caching.run import run_caching

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (1280, 64), (10, 20, 30)).save(data / "strip.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(data / "square.png")
    args = CachingArgs(data_dir=str(data), cache_dir=str(tmp_path / "cache"), min_resolution=64, max_resolution=128,
                       num_workers=0, pretrained_model_name_or_path=str(tiny_model_dir))  # fmt: skip
    report = run_caching(args)
    assert report["cached"] == 1
    assert [s["path"] for s in report["skipped"]] == ["strip.png"] and "20.0:1" in report["skipped"][0]["reason"]


def test_caching_from_a_single_file_with_a_float16_config_folder_works_on_cpu(tmp_path, tiny_model_dir):
    """SDXL base's config folder says torch_dtype float16; the encoders must still run in fp32 on a CPU."""
    from sdxl_trainer.caching.caching_args import CachingArgs
    from sdxl_trainer.caching.run import run_caching
    from sdxl_trainer.data import cache_reader
    from sdxl_trainer.models import single_file

    config = shutil.copytree(tiny_model_dir, tmp_path / "config")
    for part in ("text_encoder", "text_encoder_2"):  # transformers configs (torch_dtype: older name)
        path = config / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "torch_dtype": "float16", "dtype": "float16"}))
    base = single_file.save_single_file(tiny_model_dir, tmp_path / "base.safetensors", dtype="fp16")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 20, 30)).save(data / "a.png")
    (data / "a.txt").write_text("a red square", encoding="utf-8")
    args = CachingArgs(data_dir=str(data), cache_dir=str(tmp_path / "cache"), min_resolution=64, max_resolution=64,
                       num_workers=0, pretrained_model_name_or_path=str(base),
                       single_file_config=str(config))  # fmt: skip
    try:
        report = run_caching(args)
    finally:
        from sdxl_trainer.models import loading

        loading.set_single_file_config(None)
    assert report["cached"] == 1 and report["skipped"] == []
    cache = cache_reader.open_dataset_cache(Path(tmp_path / "cache" / "data"))
    assert cache.load_item_tensors(cache.items[0])["prompt_embeds"].isfinite().all()
