"""The cache format: write, read back, move, shards, staleness, damage (no models needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdxl_trainer.data import cache_format, cache_reader, cache_writer

FP = {"image": {"vae": "v1", "min_resolution": 256}, "text": {"model": "m1"}}


def _tensors(bucket_wh=(64, 96), seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    w, h = bucket_wh
    return {
        "latent_mean": torch.randn(4, h // 8, w // 8, generator=g).to(dtype),
        "latent_std": torch.rand(4, h // 8, w // 8, generator=g).to(dtype),
        "prompt_embeds": torch.randn(77, 16, generator=g).to(dtype),
        "pooled_prompt_embeds": torch.randn(8, generator=g).to(dtype),
    }


def _write(root: Path, names=("a.png", "sub/b c#é.jpg", "z.webp"), fingerprint=FP, shard=(0, 1)):
    writer = cache_writer.CacheWriter(root, fingerprint, name="ds", shard_index=shard[0], num_shards=shard[1])
    writer.write_empty_embeddings(torch.zeros(77, 16), torch.ones(8))
    for i, n in enumerate(names):
        writer.write_item(n, f"caption {i}", (64, 96), (200, 100), (0, 3), _tensors(seed=i), image_sha256=f"{i:064x}")
    writer.finalize()
    return writer


def test_written_cache_reads_back_sorted_with_time_ids_in_sdxl_order(tmp_path):
    _write(tmp_path / "ds")
    ds = cache_reader.open_dataset_cache(tmp_path / "ds")
    assert ds.name == "ds" and ds.fingerprint == FP
    assert [i.key for i in ds.items] == sorted(i.key for i in ds.items)
    item = next(i for i in ds.items if i.image_relpath == "sub/b c#é.jpg")
    assert item.key == cache_format.item_key("sub/b c#é.jpg") and len(item.key) == 32
    assert item.caption == "caption 1" and item.caption_sha256 == cache_format.sha256_text("caption 1")
    assert item.bucket_wh == (64, 96) and item.target_size_hw == (96, 64)
    assert item.time_ids == (200, 100, 0, 3, 96, 64)
    t = ds.load_item_tensors(item)
    assert torch.equal(t["latent_mean"], _tensors(seed=1)["latent_mean"])
    assert t["latent_mean"].shape == (4, 12, 8) and t["latent_mean"].device.type == "cpu"
    empty = ds.load_empty_embeddings()
    assert empty["prompt_embeds"].shape == (77, 16) and torch.equal(empty["pooled_prompt_embeds"], torch.ones(8))


def test_item_files_are_sharded_into_subfolders_and_no_pickles(tmp_path):
    _write(tmp_path / "ds")
    files = sorted(p.relative_to(tmp_path / "ds").as_posix() for p in (tmp_path / "ds").rglob("*") if p.is_file())
    item_files = [f for f in files if f.startswith("items/")]
    assert len(item_files) == 3
    for f in item_files:
        key = Path(f).stem
        assert f == f"items/{key[:2]}/{key}.safetensors"
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".tmp"))]


def test_moved_cache_still_reads(tmp_path):
    _write(tmp_path / "ds")
    shutil.move(tmp_path / "ds", tmp_path / "elsewhere")
    ds = cache_reader.open_dataset_cache(tmp_path / "elsewhere")
    assert len(ds.items) == 3
    ds.load_item_tensors(ds.items[0])
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path / "elsewhere").rglob("*.json*"))
    assert str(tmp_path) not in text  # only relative paths are stored


def test_union_of_shards_reads_as_one_cache_and_incomplete_shards_are_reported(tmp_path):
    names = [f"img{i}.png" for i in range(12)]
    root = tmp_path / "ds"
    by_shard = {s: [n for n in names if cache_format.shard_of_key(cache_format.item_key(n), 3) == s] for s in range(3)}
    assert all(by_shard.values())  # the assignment spreads these names over all three shards
    _write(root, by_shard[0], shard=(0, 3))
    _write(root, by_shard[2], shard=(2, 3))
    with pytest.raises(cache_format.CacheError, match=r"--shard_index \[1\]"):
        cache_reader.open_dataset_cache(root)
    _write(root, by_shard[1], shard=(1, 3))
    assert sorted(i.image_relpath for i in cache_reader.open_dataset_cache(root).items) == sorted(names)


def test_a_run_with_another_num_shards_replaces_old_index_parts(tmp_path):
    root = tmp_path / "ds"
    _write(root, ["a.png"], shard=(0, 2))
    _write(root, ["a.png", "b.png"], shard=(0, 1))
    assert [p.name for p in (root / "index").iterdir()] == [cache_format.index_part_name(0, 1)]
    assert len(cache_reader.open_dataset_cache(root).items) == 2


def test_shards_written_with_different_settings_are_refused(tmp_path):
    root = tmp_path / "ds"
    _write(root, ["a.png"], shard=(0, 2))
    _write(root, ["b.png"], shard=(1, 2), fingerprint={**FP, "image": {"vae": "other"}})
    with pytest.raises(cache_format.CacheError, match="different flags"):
        cache_reader.open_dataset_cache(root)


def test_wrong_format_version_missing_index_and_missing_files_give_clear_errors(tmp_path):
    root = tmp_path / "ds"
    _write(root)
    meta = json.loads((root / "cache.json").read_text())
    (root / "cache.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(cache_format.CacheError, match="format version 0"):
        cache_reader.open_dataset_cache(root)
    (root / "cache.json").write_text(json.dumps(meta))
    ds = cache_reader.open_dataset_cache(root)
    (root / ds.items[0].tensor_file).unlink()
    with pytest.raises(cache_format.CacheError, match="missing item file"):
        ds.load_item_tensors(ds.items[0])
    (root / ds.items[1].tensor_file).write_bytes(b"garbage")
    with pytest.raises(cache_format.CacheError, match="damaged"):
        ds.load_item_tensors(ds.items[1])
    shutil.rmtree(root / "index")
    with pytest.raises(cache_format.CacheError, match="no index"):
        cache_reader.open_dataset_cache(root)
    with pytest.raises(cache_format.CacheError, match="not a dataset cache"):
        cache_reader.open_dataset_cache(tmp_path)


def test_item_record_in_the_file_header_survives_without_an_index(tmp_path):
    root = tmp_path / "ds"
    writer = cache_writer.CacheWriter(root, FP)
    item = writer.write_item("x.png", "hi", (64, 64), (64, 64), (0, 0), _tensors((64, 64)))
    record = cache_format.read_item_record(root / item.tensor_file)
    assert cache_format.CacheItem.from_record(record) == item
    assert (record["image_fingerprint"], record["text_fingerprint"]) == cache_format.fingerprint_parts(FP)
    (root / item.tensor_file).write_bytes(b"\x00" * 10)
    assert cache_format.read_item_record(root / item.tensor_file) is None


def test_negative_crop_is_refused_by_the_writer(tmp_path):
    with pytest.raises(ValueError, match="negative crop"):
        cache_writer.CacheWriter(tmp_path, FP).write_item("x.png", "", (64, 64), (64, 64), (-1, 0), _tensors((64, 64)))


def test_find_dataset_caches_accepts_roots_and_dataset_folders(tmp_path):
    _write(tmp_path / "root" / "one")
    _write(tmp_path / "root" / "nested" / "two")
    found = cache_reader.find_dataset_caches([tmp_path / "root", tmp_path / "root" / "one"])
    assert found == sorted([(tmp_path / "root" / "one").resolve(), (tmp_path / "root" / "nested" / "two").resolve()])
    (tmp_path / "empty").mkdir()
    with pytest.raises(cache_format.CacheError, match="empty"):
        cache_reader.find_dataset_caches([tmp_path / "empty"])
    with pytest.raises(cache_format.CacheError, match="nope"):
        cache_reader.find_dataset_caches([tmp_path / "nope"])


def test_fingerprint_hash_ignores_key_order_and_changes_with_values():
    assert cache_format.fingerprint_hash({"a": 1, "b": 2}) == cache_format.fingerprint_hash({"b": 2, "a": 1})
    assert cache_format.fingerprint_hash({"a": 1}) != cache_format.fingerprint_hash({"a": 2})
