"""`--adamw_kernel fused` with `--optimizer adamw8bit` over bf16 weights (training/fused_adamw8bit.py): it follows
AdamW, its state round-trips exactly through plain tensors, it is refused where it cannot run, and a lean run
through the script resumes exactly and refuses to continue with the other kernel's state."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from train_helpers import assert_resume_is_exact, base_args, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.training import fused_adamw8bit, optimizers, tensorwise, train_args


def _args(**kw) -> argparse.Namespace:
    base = dict(optimizer="adamw8bit", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                adam_weight_decay=1e-2, adamw_kernel="fused")  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _fit(make, steps: int = 60) -> tuple[torch.Tensor, list[float]]:
    """Fit bf16 weights to a target with optimizer `make(weights, numels)`; returns the weights and the losses."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(64 * 256, generator=g)
    w = torch.nn.Parameter(torch.zeros(64 * 256, dtype=torch.bfloat16))
    opt = make([w], [w.numel()])
    losses = []
    torch.manual_seed(1)
    for _ in range(steps):
        diff = w.detach().float() - target
        losses.append(float(diff.square().mean()))
        w.grad = (2 * diff / diff.numel() * 1e3).bfloat16()
        opt.step()
    return w.detach().float(), losses


def test_the_fused_step_follows_adamw_with_8bit_state_and_bf16_weights():
    fused_w, fused_losses = _fit(fused_adamw8bit.factory(_args(learning_rate=0.05)))
    bnb = tensorwise.factory(optimizers.inner_factory(_args(adamw_kernel="foreach")), 0.05, True,
                             torch.Generator().manual_seed(2))  # fmt: skip
    bnb_w, bnb_losses = _fit(bnb)
    assert fused_losses[-1] < 0.2 * fused_losses[0]  # it trains
    assert fused_losses[-1] == pytest.approx(bnb_losses[-1], rel=0.15)  # as the bitsandbytes step does
    assert (fused_w - bnb_w).abs().mean() < 0.05 * (bnb_w.abs().mean())
    opt = fused_adamw8bit.factory(_args())([torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(300).bfloat16()],
                                           [4096, 300])  # fmt: skip
    assert opt.eight_bit == [True, False]  # small tensors keep fp32 moments, as bitsandbytes decides


def test_the_state_round_trips_through_plain_tensors_and_continues_exactly():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(4096).bfloat16()), torch.nn.Parameter(torch.randn(300).bfloat16())]
    a = fused_adamw8bit.factory(_args(), torch.Generator().manual_seed(3))(weights, [4096, 300])
    for w in weights:
        w.grad = torch.randn_like(w)
    a.step()
    saved = copy.deepcopy(a.state_dict())
    tensors = [v for chunk in saved["chunks"] for v in chunk.values()]
    assert all(isinstance(v, (torch.Tensor, dict)) for v in tensors)
    assert saved["chunks"][0]["exp_avg"]["codes"].dtype == torch.uint8  # 8-bit codes and block scales
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    for c, w in zip(copies, weights, strict=True):
        c.grad = w.grad.clone()
    b = fused_adamw8bit.factory(_args(), torch.Generator())(copies, [4096, 300])
    b.load_state_dict(saved)
    b.generator.set_state(a.generator.get_state())  # the rounding stream, as the checkpoint's RNG file restores it
    global_rng = torch.get_rng_state()
    a.step()
    assert torch.equal(torch.get_rng_state(), global_rng)  # the step leaves the global RNG alone
    b.step()
    for w, c in zip(weights, copies, strict=True):
        assert torch.equal(w, c)


def test_the_fused_8bit_step_needs_bf16_weights(tmp_path):
    base = ["--cached_dataset_dirs", str(tmp_path), "--adamw_kernel", "fused", "--optimizer", "adamw8bit"]
    with pytest.raises(train_args.ArgsError, match="--master_weights bf16_stochastic"):
        train_args.validate_args(train_args.build_parser().parse_args([*base, "--master_weights", "fp32"]))
    args = train_args.parse_args([*base, "--memory_plan", "lean", "--mixed_precision", "bf16"])
    assert fused_adamw8bit.chosen(args)


def _argv(model, cache, out, *extra):
    lean = ["--mixed_precision", "bf16", "--memory_plan", "lean", "--checkpointing_steps", "2"]
    argv = base_args(model, cache, out, *lean, "--max_train_steps", "4", "--no-save_final_model", *extra)
    argv.remove("--no-gradient_checkpointing")
    i = argv.index("--optimizer")
    del argv[i : i + 2]
    return argv


def test_a_lean_run_with_the_fused_step_resumes_exactly_and_keeps_its_kernel(tiny_model_dir, tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "cache", {(64, 64): 8})

    def train(out, *extra):
        assert sdxl_fsdp_train.main(_argv(tiny_model_dir, cache, out, "--adamw_kernel", "fused", *extra)) == 0

    full = tmp_path / "full"
    a, wa = assert_resume_is_exact(train, full, tmp_path / "resumed")
    assert len(a) == 4 and all(r["finite"] for r in a)
    assert {v.dtype for v in wa.values()} == {torch.bfloat16}
    # The bitsandbytes step cannot continue the fused kernel's state: refused, naming the flag.
    other, start = tmp_path / "other", ["--resume_from_checkpoint", str(full / "checkpoints" / "step-2")]
    assert sdxl_fsdp_train.main(_argv(tiny_model_dir, cache, other, *start)) != 0
    assert "--adamw_kernel" in capsys.readouterr().err
