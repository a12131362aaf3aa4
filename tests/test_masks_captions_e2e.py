"""Masked loss and long captions end to end on CPU with the tiny model: the real caching script
(`<stem>.mask.png`, --alpha_mask, --max_token_length 231), then the real trainer (--masked_loss, batches of
captions of different lengths), exact resume, FSDP, and the refusal of --masked_loss without masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import base_args, read_metrics, write_synthetic_cache

import sdxl_fsdp_train
import sdxl_process_data_dir
from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.caching.run import run_caching
from sdxl_trainer.data import cache_format, cache_reader
from sdxl_trainer.models import loading
from sdxl_trainer.training import loop, objective, train_args
from sdxl_trainer.training.data_setup import DataSetupError

pytestmark = pytest.mark.slow

WORDS = {"short": 3, "two_chunks": 100, "too_long": 300}  # "red " is one token of the tiny tokenizer


def _make_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    captions = ["short", "two_chunks", "too_long", "two_chunks", "short", "two_chunks"]
    for i, kind in enumerate(captions):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        if i == 3:  # transparency: its alpha becomes the mask with --alpha_mask
            alpha = np.zeros((64, 64, 1), np.uint8)
            alpha[:32] = 255
            Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA").save(folder / f"img{i}.png")
        else:
            Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(" ".join(["red"] * WORDS[kind]), encoding="utf-8")
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    for i in (0, 1):
        Image.fromarray(left).save(folder / f"img{i}.mask.png")
    Image.new("RGB", (64, 64)).save(folder / "wrong.png")
    Image.new("L", (32, 32), 255).save(folder / "wrong.mask.png")  # another size: the item is skipped


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model_dir) -> dict:
    tmp = tmp_path_factory.mktemp("masks")
    data, cache = tmp / "data", tmp / "cache"
    data.mkdir()
    _make_data(data)
    argv = ["--data_dir", str(data), "--cache_dir", str(cache), "--pretrained_model_name_or_path", str(tiny_model_dir),
            "--min_resolution", "64", "--max_resolution", "64", "--num_workers", "0", "--basename", "ds",
            "--max_token_length", "231", "--alpha_mask"]  # fmt: skip
    assert sdxl_process_data_dir.main(argv) == 0
    return {"data": data, "cache": cache, "argv": argv}


def test_caching_stores_masks_at_latent_resolution_and_captions_with_their_chunks(cached):
    report = json.loads((cached["cache"] / "ds" / "report.json").read_text())
    assert report["cached"] == 6 and report["truncated_captions"] == 1
    assert {s["path"]: s["reason"] for s in report["skipped"]} == {
        "wrong.png": "mask wrong.mask.png is 32x32, the image is 64x64: they must match"
    }
    assert [n["note"] for n in report["notes"]] == ["caption is 300 tokens: truncated to 225 (--max_token_length 231)"]
    ds = cache_reader.open_dataset_cache(cached["cache"] / "ds")
    by_name = {i.image_relpath: i for i in ds.items}
    rows = {name: ds.load_item_tensors(item)["prompt_embeds"].shape[0] for name, item in by_name.items()}
    assert rows == {"img0.png": 77, "img1.png": 154, "img2.png": 231, "img3.png": 154, "img4.png": 77, "img5.png": 154}
    records = cache_format.load_index_records(cached["cache"] / "ds")  # the length is in each record too
    assert {r["image_relpath"]: r["text_rows"] for r in records.values()} == rows
    assert [by_name[f"img{i}.png"].loss_mask for i in range(6)] == [True, True, False, True, False, False]
    left = ds.load_item_tensors(by_name["img0.png"])["loss_mask"].float()
    top = ds.load_item_tensors(by_name["img3.png"])["loss_mask"].float()
    assert left.shape == top.shape == (1, 8, 8)
    assert torch.all(left[..., :4] == 1) and torch.all(left[..., 4:] == 0)
    assert torch.all(top[:, :4] == 1) and torch.all(top[:, 4:] == 0)  # from the alpha channel


def test_an_edited_mask_reencodes_only_its_item(cached, tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(cached["data"], data)
    shutil.copytree(cached["cache"], cache)
    args = dict(data_dir=str(data), cache_dir=str(cache), pretrained_model_name_or_path=str(tiny_model_dir),
                min_resolution=64, max_resolution=64, num_workers=0, basename="ds", max_token_length=231,
                alpha_mask=True)  # fmt: skip
    # copytree keeps the mtimes: nothing changed
    assert run_caching(CachingArgs(**args))["encoded"] == 0
    Image.new("L", (64, 64), 0).save(data / "img1.mask.png")
    report = run_caching(CachingArgs(**args))
    assert report["encoded"] == 1 and report["truncated_captions"] == 1
    ds = cache_reader.open_dataset_cache(cache / "ds")
    item = {i.image_relpath: i for i in ds.items}["img1.png"]
    assert torch.count_nonzero(ds.load_item_tensors(item)["loss_mask"]) == 0
    # Back to 77 tokens: only the text is re-encoded (no VAE), the masks stay, the long captions are truncated.
    monkeypatch.setattr(loading, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded"))
    report = run_caching(CachingArgs(**{**args, "max_token_length": 77}))
    assert report["encoded"] == 6 and report["truncated_captions"] == 4
    ds = cache_reader.open_dataset_cache(cache / "ds")
    tensors = {i.image_relpath: ds.load_item_tensors(i) for i in ds.items}
    assert {name: t["prompt_embeds"].shape[0] for name, t in tensors.items()} == dict.fromkeys(tensors, 77)
    assert sorted(name for name, t in tensors.items() if "loss_mask" in t) == ["img0.png", "img1.png", "img3.png"]


def _model_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((checkpoint_dir / "model").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_masked_loss_with_long_captions_trains_and_resumes_exactly(cached, tiny_model_dir, tmp_path, monkeypatch):
    padded_batches = []
    predict = objective.predict

    def spy(unet, scheduler, batch):
        padded_batches.append("encoder_attention_mask" in batch and "loss_mask" in batch)
        return predict(unet, scheduler, batch)

    monkeypatch.setattr(objective, "predict", spy)
    common = ["--num_train_epochs", "2", "--masked_loss", "--checkpointing_steps", "2", "--validation_loss",
              "--validation_loss_percent", "0.01", "--conditional_dropout_percent", "0.2"]  # fmt: skip
    run_a, run_c = tmp_path / "a", tmp_path / "c"
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cached["cache"], run_a, *common)) == 0
    steps = read_metrics(run_a)
    planned = json.loads((run_a / "config.json").read_text())["total_optimizer_steps"]
    assert len(steps) == planned >= 4 and all(r["finite"] for r in steps)
    assert any(padded_batches)  # captions of different lengths met in a batch: padded and masked
    resume = ["--resume_from_checkpoint", str(run_a / "checkpoints" / "step-2"), "--no-save_final_model"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cached["cache"], run_c, *common, *resume)) == 0
    assert [r["loss"] for r in read_metrics(run_c)] == [r["loss"] for r in steps[2:]]
    final = f"step-{planned}"
    a, c = _model_tensors(run_a / "checkpoints" / final), _model_tensors(run_c / "checkpoints" / final)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)

    # The masks change the loss; FULL_SHARD gives the one-process layout's losses with masks and padding.
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    unmasked = [f for f in common if f != "--masked_loss"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cached["cache"], plain, *unmasked, "--max_train_steps", "1",
                                          "--no-save_final_model")) == 0  # fmt: skip
    assert read_metrics(plain)[0]["loss"] != pytest.approx(steps[0]["loss"], rel=1e-3)
    fsdp = ["--sharding", "full_shard", "--no-save_final_model", "--max_train_steps", "2"]  # constant LR: same steps
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cached["cache"], sharded, *common, *fsdp)) == 0
    assert [r["loss"] for r in read_metrics(sharded)] == pytest.approx([r["loss"] for r in steps[:2]], rel=1e-5)


def test_masked_loss_on_a_cache_without_masks_is_refused(tiny_model_dir, tmp_path):
    root = write_synthetic_cache(tmp_path / "cache" / "ds", {(64, 64): 4})
    argv = base_args(tiny_model_dir, root, tmp_path / "run", "--masked_loss")
    with pytest.raises(DataSetupError, match="--masked_loss: none of the 4 cached items has a mask"):
        loop.main(train_args.parse_args(argv))
