"""Train from a single-file base end to end: convert the tiny pipeline to one file, cache, train, save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdxl_trainer.models import single_file, single_file_keys


def _scripts_accept_single_file_config() -> bool:
    try:
        from sdxl_trainer.caching import caching_args
        from sdxl_trainer.training import train_args
    except ImportError:
        return False
    parsers = (caching_args.build_parser(), train_args.build_parser())
    return all(any("--single_file_config" in a.option_strings for a in p._actions) for p in parsers)


# Runs either way: until both scripts take the flag this is an expected failure that says so; once they do,
# the marker no longer applies and the test must pass.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xfail(
        not _scripts_accept_single_file_config(),
        reason="sdxl_process_data_dir.py / sdxl_fsdp_train.py do not take --single_file_config yet "
        "(wiring described in docs/contracts.md, models.py section)",
        strict=True,
    ),
]


def _run(repo_root: Path, script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    result = subprocess.run(
        [sys.executable, script, *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )
    if ok:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _write_images(folder: Path, count: int) -> Path:
    """`count` 256x256 images with captions: one bucket, so batches of two always form."""
    folder.mkdir(parents=True)
    for i in range(count):
        colour = (40 * i, 200 - 30 * i, 90)
        Image.new("RGB", (256, 256), colour).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a flat colour square number {i}", encoding="utf-8")
    return folder


def _tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118


def test_cache_and_train_from_a_single_file_base(repo_root, tiny_model_dir, tmp_path):
    base = single_file.save_single_file(tiny_model_dir, tmp_path / "base.safetensors", dtype="fp16")
    model_flags = ["--pretrained_model_name_or_path", str(base), "--single_file_config", str(tiny_model_dir)]
    data = _write_images(tmp_path / "data", 4)
    cache_flags = ["--data_dir", str(data), "--cache_dir", str(tmp_path / "cache"), "--min_resolution", "256"]

    # Without the config folder: refused at start, naming the flag.
    refused = _run(repo_root, "sdxl_process_data_dir.py", *cache_flags, *model_flags[:2], ok=False)
    assert refused.returncode != 0 and "--single_file_config" in refused.stderr
    assert not (tmp_path / "cache").exists()

    _run(repo_root, "sdxl_process_data_dir.py", *cache_flags, "--max_resolution", "256", *model_flags)
    cache_json = json.loads((tmp_path / "cache" / "data" / "cache.json").read_text())
    assert cache_json["fingerprint"]["info"]["model"] == str(base)

    run_dir = tmp_path / "run"
    _run(repo_root, "sdxl_fsdp_train.py", *model_flags,
         "--cached_dataset_dirs", str(tmp_path / "cache"), "--output_dir", str(run_dir),
         "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", "2",
         "--mixed_precision", "no", "--optimizer", "adamw", "--learning_rate", "1e-3",
         "--no-gradient_checkpointing", "--dataloader_num_workers", "0", "--save_single_file")  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["optimizer_steps"] == 2

    # The saved single file: the trained UNet, and the base's VAE and text encoders bit for bit (both fp16).
    saved = run_dir / "final.safetensors"
    trained_unet, base_unet = (
        _tensors(saved, single_file_keys.UNET_PREFIX),
        _tensors(base, single_file_keys.UNET_PREFIX),
    )
    assert trained_unet.keys() == base_unet.keys()
    assert any(not torch.equal(trained_unet[k], base_unet[k]) for k in base_unet)
    for prefix in (
        single_file_keys.VAE_PREFIX,
        single_file_keys.TEXT_ENCODER_PREFIX,
        single_file_keys.TEXT_ENCODER_2_PREFIX,
    ):
        got, want = _tensors(saved, prefix), _tensors(base, prefix)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), prefix
