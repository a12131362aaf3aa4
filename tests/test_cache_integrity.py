"""Cache integrity (issue 16): checksums and value checks on every read, repair by --verify_hashes, interrupted
re-caching refused, unusable values refused at caching, bad items skipped and counted by the dataset."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import write_synthetic_cache

from sdxl_trainer.caching.run import run_caching
from sdxl_trainer.data import cache_format, cache_reader, cache_writer, dataset


def _rewrite_consistently(root: Path, item: cache_format.CacheItem, tensors: dict[str, torch.Tensor]) -> None:
    """A hostile edit: new tensors, with a matching checksum in the file header AND in the index."""
    path = root / item.tensor_file
    record = cache_format.read_item_record(path)
    record["tensor_sha256"] = cache_format.tensor_checksum(tensors)
    save_file(tensors, str(path), metadata={cache_format._RECORD_KEY: json.dumps(record)})
    for part in (root / "index").glob("*.jsonl"):
        lines = part.read_text().splitlines()
        lines = [json.dumps(record) if json.loads(line).get("key") == item.key else line for line in lines]
        part.write_text("\n".join(lines) + "\n")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _damage(root: Path) -> dict[str, str]:
    """Three damaged items of a synthetic cache: flipped bytes, NaN and 65504s. Returns relpath -> kind."""
    ds = cache_reader.open_dataset_cache(root)
    flipped, nan, saturated = ds.items[:3]
    _flip_last_byte(root / flipped.tensor_file)
    t = load_file(str(root / nan.tensor_file))
    t["latent_mean"][0, 0, 0] = float("nan")
    _rewrite_consistently(root, nan, t)
    t = load_file(str(root / saturated.tensor_file))
    t["prompt_embeds"].fill_(65504.0)
    _rewrite_consistently(root, saturated, t)
    return {flipped.image_relpath: "checksum", nan.image_relpath: "non-finite", saturated.image_relpath: "65504"}


def test_flipped_bytes_nan_and_saturated_items_are_named_and_refused(tmp_path):
    root = write_synthetic_cache(tmp_path / "ds", {(64, 64): 6})
    damaged = _damage(root)
    ds = cache_reader.open_dataset_cache(root)
    for item in ds.items:
        if item.image_relpath in damaged:
            with pytest.raises(cache_format.BadItemError, match=damaged[item.image_relpath]) as info:
                ds.load_item_tensors(item)
            assert item.image_relpath in str(info.value)
        else:
            assert set(ds.load_item_tensors(item)) >= set(cache_format.ITEM_TENSORS)
    good, bad = dataset.verify_items(ds)
    assert len(good) == 3 and len(bad) == 3


def test_a_damaged_header_is_named_in_one_short_line(tmp_path):
    root = write_synthetic_cache(tmp_path / "ds", {(64, 64): 2})
    ds = cache_reader.open_dataset_cache(root)
    path = root / ds.items[0].tensor_file
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{" + b"x" * 5000 + data[8 + 5001 :])  # header garbage of the same length
    with pytest.raises(cache_format.BadItemError) as info:
        ds.load_item_tensors(ds.items[0])
    assert ds.items[0].image_relpath in str(info.value) and len(str(info.value)) < 400


def test_the_writer_refuses_non_finite_and_saturated_values(tmp_path):
    writer = cache_writer.CacheWriter(tmp_path / "ds", fingerprint={"image": {}, "text": {}})
    tensors = {
        "latent_mean": torch.zeros(4, 8, 8),
        "latent_std": torch.zeros(4, 8, 8),
        "prompt_embeds": torch.zeros(77, 8),
        "pooled_prompt_embeds": torch.zeros(8),
    }
    writer.write_item("ok.png", "", (64, 64), (64, 64), (0, 0), tensors)
    for value, name in ((float("nan"), "a.png"), (float("inf"), "b.png"), (70000.0, "c.png")):
        bad = {**tensors, "pooled_prompt_embeds": torch.full((8,), value)}
        with pytest.raises(cache_format.BadItemError, match=name):
            writer.write_item(name, "", (64, 64), (64, 64), (0, 0), bad)


def test_optional_extra_tensors_are_covered_by_the_checksum_and_returned(tmp_path):
    writer = cache_writer.CacheWriter(tmp_path / "ds", fingerprint={"image": {}, "text": {}})
    writer.write_empty_embeddings(torch.zeros(77, 8), torch.zeros(8))
    tensors = {
        "latent_mean": torch.zeros(4, 8, 8),
        "latent_std": torch.zeros(4, 8, 8),
        "prompt_embeds": torch.zeros(77, 8),
        "pooled_prompt_embeds": torch.zeros(8),
        "loss_mask": torch.ones(1, 8, 8),
    }
    writer.write_item("a.png", "", (64, 64), (64, 64), (0, 0), tensors)
    writer.finalize()
    ds = cache_reader.open_dataset_cache(tmp_path / "ds")
    assert torch.equal(ds.load_item_tensors(ds.items[0])["loss_mask"], tensors["loss_mask"])


def test_the_dataset_skips_bad_items_as_weight_zero_placeholders_named_once(tmp_path, caplog):
    root = write_synthetic_cache(tmp_path / "ds", {(64, 96): 5})
    damaged = _damage(root)
    caches, entries, _ = dataset.load_entries([root])
    data = dataset.CachedLatentDataset(caches, entries, seed=1, num_train_timesteps=1000, dropout_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="sdxl_trainer"):
        samples = [data[(i, 1, 1.0)] for i in range(len(entries))] + [data[(0, 2, 1.0)]]
    batch = dataset.collate(samples)
    bad = [entries[i].item.image_relpath for i in batch["index"][batch["bad"]].tolist()]
    assert set(bad) == set(damaged)
    assert batch["sample_weights"][batch["bad"]].eq(0).all() and batch["sample_weights"][~batch["bad"]].eq(1).all()
    assert batch["latents"].shape[1:] == (4, 12, 8)  # placeholders have the bucket's shape
    named = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(named) == len(damaged) and all(any(p in m for m in named) for p in damaged)


# --- the caching step: repair, interrupted re-runs, values refused at caching (tiny model) ------------------------


def _make_data(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96), (128, 64)]):
        Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption number {i}", encoding="utf-8")
    return folder


def _args(data: Path, cache: Path, model: Path, **kw):
    from sdxl_trainer.caching.caching_args import CachingArgs

    kw = {"min_resolution": 64, "max_resolution": 128, "num_workers": 0, "basename": "ds", **kw}
    return CachingArgs(data_dir=str(data), cache_dir=str(cache), pretrained_model_name_or_path=str(model), **kw)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("integrity")
    data = _make_data(base / "data")
    run_caching(_args(data, base / "cache", tiny_model_dir))
    return data, base / "cache"


def _copy(cached, tmp_path: Path) -> tuple[Path, Path]:
    data, cache = cached
    shutil.copytree(data, tmp_path / "data")  # copy2 keeps mtimes: the items stay fresh
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "data", tmp_path / "cache"


def test_verify_hashes_names_and_reencodes_damaged_items(cached, tmp_path, tiny_model_dir):
    data, cache = _copy(cached, tmp_path)
    root = cache / "ds"
    ds = cache_reader.open_dataset_cache(root)
    original = {i.image_relpath: {k: v.clone() for k, v in ds.load_item_tensors(i).items()} for i in ds.items}
    damaged = _damage(root)
    plain = run_caching(_args(data, cache, tiny_model_dir))  # trusts size and mtime: nothing re-encoded...
    assert plain["encoded"] == 0
    report = run_caching(_args(data, cache, tiny_model_dir, verify_hashes=True))  # ...until asked to verify
    assert {r["path"] for r in report["repaired"]} == set(damaged)
    assert report["encoded"] == len(damaged)
    ds = cache_reader.open_dataset_cache(root)
    for item in ds.items:
        repaired = ds.load_item_tensors(item)  # every check passes again
        for name in cache_format.ITEM_TENSORS:
            assert torch.equal(repaired[name], original[item.image_relpath][name]), (item.image_relpath, name)


def test_an_interrupted_recache_is_refused_then_completed_never_read_as_a_mix(cached, tmp_path, tiny_model_dir):
    from PIL import Image

    data, cache = _copy(cached, tmp_path)
    for i in range(4):
        (data / f"img{i}.txt").write_text(f"an edited caption {i}", encoding="utf-8")
        with Image.open(data / f"img{i}.png") as image:
            size = image.size
        Image.new("RGB", size, (9, 9, 30 * i)).save(data / f"img{i}.png")  # edited: re-encoded, the run is killed
    with pytest.raises(KeyboardInterrupt):
        run_caching(_args(data, cache, tiny_model_dir), stop_after=1)
    with pytest.raises(cache_format.CacheError, match="interrupted"):
        cache_reader.open_dataset_cache(cache / "ds")
    # Even without the mark, an item file from the unfinished run does not pass for the old index's item.
    for mark in (cache / "ds" / "index").glob("*" + cache_format.WRITING_SUFFIX):
        mark.unlink()
    ds = cache_reader.open_dataset_cache(cache / "ds")
    assert any(_fails(ds, item) for item in ds.items)
    run_caching(_args(data, cache, tiny_model_dir))
    ds = cache_reader.open_dataset_cache(cache / "ds")
    assert sorted(i.caption for i in ds.items) == [f"an edited caption {i}" for i in range(4)]
    assert not any(_fails(ds, item) for item in ds.items)


def _fails(ds, item) -> bool:
    try:
        ds.load_item_tensors(item)
    except cache_format.BadItemError:
        return True
    return False


def test_unusable_encoder_output_is_refused_at_caching_naming_the_item(cached, tmp_path, tiny_model_dir, monkeypatch):
    from sdxl_trainer.caching import encoders

    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(cached[0], data)
    real = encoders.Encoders.encode_texts

    def overflowing(self, captions):
        prompt, *rest = real(self, captions)
        prompt = prompt.clone()
        if "caption number 2" in captions:
            prompt[captions.index("caption number 2")] = float("inf")  # an fp16 overflow in a text encoder
        return (prompt, *rest)

    monkeypatch.setattr(encoders.Encoders, "encode_texts", overflowing)
    report = run_caching(_args(data, cache, tiny_model_dir))
    assert [s["path"] for s in report["skipped"]] == ["img2.png"]
    assert "non-finite" in report["skipped"][0]["reason"]
    assert report["cached"] == 3


@pytest.mark.slow
def test_a_damaged_item_met_in_training_is_named_skipped_and_counted(tiny_model_dir, tmp_path):
    from train_helpers import base_args

    import sdxl_fsdp_train

    root = write_synthetic_cache(tmp_path / "cache" / "ds", {(64, 64): 4})
    bad = cache_reader.open_dataset_cache(root).items[1]
    _flip_last_byte(root / bad.tensor_file)
    out = tmp_path / "run"
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, tmp_path / "cache", out, "--no-save_final_model")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["bad_items_skipped"] == 1 and summary["images_seen"] == 4
    log = (out / "train.log").read_text()
    assert f"cache item skipped (not trained, counted): {bad.image_relpath}" in log and "1 damaged cache items" in log
