"""`--gradient_checkpointing_fraction` (training/partial_checkpointing.py): which transformer blocks are recomputed,
that recomputing fewer of them changes no gradient, that the plan's estimate counts the kept activations, and a run
through the real script."""

from __future__ import annotations

import pytest
import torch
from train_helpers import base_args, read_metrics, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.training import memory_plan, partial_checkpointing, train_args


def test_checkpointed_blocks_are_spread_evenly_over_the_forward_order():
    assert partial_checkpointing.checkpointed_positions(70, 1.0) == set(range(70))
    assert partial_checkpointing.checkpointed_positions(70, 0.0) == set()
    assert partial_checkpointing.checkpointed_positions(70, 0.5) == set(range(1, 70, 2))
    assert partial_checkpointing.checkpointed_positions(10, 0.3) == {3, 6, 9}
    assert len(partial_checkpointing.checkpointed_positions(70, 0.25)) == 18  # round(17.5): banker's rounding up
    with pytest.raises(ValueError, match="--gradient_checkpointing_fraction"):
        partial_checkpointing.checkpointed_positions(70, 1.5)


def _unet():
    from sdxl_trainer.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0).unet.train()


def _grads(fraction: float | None, monkeypatch) -> tuple[dict[str, torch.Tensor], int, int]:
    """Gradients of one forward/backward of the tiny UNet; how many modules were checkpointed; blocks kept."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(type(function.__self__).__name__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    unet = _unet()
    kept = partial_checkpointing.enable(unet, fraction) if fraction is not None else None
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    latents = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 40, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    out = unet(latents, torch.tensor([10, 500]), text, added_cond_kwargs=added).sample
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return grads, len(calls), kept


def test_recomputing_fewer_blocks_changes_no_gradient(monkeypatch):
    reference, none_checkpointed, _ = _grads(None, monkeypatch)
    assert none_checkpointed == 0
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in _unet().modules())
    assert blocks >= 2
    _, all_checkpointed, _ = _grads(1.0, monkeypatch)  # diffusers' resnets (not the mid block's first) and blocks
    for fraction, want_kept in [(1.0, 0), (0.5, blocks - round(blocks / 2)), (0.0, blocks)]:
        grads, checkpointed, kept = _grads(fraction, monkeypatch)
        assert kept == want_kept
        assert checkpointed == all_checkpointed - kept  # resnets stay checkpointed
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_plan_counts_the_kept_activations(tmp_path):
    assert memory_plan.activation_gib_per_image(True, 1.0) == memory_plan.ACTIVATION_GIB_PER_IMAGE[True]
    assert memory_plan.activation_gib_per_image(True, 0.0) == memory_plan.ACTIVATION_GIB_PER_IMAGE[False]
    assert memory_plan.activation_gib_per_image(False, 0.3) == memory_plan.ACTIVATION_GIB_PER_IMAGE[False]
    # A 48 GB card at batch 8: fp32 masters with every block checkpointed fit; keeping half the blocks' activations
    # needs the memory of the fp32 masters, so the plan goes to bf16 weights.
    assert memory_plan.choose("auto", 48, 8)[0] == "balanced"
    assert memory_plan.choose("auto", 48, 8, checkpointed_fraction=0.5)[0] == "lean"
    flags = ["--gpu_memory_gib", "48", "--train_batch_size", "8", "--gradient_checkpointing_fraction", "0.5"]
    args = train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), *flags])
    assert (
        args.memory_plan_chosen == "lean" and "0.5 of the transformer blocks checkpointed" in args.memory_plan_summary
    )


def test_a_fraction_outside_zero_to_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), "--gradient_checkpointing_fraction", "2"])
    assert "--gradient_checkpointing_fraction must be within [0, 1]" in capsys.readouterr().err


def test_a_run_keeping_half_the_blocks_trains_as_one_checkpointing_all(tiny_model_dir, tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", {(64, 64): 4})
    losses = {}
    for fraction in ("1", "0.5"):
        out = tmp_path / f"run_{fraction}"
        extra = ["--gradient_checkpointing", "--gradient_checkpointing_fraction", fraction, "--max_train_steps", "2"]
        assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache, out, *extra)) == 0
        losses[fraction] = [r["loss"] for r in read_metrics(out)]
    assert len(losses["1"]) == 2
    for a, b in zip(losses["1"], losses["0.5"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
