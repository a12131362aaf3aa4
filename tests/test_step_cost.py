"""Issue 18's cheaper-step levers (training/step_cost_args.py): --adamw_kernel fused is torch's fused AdamW with
the same state as foreach, so it gives the same updates up to rounding order and a checkpoint moves between them."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from sdxl_trainer.training import optimizers, step_cost_args, train_args


def _args(kernel: str) -> argparse.Namespace:
    return argparse.Namespace(optimizer="adamw", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                              adam_epsilon=1e-8, adam_weight_decay=1e-2, adamw_kernel=kernel)  # fmt: skip


def _tensors(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (4096, 300, 17)]


def _steps(opt, params, count: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fused_adamw_matches_foreach_and_takes_its_state():
    foreach_params, fused_params = _tensors(), _tensors()
    foreach = optimizers.inner_factory(_args("foreach"))(foreach_params, [p.numel() for p in foreach_params])
    fused = optimizers.inner_factory(_args("fused"))(fused_params, [p.numel() for p in fused_params])
    assert fused.defaults["fused"] and not foreach.defaults.get("fused")
    _steps(foreach, foreach_params, 5, seed=1)
    _steps(fused, fused_params, 5, seed=1)
    for a, b in zip(foreach_params, fused_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # A foreach checkpoint resumed with the fused kernel continues the same run.
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in foreach_params]
    resumed = optimizers.inner_factory(_args("fused"))(resumed_params, [p.numel() for p in resumed_params])
    resumed.load_state_dict(copy.deepcopy(foreach.state_dict()))  # as read back from a checkpoint
    _steps(foreach, foreach_params, 3, seed=2)
    _steps(resumed, resumed_params, 3, seed=2)
    for a, b in zip(foreach_params, resumed_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_fused_kernel_needs_adamw(tmp_path):
    args = train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), "--optimizer", "adamw",
                                  "--adamw_kernel", "fused"])  # fmt: skip
    assert args.adamw_kernel == "fused"
    # The default (auto) on this CPU-only machine: foreach, the numerics the CPU suite was written against.
    assert train_args.parse_args(["--cached_dataset_dirs", str(tmp_path)]).adamw_kernel == "foreach"
    with pytest.raises(
        train_args.ArgsError, match="--adamw_kernel fused needs --optimizer adamw .* or --optimizer adamw8bit"
    ):
        train_args.validate_args(train_args.build_parser().parse_args(
            ["--cached_dataset_dirs", str(tmp_path), "--adamw_kernel", "fused"]))  # fmt: skip


@pytest.mark.parametrize(
    ("optimizer", "cuda", "cpu_offload", "kernel"),
    [
        ("adamw", True, False, "fused"),  # the fp32 step on the GPU: one kernel instead of ~10 passes
        ("adamw", False, False, "foreach"),  # CPU
        ("adamw", True, True, "foreach"),  # FSDP2's CPU-offloaded step runs on the CPU
        ("adamw8bit", True, False, "foreach"),  # bitsandbytes; the fused 8-bit kernel is chosen by name only
        ("adafactor", True, False, "foreach"),
    ],
)
def test_auto_kernel_is_fused_only_for_adamw_on_the_gpu(optimizer, cuda, cpu_offload, kernel):
    assert step_cost_args.resolve_kernel("auto", optimizer, cuda, cpu_offload) == kernel
    assert step_cost_args.resolve_kernel("foreach", optimizer, cuda, cpu_offload) == "foreach"  # a named kernel stays


@pytest.mark.slow
def test_fused_adamw_steps_fsdp2_shards_on_two_ranks(tiny_model_dir, tmp_path):
    """`auto` gives the fused kernel to --optimizer adamw on GPUs under FSDP2 too, where the parameters are DTensor
    shards: on 2 gloo processes (torch's fused AdamW runs on the CPU as well) it trains as one process does with
    the foreach step and the same global batch."""
    from test_fsdp_multiprocess import two_ranks_and_one_process

    fused, foreach = ["--adamw_kernel", "fused"], ["--adamw_kernel", "foreach"]
    a, b, two = two_ranks_and_one_process(tiny_model_dir, tmp_path, fused, foreach)
    assert json.loads((two / "config.json").read_text())["adamw_kernel"] == "fused"
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=2e-3)
    assert a[-1]["loss"] != a[0]["loss"]  # the weights moved
