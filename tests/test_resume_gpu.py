"""GPU: resumes restore optimizer state onto its parameters' devices (the tiny model, one GPU, in this process).

    pytest -m gpu tests/test_resume_gpu.py -s
`--cpu_offload --optimizer adamw` keeps parameters and AdamW state on the CPU: a resume used to put the state's
`step` tensors on the GPU and fail at the first step. Without offload, CUDA `step` tensors made torch's AdamW
read each one back to the host at every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import base_args, read_metrics, write_synthetic_cache

import sdxl_fsdp_train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


def _gpu_args(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    argv = base_args(model, cache, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--no-save_final_model", "--mixed_precision", "bf16", *extra)  # fmt: skip
    return argv


@needs_gpu
def test_cpu_offload_adamw_resumes_exactly(tiny_model_dir, cache_root, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    offload = ("--cpu_offload", "--optimizer", "adamw")
    assert sdxl_fsdp_train.main(_gpu_args(tiny_model_dir, cache_root, full, *offload)) == 0
    start = full / "checkpoints" / "step-2"
    argv = _gpu_args(tiny_model_dir, cache_root, resumed, *offload, "--resume_from_checkpoint", str(start))
    assert sdxl_fsdp_train.main(argv) == 0
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in b] == [r["loss"] for r in a[2:]]


@needs_gpu
@pytest.mark.parametrize("sharding", ["none", "full_shard"])
def test_resumed_adamw_state_sits_on_its_parameters_devices(tiny_model_dir, cache_root, tmp_path, sharding):
    from sdxl_trainer.distributed import cleanup
    from sdxl_trainer.training import setup, train_args

    first = tmp_path / "first"
    common = ("--optimizer", "adamw", "--sharding", sharding)
    assert sdxl_fsdp_train.main(_gpu_args(tiny_model_dir, cache_root, first, *common)) == 0
    argv = _gpu_args(tiny_model_dir, cache_root, tmp_path / "second", *common,
                     "--resume_from_checkpoint", str(first / "checkpoints" / "step-2"))  # fmt: skip
    tr = setup.setup(train_args.parse_args(argv))
    try:
        states = list(tr.optimizer.inner.state.items())
        assert states
        for param, state in states:
            assert state["exp_avg"].device == param.device and state["exp_avg"].device.type == "cuda"
            assert state["step"].device.type == "cpu"  # as in a fresh run: no host sync per tensor per step
    finally:
        tr.log.close()
        setup.release_run_folder(tr.run_dir)
        cleanup()
