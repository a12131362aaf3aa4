"""EMA and the objective options with randomness under FULL_SHARD with 2 gloo processes (issue 17): a resume from
a checkpoint continues exactly (losses, weights, optimizer and EMA shards), each rank holds only its half of the
EMA, and the saved pipeline holds the EMA weights gathered from those shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp_multiprocess import _tensors, _torchrun, _wait
from train_helpers import base_args, read_metrics, write_synthetic_cache

pytestmark = pytest.mark.slow

OPTIONS = [
    "--use_ema", "--ema_decay", "0.95", "--ema_update_every_steps", "2", "--ema_warmup", "--noise_offset", "0.1",
    "--noise_offset_random_strength", "--multires_noise_iterations", "2", "--input_perturbation", "0.1",
    "--timestep_sampling", "logit_normal", "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2",
    "--loss_type", "huber", "--snr_gamma", "5", "--debiased_estimation_loss",
]  # fmt: skip


def _run(tiny_model_dir: Path, root: Path, name: str, *extra: str) -> Path:
    out = root / name
    argv = base_args(tiny_model_dir, root / "cache", out, "--train_batch_size", "1", "--max_train_steps", "4",
                     "--checkpointing_steps", "2", "--weight_dtype", "fp32", *OPTIONS, *extra)  # fmt: skip
    log = root / f"{name}.log"
    _wait(_torchrun(argv, log), log)
    return out


def _full_from_shards(shards: list[list[torch.Tensor]], shapes: list[torch.Size]) -> list[torch.Tensor]:
    """FSDP2 splits dim 0 as torch.chunk does; a rank whose piece is empty holds nothing for that tensor."""
    lists = [iter(s) for s in shards]
    full = []
    for shape in shapes:
        pieces = [next(it) for it, size in zip(lists, _chunk_sizes(shape[0], len(shards)), strict=True) if size]
        full.append(torch.cat(pieces).reshape(shape))
    return full


def _chunk_sizes(n: int, k: int) -> list[int]:
    size = -(-n // k)
    return [max(0, min(size, n - i * size)) for i in range(k)]


def test_ema_and_random_options_resume_exactly_under_full_shard(tmp_path, tiny_model_dir):
    write_synthetic_cache(tmp_path / "cache" / "ds", {(64, 64): 8})
    full = _run(tiny_model_dir, tmp_path, "full")
    resumed = _run(tiny_model_dir, tmp_path, "resumed", "--resume_from_checkpoint",
                   str(full / "checkpoints" / "step-2"), "--no-save_final_model")  # fmt: skip
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and all(r["finite"] for r in a)
    assert [(r["loss"], r["grad_norm"]) for r in b] == [(r["loss"], r["grad_norm"]) for r in a[2:]]
    for part in ("model", "optimizer", "extra/ema"):
        ta, tb = _tensors(full / "checkpoints" / "step-4" / part), _tensors(resumed / "checkpoints" / "step-4" / part)
        assert ta.keys() == tb.keys() and ta, part
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{part} {k}"

    # Each rank holds half of the EMA; gathered, it is the saved pipeline's UNet.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    names, shapes = zip(*[(n, p.shape) for n, p in unet.named_parameters()], strict=True)
    shards = []
    for rank in range(2):
        stored = load_file(str(full / "checkpoints" / "step-4" / "extra" / "ema" / f"rank{rank}.safetensors"))
        shards.append([stored[f"t/shadows/{i}"] for i in range(len(stored))])
    total = sum(t.numel() for s in shards for t in s)
    assert total == sum(p.numel() for p in unet.parameters())
    assert max(sum(t.numel() for t in s) for s in shards) < 0.55 * total
    saved = load_file(str(full / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, tensor in zip(names, _full_from_shards(shards, list(shapes)), strict=True):
        assert torch.equal(saved[name], tensor), name
    raw = {k.split(":", 1)[1]: v for k, v in _tensors(full / "checkpoints" / "step-4" / "model").items()}
    assert any(not torch.equal(saved[n], raw[n]) for n in names if n in raw)
