"""The real caching step with the real Upscaler and random-weight networks (RRDBNet, GFPGAN) on small images."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from upscale_fixtures import draw_face, esrgan_state_dict, save_weights, shared_gfpgan_file

from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.caching.run import run_caching
from sdxl_trainer.data import cache_reader
from sdxl_trainer.upscaling import model_files, upscaler


def _photo(width_px: int, height_px: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height_px, width_px, 3)) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.5)
    )


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def counted(monkeypatch):
    """Counts weights-file reads and upscale calls of the real Upscaler (nothing is replaced)."""
    # (each test writes its weights to a fresh path, so a network an earlier test loaded cannot hide a load here)
    counts = {"reads": [], "upscales": []}
    real_read, real_upscale = model_files.read_state_dict, upscaler.Upscaler.upscale
    monkeypatch.setattr(
        model_files, "read_state_dict", lambda path: counts["reads"].append(path.name) or real_read(path)
    )

    def spy(self, image, size_wh):
        counts["upscales"].append((image.size, tuple(size_wh)))
        return real_upscale(self, image, size_wh)

    monkeypatch.setattr(upscaler.Upscaler, "upscale", spy)
    return counts


@pytest.mark.slow
def test_caching_with_the_real_upscaler(tmp_path, tiny_model_dir, counted):
    data = tmp_path / "data"
    data.mkdir()
    _photo(100, 100, 1).save(data / "small.png")  # category 128 < 192: upscaled x1.92 into 192x192
    _photo(64, 96, 2).save(data / "tall.png")  # upscaled into a 2:3 bucket
    _photo(300, 75, 3).save(data / "wide.png")  # 4:1: only the half the crop keeps is upscaled
    _photo(180, 180, 4).save(data / "almost.png")  # x1.07 < --upscale_min_factor: plain resampling
    (data / "small.txt").write_text("a small picture", encoding="utf-8")
    before = _snapshot(data)
    weights = save_weights(esrgan_state_dict(num_blocks=1, num_filters=16, basicsr_keys=False), tmp_path / "x4.pth")
    samples = tmp_path / "samples"
    args = CachingArgs(
        data_dir=str(data),
        cache_dir=str(tmp_path / "cache"),
        pretrained_model_name_or_path=str(tiny_model_dir),
        basename="ds",
        min_resolution=64,
        max_resolution=256,
        upscale_to_resolution=192,
        upscaler_model=str(weights),
        save_upscale_samples=str(samples),
        num_workers=0,
    )
    report = run_caching(args)  # no factory: the real sdxl_trainer.upscaling.upscaler.Upscaler

    assert report["cached"] == 4
    assert counted["reads"] == ["x4.pth"]  # the network was loaded once for the whole folder
    assert sorted(src for src, _ in counted["upscales"]) == [(64, 96), (100, 100), (150, 75)]
    assert _snapshot(data) == before  # nothing written into (or touched in) the dataset folder

    items = {i.image_relpath: i for i in cache_reader.open_dataset_cache(tmp_path / "cache" / "ds").items}
    for name, true_hw in [("small.png", (100, 100)), ("tall.png", (96, 64)), ("wide.png", (75, 300))]:
        item = items[name]
        assert item.upscaled and item.original_size_hw == true_hw  # SDXL sees the pre-upscale size
        assert item.target_size_hw == (item.bucket_wh[1], item.bucket_wh[0])
    assert not items["almost.png"].upscaled and items["almost.png"].original_size_hw == (192, 192)

    # before/after pairs in the folder we chose, and the "after" is the upscaler's output
    assert sorted(p.name for p in samples.iterdir()) == [
        f"{stem}.png_{kind}.jpg" for stem in ("small", "tall", "wide") for kind in ("org", "upscaled")
    ]
    before_small = Image.open(samples / "small.png_org.jpg")
    after_small = Image.open(samples / "small.png_upscaled.jpg")
    assert before_small.size == (100, 100) and after_small.size == items["small.png"].bucket_wh
    expected = upscaler.Upscaler(str(weights)).upscale(Image.open(data / "small.png"), after_small.size)
    jpeg_error = np.abs(np.asarray(after_small, dtype=float) - np.asarray(expected, dtype=float)).mean()
    plain_error = np.abs(
        np.asarray(after_small, dtype=float)
        - np.asarray(Image.open(data / "small.png").resize(after_small.size, Image.Resampling.LANCZOS), dtype=float)
    ).mean()
    assert jpeg_error < 4 < plain_error  # the random network's look, not plain resampling


@pytest.mark.slow
def test_caching_with_gfpgan_faces(tmp_path, tmp_path_factory, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    draw_face(128).save(data / "face.png")
    before = _snapshot(data)
    weights = save_weights(esrgan_state_dict(num_blocks=1, num_filters=16, basicsr_keys=False), tmp_path / "x4.pth")
    gfpgan = shared_gfpgan_file(tmp_path_factory.getbasetemp())
    args = CachingArgs(
        data_dir=str(data),
        cache_dir=str(tmp_path / "cache"),
        pretrained_model_name_or_path=str(tiny_model_dir),
        basename="ds",
        min_resolution=64,
        max_resolution=256,
        upscale_to_resolution=256,
        upscaler_model=str(weights),
        face_restore_model=str(gfpgan),
        upscale_use_GFPGAN=True,
        save_upscale_samples=str(tmp_path / "samples"),
        num_workers=0,
    )
    run_caching(args)
    assert _snapshot(data) == before
    item = cache_reader.open_dataset_cache(tmp_path / "cache" / "ds").items[0]
    assert item.upscaled and item.original_size_hw == (128, 128) and item.bucket_wh == (256, 256)
    # the face in the cached "after" sample differs from the same upscale without GFPGAN
    after = np.asarray(Image.open(tmp_path / "samples" / "face.png_upscaled.jpg"), dtype=float)
    no_faces = upscaler.Upscaler(str(weights)).upscale(draw_face(128), (256, 256))
    face_diff = np.abs(after - np.asarray(no_faces, dtype=float))[90:170, 90:170].mean()
    assert face_diff > 10
    assert torch.is_tensor(
        cache_reader.open_dataset_cache(tmp_path / "cache" / "ds").load_item_tensors(item)["latent_mean"]
    )
