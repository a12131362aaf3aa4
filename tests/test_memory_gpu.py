"""GPU: the memory plans on the tiny model (bf16 stochastic weights on the flat layout with compilation, gradient
release on the flat layout and under FSDP2 with per-layer units): they train, stay finite and keep bf16 weights;
and a resume of the lean_release plan (both layouts, both 8-bit kernels), of lean with the fused 8-bit step and of
lean_state_offload (the state in CPU RAM), on one GPU continues exactly (the rounding stream on the GPU is in the
checkpoint).

    pytest -m gpu tests/test_memory_gpu.py
Full-size figures are bench/bench_memory.py's.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import assert_resume_is_exact, base_args, checkpoint_weights, read_metrics, write_synthetic_cache

import sdxl_fsdp_train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


def _argv(model, cache, out, *extra):
    argv = base_args(model, cache, out, "--mixed_precision", "bf16", "--gpu_memory_gib", "24", *extra)
    argv.remove("--no-gradient_checkpointing")
    i = argv.index("--optimizer")
    del argv[i : i + 2]
    return argv


VARIANTS = {
    "lean": ["--memory_plan", "lean"],
    "lean_fused": ["--memory_plan", "lean", "--adamw_kernel", "fused"],
    "lean_release": ["--memory_plan", "lean_release"],  # the flat layout, its chunks stepped in backward
    "lean_release_fused": ["--memory_plan", "lean_release", "--adamw_kernel", "fused"],
    "lean_release_fsdp": ["--memory_plan", "lean_release", "--sharding", "full_shard"],
    "lean_state_offload": ["--memory_plan", "lean_state_offload"],  # the 8-bit state in pinned CPU RAM
}


@pytest.mark.parametrize("plan", ["lean", "lean_release", "lean_release_fsdp"])
def test_lean_plans_train_on_the_gpu_with_bf16_weights(tiny_model_dir, cache_root, tmp_path, plan):
    out = tmp_path / plan
    extra = [*VARIANTS[plan], "--max_train_steps", "4", "--no-save_final_model", "--compile", "auto"]
    assert sdxl_fsdp_train.main(_argv(tiny_model_dir, cache_root, out, *extra)) == 0
    steps = read_metrics(out)
    assert len(steps) == 4 and all(r["finite"] and r["grad_norm"] > 0 for r in steps)
    (last,) = sorted((out / "checkpoints").glob("step-*"))
    assert {v.dtype for v in checkpoint_weights(last).values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "plan", ["lean_release", "lean_release_fused", "lean_release_fsdp", "lean_fused", "lean_state_offload"]
)
def test_lean_plans_resume_exactly_on_the_gpu(tiny_model_dir, cache_root, tmp_path, plan):
    """lean_release (the step in backward: flat chunks, FSDP2 shards) and the fused 8-bit step (torchao's compiled
    kernel, its rounding stream in the checkpoint)."""
    common = [*VARIANTS[plan], "--max_train_steps", "4", "--checkpointing_steps", "2", "--no-save_final_model"]

    def train(out, *extra):
        assert sdxl_fsdp_train.main(_argv(tiny_model_dir, cache_root, out, *common, *extra)) == 0

    assert_resume_is_exact(train, tmp_path / "full", tmp_path / "resumed")


def test_the_8bit_step_on_a_side_stream_sees_the_gradient_written_there():
    """The step in backward runs on FSDP2's reduce-scatter stream, bitsandbytes launches on the default stream: the
    update must wait for the gradient still being written on the side stream (a race found on the H200), without
    the host waiting (bitsandbytes' own per-tensor synchronize is skipped)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import argparse

    from sdxl_trainer.training import optimizers

    args = argparse.Namespace(optimizer="adamw8bit", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                              adam_epsilon=1e-8, adam_weight_decay=0.0)  # fmt: skip

    def step(on_side_stream: bool) -> torch.Tensor:
        torch.manual_seed(0)
        weight = torch.randn(4096, 4096, device="cuda", requires_grad=True)
        opt = optimizers.inner_factory(args)([weight], [weight.numel()])
        a = torch.randn(4096, 4096, device="cuda")
        torch.cuda.synchronize()
        stream = torch.cuda.Stream() if on_side_stream else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            for _ in range(2):
                weight.grad = (a @ a).div_(4096)  # a slow producer, still running when the step is launched
                opt.step()
        torch.cuda.synchronize()
        return weight.detach().clone()

    torch.testing.assert_close(step(on_side_stream=True), step(on_side_stream=False), rtol=0, atol=0)
