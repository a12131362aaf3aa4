"""The caching step end to end on the tiny model: correct tensors, reuse, staleness, resume, shards, upscaling."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_trainer.caching.caching_args import CachingArgs, CachingArgsError
from sdxl_trainer.caching.run import run_caching
from sdxl_trainer.data import cache_format, cache_reader
from sdxl_trainer.models import loading

GOOD = {  # relpath: (width, height, caption or None)
    "solid.png": (128, 128, "a flat orange square"),
    "wide.jpg": (200, 100, "a wide gradient"),
    "sub/tall c#é.png": (96, 160, "a tall café"),
    "sub/deep/no caption.webp": (120, 90, None),
    "big.png": (300, 260, "larger than max"),
}
BAD = {
    "zero.png": "empty file",
    "broken.jpg": "truncated",
    "tiny.png": "too small",
    "garbage.png": "not a readable",
    "dangling.png": "unreadable",
}


def _gradient(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = np.linspace(0, 1, width)[None, :, None] * 0.7 + np.linspace(0, 1, height)[:, None, None] * 0.3
    return Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))


def make_data(folder: Path) -> Path:
    for i, (rel, (w, h, caption)) in enumerate(GOOD.items()):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (w, h), (240, 140, 20)) if rel == "solid.png" else _gradient(w, h, i)
        image.save(path, quality=95) if rel.endswith(".jpg") else image.save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    (folder / "zero.png").write_bytes(b"")
    _gradient(100, 100, 9).save(folder / "full.jpg")
    (folder / "broken.jpg").write_bytes((folder / "full.jpg").read_bytes()[:300])
    (folder / "full.jpg").unlink()
    _gradient(40, 40, 10).save(folder / "tiny.png")
    (folder / "garbage.png").write_bytes(b"not a png")
    (folder / "dangling.png").symlink_to(folder / "gone.png")  # a broken symlink
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below folder (files with size, mtime and bytes; links and folders by name)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else (0, 0, b"")
    return out


def item_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "items").rglob("*.safetensors"))}


def make_args(data: Path, cache: Path, model: Path, **kw) -> CachingArgs:
    kw = {"min_resolution": 64, "max_resolution": 128, "num_workers": 0, "basename": "ds", **kw}
    return CachingArgs(data_dir=str(data), cache_dir=str(cache), pretrained_model_name_or_path=str(model), **kw)


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if any model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_vae", refuse)
    monkeypatch.setattr(loading, "load_text_encoders", refuse)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir):
    """One full run over a data folder with good and bad files (the data folder is checked to stay untouched)."""
    base = tmp_path_factory.mktemp("baseline")
    data = make_data(base / "data")
    before = snapshot(data)
    report = run_caching(make_args(data, base / "cache", tiny_model_dir))
    assert snapshot(data) == before, "the data folder was written to"
    return {"data": data, "cache": base / "cache", "root": base / "cache" / "ds", "report": report}


def copy_baseline(baseline, tmp_path: Path) -> tuple[Path, Path]:
    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(baseline["data"], data, symlinks=True)  # copy2: mtimes kept
    shutil.copytree(baseline["cache"], cache)
    return data, cache


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"max_resolution": 64, "min_resolution": 128}, "--max_resolution"),
        ({"min_resolution": 100}, "--min_resolution"),
        ({"max_resolution": 1000}, "--max_resolution"),
        ({"upscale_to_resolution": 128}, "--upscaler_model"),
        ({"upscale_to_resolution": 96, "upscaler_model": "x"}, "--upscale_to_resolution"),
        ({"upscale_use_GFPGAN": True}, "--face_restore_model"),
        ({"upscaler_model": "/nonexistent.pth"}, "--upscaler_model"),
        ({"num_shards": 2, "shard_index": 2}, "--shard_index"),
        ({"batch_size": 0}, "--batch_size"),
        ({"cache_dtype": "int8"}, "--cache_dtype"),
    ],
)
def test_bad_flags_fail_at_start_naming_the_flag(tmp_path, overrides, flag):
    (tmp_path / "data").mkdir()
    with pytest.raises(CachingArgsError, match=flag):
        make_args(tmp_path / "data", tmp_path / "cache", tmp_path / "model", **overrides).validate()


def test_missing_data_folder_and_cache_inside_data_are_refused(tmp_path, capsys):
    import sdxl_process_data_dir

    with pytest.raises(SystemExit) as exit_info:
        sdxl_process_data_dir.main(["--data_dir", str(tmp_path / "nope"), "--cache_dir", str(tmp_path / "c")])
    assert exit_info.value.code == 2 and "--data_dir" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    with pytest.raises(CachingArgsError, match="--cache_dir"):
        make_args(tmp_path / "data", tmp_path / "data" / "cache", tmp_path).validate()
    with pytest.raises(CachingArgsError, match="--basename"):  # <cache_dir>/<basename> == the data folder
        CachingArgs(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path)).validate()
    with pytest.raises(CachingArgsError, match="--save_upscale_samples"):
        make_args(tmp_path / "data", tmp_path / "c", tmp_path, save_upscale_samples=str(tmp_path / "data")).validate()


def test_missing_model_is_a_clear_error(tmp_path):
    from sdxl_trainer.caching.run import CachingError

    data = make_data(tmp_path / "data")
    with pytest.raises(CachingArgsError, match="--pretrained_model_name_or_path"):
        run_caching(make_args(data, tmp_path / "cache", tmp_path / "no_model"))
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(CachingError, match="--pretrained_model_name_or_path"):
        run_caching(make_args(data, tmp_path / "cache", tmp_path / "empty_model"))


def test_report_lists_buckets_and_every_skipped_file(baseline):
    report = json.loads((baseline["root"] / "report.json").read_text())
    assert report["cached"] == len(GOOD)
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(BAD)
    for path, reason in BAD.items():
        assert reason in reasons[path]
    assert sum(report["buckets"].values()) == len(GOOD)
    assert {"no caption" in n["note"] for n in report["notes"]} == {True}
    assert [n["path"] for n in report["notes"]] == ["sub/deep/no caption.webp"]


def test_cached_tensors_match_the_reference_encoders(baseline, tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    ds = cache_reader.open_dataset_cache(baseline["root"])
    assert [i.image_relpath for i in ds.items] == sorted(GOOD, key=cache_format.item_key)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    by_path = {i.image_relpath: i for i in ds.items}
    for rel, (_, _, caption) in GOOD.items():
        item = by_path[rel]
        tensors = ds.load_item_tensors(item)
        bw, bh = item.bucket_wh
        assert tensors["latent_mean"].shape == (4, bh // 8, bw // 8) == tensors["latent_std"].shape
        assert tensors["latent_mean"].dtype == torch.float16
        with torch.no_grad():
            prompt, _, pooled, _ = pipe.encode_prompt(caption or "", do_classifier_free_guidance=False)
        torch.testing.assert_close(tensors["prompt_embeds"].float(), prompt[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(tensors["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=2e-3)
        assert item.caption == (caption or "")
        assert min(item.crop_top_left) >= 0 and item.target_size_hw == (bh, bw)
    empty = ds.load_empty_embeddings()
    with torch.no_grad():
        prompt, _, pooled, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
    torch.testing.assert_close(empty["prompt_embeds"].float(), prompt[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(empty["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=2e-3)
    # The solid 128x128 image fills its bucket exactly: its latents are the VAE posterior of that image.
    solid = by_path["solid.png"]
    assert solid.bucket_wh == (128, 128) and solid.time_ids == (128, 128, 0, 0, 128, 128)
    pixels = torch.tensor([240, 140, 20], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 128, 128) / 127.5 - 1
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    sf = pipe.vae.config.scaling_factor
    tensors = ds.load_item_tensors(solid)
    torch.testing.assert_close(tensors["latent_mean"].float(), posterior.mean[0] * sf, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(tensors["latent_std"].float(), posterior.std[0] * sf, atol=1e-4, rtol=2e-3)
    big = by_path["big.png"]  # 300x260 is above --max_resolution 128: downscaled, native-quality conditioning
    assert big.original_size_hw == big.target_size_hw and not big.upscaled


def test_second_run_does_no_work_and_loads_no_model(baseline, tmp_path, no_models, tiny_model_dir):
    data, cache = copy_baseline(baseline, tmp_path)
    before = item_files(cache / "ds")
    moved_model = tmp_path / "moved_model"
    shutil.copytree(tiny_model_dir, moved_model)  # models are identified by content, not by path
    report = run_caching(make_args(data, cache, moved_model))
    assert report["encoded"] == 0 and report["reused"] == len(GOOD)
    assert item_files(cache / "ds") == before
    assert len(cache_reader.open_dataset_cache(cache / "ds").items) == len(GOOD)


def test_moved_cache_and_copied_data_are_reused(baseline, tmp_path, no_models, tiny_model_dir):
    data = tmp_path / "elsewhere" / "data"
    shutil.copytree(baseline["data"], data, symlinks=True, copy_function=shutil.copy)  # new mtimes: hashes decide
    cache = tmp_path / "moved_cache"
    shutil.copytree(baseline["cache"], cache)
    report = run_caching(make_args(data, cache, tiny_model_dir))
    assert report["encoded"] == 0 and report["reused"] == len(GOOD)
    ds = cache_reader.open_dataset_cache(cache / "ds")
    ds.load_item_tensors(ds.items[0])


def test_edited_caption_reencodes_only_the_text(baseline, tmp_path, tiny_model_dir, monkeypatch):
    data, cache = copy_baseline(baseline, tmp_path)
    (data / "wide.txt").write_text("an edited caption", encoding="utf-8")
    monkeypatch.setattr(loading, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded"))
    report = run_caching(make_args(data, cache, tiny_model_dir))
    assert report["encoded"] == 1
    old_ds, new_ds = cache_reader.open_dataset_cache(baseline["root"]), cache_reader.open_dataset_cache(cache / "ds")
    old = {i.image_relpath: i for i in old_ds.items}["wide.jpg"]
    new = {i.image_relpath: i for i in new_ds.items}["wide.jpg"]
    assert new.caption == "an edited caption" and new.caption_sha256 != old.caption_sha256
    a, b = old_ds.load_item_tensors(old), new_ds.load_item_tensors(new)
    assert torch.equal(a["latent_mean"], b["latent_mean"]) and not torch.equal(a["prompt_embeds"], b["prompt_embeds"])


def test_edited_image_is_reencoded_and_a_touched_file_is_not(baseline, tmp_path, tiny_model_dir):
    data, cache = copy_baseline(baseline, tmp_path)
    _gradient(200, 100, 99).save(data / "wide.jpg", quality=95)
    os.utime(data / "solid.png")  # new mtime, same bytes
    monkeypatch_free = run_caching(make_args(data, cache, tiny_model_dir))
    assert monkeypatch_free["encoded"] == 1 and monkeypatch_free["reused"] == len(GOOD) - 1
    old_ds, new_ds = cache_reader.open_dataset_cache(baseline["root"]), cache_reader.open_dataset_cache(cache / "ds")
    old = {i.image_relpath: i for i in old_ds.items}
    new = {i.image_relpath: i for i in new_ds.items}
    assert new["wide.jpg"].image_sha256 != old["wide.jpg"].image_sha256
    a, b = old_ds.load_item_tensors(old["wide.jpg"]), new_ds.load_item_tensors(new["wide.jpg"])
    assert not torch.equal(a["latent_mean"], b["latent_mean"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])


def test_changed_setting_recomputes_the_latents_it_affects(baseline, tmp_path, tiny_model_dir, monkeypatch):
    data, cache = copy_baseline(baseline, tmp_path)
    monkeypatch.setattr(loading, "load_text_encoders", lambda *a, **k: pytest.fail("text encoders were loaded"))
    report = run_caching(make_args(data, cache, tiny_model_dir, max_resolution=192))
    assert report["encoded"] == len(GOOD)
    ds = cache_reader.open_dataset_cache(cache / "ds")
    assert ds.fingerprint["image"]["max_resolution"] == 192
    big = {i.image_relpath: i for i in ds.items}["big.png"]
    assert big.bucket_wh[0] * big.bucket_wh[1] > 128 * 128


def test_deleted_image_leaves_the_index(baseline, tmp_path, no_models, tiny_model_dir):
    data, cache = copy_baseline(baseline, tmp_path)
    (data / "wide.jpg").unlink()
    report = run_caching(make_args(data, cache, tiny_model_dir))
    assert report["cached"] == len(GOOD) - 1
    assert "wide.jpg" not in {i.image_relpath for i in cache_reader.open_dataset_cache(cache / "ds").items}


def test_killed_run_resumes_and_completes_identically(baseline, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    shutil.copytree(baseline["data"], data, symlinks=True)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        run_caching(make_args(data, cache, tiny_model_dir), stop_after=2)
    with pytest.raises(cache_format.CacheError, match="did not finish|not a dataset cache"):
        cache_reader.open_dataset_cache(cache / "ds")
    written = item_files(cache / "ds")
    assert len(written) == 2
    (cache / "ds" / "items" / "00").mkdir(parents=True, exist_ok=True)
    (cache / "ds" / "items" / "00" / ".half-written.safetensors.tmp").write_bytes(b"\x00" * 7)  # a kill mid-write
    report = run_caching(make_args(data, cache, tiny_model_dir))
    assert report["reused"] == 2 and report["encoded"] == len(GOOD) - 2
    assert item_files(cache / "ds") == item_files(baseline["root"])


def test_shards_form_one_cache_equal_to_the_single_run(baseline, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    shutil.copytree(baseline["data"], data, symlinks=True)
    cache = tmp_path / "cache"
    first = run_caching(make_args(data, cache, tiny_model_dir, num_shards=2, shard_index=1))
    with pytest.raises(cache_format.CacheError, match=r"--shard_index \[0\]"):
        cache_reader.open_dataset_cache(cache / "ds")
    second = run_caching(make_args(data, cache, tiny_model_dir, num_shards=2, shard_index=0))
    assert first["cached"] > 0 and second["cached"] > 0 and first["cached"] + second["cached"] == len(GOOD)
    assert item_files(cache / "ds") == item_files(baseline["root"])
    ds = cache_reader.open_dataset_cache(cache / "ds")
    assert [i.key for i in ds.items] == [i.key for i in cache_reader.open_dataset_cache(baseline["root"]).items]
    report = json.loads((cache / "ds" / "report.json").read_text())
    assert report["cached"] == len(GOOD) and len(report["skipped"]) == len(BAD) and report["shards"] == 2


class FakeUpscaler:
    """Stands in for sdxl_trainer.upscaling.upscaler.Upscaler: records calls, returns a recognisable image."""

    def __init__(self):
        self.calls: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def upscale(self, image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
        self.calls.append((image.size, size_wh))
        return Image.new("RGB", size_wh, (0, 255, 0))


def test_upscale_branch_goes_through_the_seam(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    _gradient(100, 100, 1).save(data / "small.png")  # category 128 < upscale_to 192: x1.92, upscaled
    _gradient(300, 75, 2).save(data / "wide.png")  # 4:1 -> 2:1 bucket: only the kept half is upscaled
    _gradient(180, 180, 3).save(data / "almost.png")  # x1.07 < --upscale_min_factor: plain resampling
    before = snapshot(data)
    weights = tmp_path / "fake_x4.pth"
    weights.write_bytes(b"fake weights")
    fake = FakeUpscaler()
    samples = tmp_path / "samples"
    args = make_args(data, tmp_path / "cache", tiny_model_dir, max_resolution=256, upscale_to_resolution=192,
                     upscaler_model=str(weights), save_upscale_samples=str(samples))  # fmt: skip
    report = run_caching(args, upscaler_factory=lambda a, device: fake)
    assert snapshot(data) == before
    assert report["cached"] == 3 and report["buckets"]
    items = {i.image_relpath: i for i in cache_reader.open_dataset_cache(tmp_path / "cache" / "ds").items}
    assert items["small.png"].upscaled and items["small.png"].original_size_hw == (100, 100)
    assert items["small.png"].bucket_wh == (192, 192)
    assert items["wide.png"].upscaled and items["wide.png"].bucket_wh == (256, 128)
    assert items["wide.png"].time_ids == (75, 300, 0, 128, 128, 256)  # true size; crop in the resized frame
    assert not items["almost.png"].upscaled and items["almost.png"].original_size_hw == (192, 192)
    sources = sorted(call[0] for call in fake.calls)
    assert sources == [(100, 100), (150, 75)]  # the wide image's discarded half never reached the upscaler
    assert sorted(p.name for p in samples.iterdir()) == [
        "small.png_org.jpg", "small.png_upscaled.jpg", "wide.png_org.jpg", "wide.png_upscaled.jpg"
    ]  # fmt: skip
    # A different upscaler file is a different setting: the upscaled items are recomputed.
    weights.write_bytes(b"other fake weights")
    report = run_caching(args, upscaler_factory=lambda a, device: fake)
    assert report["encoded"] == 3


def _assert_caches_close(a_root: Path, b_root: Path, atol: float) -> None:
    a, b = cache_reader.open_dataset_cache(a_root), cache_reader.open_dataset_cache(b_root)
    assert [(i.key, i.bucket_wh, i.time_ids, i.caption) for i in a.items] == [
        (i.key, i.bucket_wh, i.time_ids, i.caption) for i in b.items
    ]
    for x, y in zip(a.items, b.items, strict=True):
        tx, ty = a.load_item_tensors(x), b.load_item_tensors(y)
        for name in cache_format.ITEM_TENSORS:
            torch.testing.assert_close(tx[name].float(), ty[name].float(), atol=atol, rtol=atol, msg=name)


def test_batched_encoding_matches_one_by_one(baseline, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    shutil.copytree(baseline["data"], data, symlinks=True)
    report = run_caching(make_args(data, tmp_path / "cache", tiny_model_dir, batch_size=4), batch_on_cpu=True)
    assert max(report["buckets"].values()) >= 2  # at least one batch holds several images
    _assert_caches_close(tmp_path / "cache" / "ds", baseline["root"], atol=2e-3)
    # Caption-only updates are batched too.
    for rel in ("solid.png", "big.png", "wide.jpg"):
        (data / rel).with_suffix(".txt").write_text(f"new caption for {rel}", encoding="utf-8")
    report = run_caching(make_args(data, tmp_path / "cache", tiny_model_dir, batch_size=4), batch_on_cpu=True)
    assert report["encoded"] == 3
    items = {i.image_relpath: i for i in cache_reader.open_dataset_cache(tmp_path / "cache" / "ds").items}
    assert items["big.png"].caption == "new caption for big.png"


@pytest.mark.gpu
def test_gpu_cache_matches_cpu_cache(baseline, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    shutil.copytree(baseline["data"], data, symlinks=True)
    run_caching(make_args(data, tmp_path / "cache", tiny_model_dir, batch_size=4))  # bf16 autocast on the GPU
    _assert_caches_close(tmp_path / "cache" / "ds", baseline["root"], atol=5e-2)


def test_same_size_and_mtime_is_trusted_unless_verify_hashes(baseline, tmp_path, tiny_model_dir):
    data, cache = copy_baseline(baseline, tmp_path)
    path = data / "solid.png"
    stat = path.stat()
    Image.new("RGB", (128, 128), (20, 140, 240)).save(path)  # same size on disk (flat PNG), new colour
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert run_caching(make_args(data, cache, tiny_model_dir))["encoded"] == 0  # as make and rsync assume
    report = run_caching(make_args(data, cache, tiny_model_dir, verify_hashes=True))
    assert report["encoded"] == 1 and report["reused"] == len(GOOD) - 1
