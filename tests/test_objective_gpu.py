"""GPU (issue 17): EMA and the objective options on the full trainer path with a FULL-SIZE random-weight SDXL
UNet at 1024 px, bf16, 8-bit AdamW, gradient checkpointing, on every visible GPU (--sharding auto: the flat layout
on one GPU, FULL_SHARD on several). Runs without and with the options, then resumes the options run from its
middle checkpoint; prints images/s and peak memory of each, so the cost of EMA (GPU, or CPU every 2 steps on
several GPUs) is visible.

    pytest -m gpu tests/test_objective_gpu.py -s        (about 4-6 minutes on one H200)
Random weights: speed, memory and plumbing only, never image quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_gpu import _cache_1024, _full_size_model
from train_helpers import run_trainer_script

from sdxl_trainer.models import shapes

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
STEPS = 6
OPTIONS = [
    "--prediction_type", "v_prediction", "--zero_terminal_snr", "--snr_gamma", "5", "--loss_type", "huber",
    "--noise_offset", "0.05", "--noise_offset_random_strength", "--multires_noise_iterations", "4",
    "--input_perturbation", "0.1", "--timestep_sampling", "logit_normal", "--use_ema",
]  # fmt: skip


def _train(model: Path, cache: Path, out: Path, gpus: int, batch: int, *extra: str) -> list[dict]:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--cached_dataset_dirs", str(cache), "--output_dir", str(out),
        "--log_dir", str(out / "tb"), "--train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(STEPS), "--mixed_precision", "bf16", "--optimizer", "adamw8bit",
        "--gradient_checkpointing", "--learning_rate", "1e-5", "--dataloader_num_workers", "4",
        "--no-save_final_model", "--save_model_every_n_epochs", "1000", "--checkpointing_steps", "0", *extra,
    ]  # fmt: skip
    return run_trainer_script(argv, out, timeout_s=1200, nproc=gpus)


def _report(name: str, steps: list[dict], out: Path) -> float:
    warm = steps[2:]
    rate = sum(r["imgs_per_sec"] for r in warm) / max(1, len(warm))
    peaks = json.loads((out / "summary.json").read_text())["peak_gpu_memory_gib_per_rank"]
    print(f"\n{name}: {rate:.2f} images/s, peak GiB per rank {[round(p, 2) for p in peaks]}, "
          f"losses {[round(r['loss'], 4) for r in steps]}")  # fmt: skip
    return rate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ema_and_objective_options_train_full_size_and_resume(tiny_model_dir, tmp_path):
    gpus = torch.cuda.device_count()
    batch = int(os.environ.get("SDXL_GPU_TEST_BATCH", "4"))
    model = _full_size_model(tiny_model_dir, tmp_path / "sdxl-random")
    cache = _cache_1024(tmp_path / "cache", batch * gpus * STEPS)
    plain = _train(model, cache, tmp_path / "plain", gpus, batch)
    _report("no options, no EMA", plain, tmp_path / "plain")
    ema_device = ["--ema_device", "cpu", "--ema_update_every_steps", "2"] if gpus > 1 else []
    out = tmp_path / "options"
    steps = _train(model, cache, out, gpus, batch, *OPTIONS, *ema_device, "--checkpointing_steps", "3")
    _report(f"options + EMA ({'cpu, every 2 steps' if ema_device else 'gpu'})", steps, out)
    assert len(steps) == STEPS and all(r["finite"] for r in steps)
    ema_files = sorted((out / "checkpoints" / f"step-{STEPS}" / "extra" / "ema").glob("rank*.safetensors"))
    assert len(ema_files) == gpus
    ema_elements = sum(t.numel() for f in ema_files for t in load_file(str(f)).values())
    assert ema_elements == shapes.UNET_PARAMETERS  # the full SDXL UNet, split over the ranks

    resumed = tmp_path / "resumed"
    again = _train(model, cache, resumed, gpus, batch, *OPTIONS, *ema_device, "--resume_from_checkpoint",
                   str(out / "checkpoints" / "step-3"))  # fmt: skip
    assert [r["step"] for r in again] == list(range(4, STEPS + 1))
    # Same data, noise and timesteps (drawn per item); GPU kernels may differ in the last bits.
    for a, b in zip(again, steps[3:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
