"""GPU: a few steps of the trainer with a FULL-SIZE random-weight SDXL UNet at 1024 px (FSDP2 FULL_SHARD, bf16
compute, 8-bit AdamW, gradient checkpointing) on every visible GPU; prints images/s and peak memory per rank.

    pytest -m gpu tests/test_train_gpu.py -s
Random weights: speed and memory only, never image quality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdxl_trainer.models import shapes

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]

SDXL_UNET_CONFIG = shapes.UNET
SDXL_UNET_PARAMETERS = shapes.UNET_PARAMETERS  # performance.md


def _full_size_model(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny pipeline's scheduler and parts with a full-size SDXL UNet (random weights) in unet/."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_model_dir, out)
    shutil.rmtree(out / "unet")
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMETERS
    unet.save_pretrained(out / "unet")
    del unet
    torch.cuda.empty_cache()
    return out


def _cache_1024(root: Path, items: int) -> Path:
    from sdxl_trainer.data.cache_writer import CacheWriter

    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(root / "ds", fingerprint={"image": {"synthetic": 1024}, "text": {"synthetic": 1}})
    writer.write_empty_embeddings(torch.zeros(77, 2048), torch.zeros(1280))
    for n in range(items):
        tensors = {
            "latent_mean": torch.randn(4, 128, 128, generator=g).half(),
            "latent_std": (0.05 * torch.rand(4, 128, 128, generator=g)).half(),
            "prompt_embeds": torch.randn(77, 2048, generator=g).half(),
            "pooled_prompt_embeds": torch.randn(1280, generator=g).half(),
        }
        writer.write_item(f"img_{n:05d}.png", f"caption {n}", (1024, 1024), (1024 + n, 1024), (0, 0), tensors)
    writer.finalize()
    return root


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_size_sdxl_unet_trains_at_1024_and_reports_memory(tiny_model_dir, tmp_path):
    gpus = torch.cuda.device_count()
    batch, steps = int(os.environ.get("SDXL_GPU_TEST_BATCH", "8")), int(os.environ.get("SDXL_GPU_TEST_STEPS", "8"))
    model = _full_size_model(tiny_model_dir, tmp_path / "sdxl-random")
    cache = _cache_1024(tmp_path / "cache", batch * gpus * steps)
    out = tmp_path / "run"
    argv = [
        "--pretrained_model_name_or_path", str(model), "--cached_dataset_dirs", str(cache), "--output_dir", str(out),
        "--log_dir", str(tmp_path / "tb"), "--train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps), "--mixed_precision", "bf16", "--optimizer", "adamw8bit",
        "--gradient_checkpointing", "--learning_rate", "1e-5", "--dataloader_num_workers", "4",
        "--no-save_final_model", "--save_model_every_n_epochs", "1000", "--checkpointing_steps", "0",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           str(REPO / "sdxl_fsdp_train.py"), *argv]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep what is there
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if r["event"] == "step"]
    assert len(step_records) == steps and all(r["finite"] for r in step_records)
    summary = json.loads((out / "summary.json").read_text())
    warm = step_records[2:]  # the first steps include FSDP lazy init and the allocator warming up
    rate = sum(r["imgs_per_sec"] for r in warm) / len(warm)
    peaks = summary["peak_gpu_memory_gib_per_rank"]
    sharding = json.loads((out / "config.json").read_text())["sharding"]  # auto: none on 1 GPU, full_shard on more
    assert sharding == ("none" if gpus == 1 else "full_shard")
    print(
        f"\nfull-size SDXL UNet, 1024 px, {gpus} GPU(s) x batch {batch}, --sharding {sharding}, bf16, AdamW8bit, "
        "checkpointing: "
        f"{rate:.2f} images/s in total ({rate / gpus:.2f} per GPU) over steps 3-{steps}; "
        f"peak allocated GiB per rank {[round(p, 2) for p in peaks]}; "
        f"losses {[round(r['loss'], 4) for r in step_records]}"
    )
    assert len(peaks) == gpus and all(p > 1.0 for p in peaks)
