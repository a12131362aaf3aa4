"""GPU: --fp8 with a FULL-SIZE random-weight SDXL UNet at 1024 px on one GPU with FP8 tensor cores (H100/H200/Ada),
through the real trainer (flat one-process layout): FP8 tensorwise and rowwise with --compile stay finite and close
to the bf16 run from the same start; a resumed FP8 run repeats the next step's loss exactly.

    pytest -m gpu tests/test_fp8_gpu.py -s        # about 8 minutes on an H200 (3 compiled runs, 3 eager);
                                                  # needs ~45 GB free in the temp folder (two 15 GB checkpoints)
Random weights: numerics and speed only, never image quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import run_trainer_script

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
BATCH = 2


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with compute capability >= 8.9")


@pytest.fixture(scope="module")
def full_size(tiny_model_dir, tmp_path_factory):
    from test_train_gpu import _cache_1024, _full_size_model

    root = tmp_path_factory.mktemp("fp8gpu")
    return _full_size_model(tiny_model_dir, root / "sdxl-random"), _cache_1024(root / "cache", BATCH * 8)


def _train(model: Path, cache: Path, out: Path, steps: int, *extra: str) -> list[dict]:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--cached_dataset_dirs", str(cache), "--output_dir", str(out),
        "--log_dir", str(out / "tb"), "--train_batch_size", str(BATCH), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps), "--mixed_precision", "bf16", "--optimizer", "adamw8bit",
        "--no-gradient_checkpointing", "--learning_rate", "1e-5", "--dataloader_num_workers", "2",
        "--no-save_final_model", "--save_model_every_n_epochs", "1000", *extra,
    ]  # fmt: skip
    return run_trainer_script(argv, out, timeout_s=1200)


@needs_fp8
def test_fp8_with_compile_stays_close_to_bf16(full_size, tmp_path):
    model, cache = full_size
    steps = 6
    runs = {
        "bf16": ["--compile", "transformers"],
        "tensorwise": ["--fp8", "tensorwise", "--compile", "transformers"],
        "rowwise": ["--fp8", "rowwise", "--compile", "transformers"],
    }
    records = {}
    for name, extra in runs.items():
        records[name] = _train(model, cache, tmp_path / name, steps, "--checkpointing_steps", "0", *extra)
        shutil.rmtree(tmp_path / name / "checkpoints", ignore_errors=True)  # ~15 GB each
        assert len(records[name]) == steps and all(r["finite"] for r in records[name])
        log = (tmp_path / name / "train.log").read_text()
        assert name == "bf16" or f"--fp8 {name} {{'fp8_layers': 492" in log
    for name in ("tensorwise", "rowwise"):
        pairs = list(zip(records[name], records["bf16"], strict=True))
        loss_gaps = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in pairs]
        norm_gaps = [abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in pairs]
        print(f"\n{name}: relative loss gaps {[round(g, 4) for g in loss_gaps]}, grad-norm gaps "
              f"{[round(g, 4) for g in norm_gaps]}")  # fmt: skip
        # Same data, noise and timesteps: only the FP8 rounding of the matmul operands differs.
        assert max(loss_gaps) < 0.05 and sum(norm_gaps) / len(norm_gaps) < 0.1


@needs_fp8
def test_resumed_fp8_run_repeats_the_next_step(full_size, tmp_path):
    """Eager FP8 (tensorwise): the checkpoint of step 2 restores weights, optimizer, RNG and data position, so the
    resumed run's step-3 loss (a deterministic forward) equals the uninterrupted run's."""
    model, cache = full_size
    first = _train(model, cache, tmp_path / "a", 3, "--fp8", "tensorwise", "--compile", "none",
                   "--checkpointing_steps", "2")  # fmt: skip
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-3")  # disk: ~15 GB per checkpoint
    resumed = _train(model, cache, tmp_path / "b", 3, "--fp8", "tensorwise", "--compile", "none",
                     "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoints" / "step-2"))  # fmt: skip
    for run in ("a", "b"):  # pytest keeps the temp folders of the last runs: a full disk failed the next run once
        shutil.rmtree(tmp_path / run / "checkpoints", ignore_errors=True)
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(first[2]["loss"], rel=1e-6)
