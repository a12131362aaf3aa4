"""The optimizer step inside backward (FSDP2, one process): the same weights as the ordinary step for AdamW
without clipping, also with gradient accumulation; bf16 stochastic weights through the trainer on both layouts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from train_helpers import assert_resume_is_exact, base_args, checkpoint_weights, read_metrics, write_synthetic_cache

import sdxl_fsdp_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


def _weights(run) -> dict[str, torch.Tensor]:
    (step_dir,) = sorted((run / "checkpoints").glob("step-*"))
    return checkpoint_weights(step_dir)


@pytest.mark.parametrize("sharding", ["full_shard", "none"])
def test_the_step_in_backward_gives_the_ordinary_steps_weights(tiny_model_dir, cache_root, tmp_path, sharding):
    """AdamW, no clipping, accumulation 2 (the hooks step in the second micro-batch's backward only); under FSDP2 the
    released run also uses per-layer FSDP units, which must not change the numbers either. `none`: the flat layout,
    stepping its chunks in backward."""
    common = ["--max_train_steps", "3", "--no-save_final_model", "--sharding", sharding, "--max_grad_norm", "0",
              "--gradient_accumulation_steps", "2", "--fsdp_units", "blocks"]  # fmt: skip
    ordinary, released = tmp_path / "ordinary", tmp_path / "released"
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, ordinary, *common)) == 0
    flags = [*common, "--optimizer_step_in_backward", "--fsdp_units", "layers"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, released, *flags)) == 0
    a, b = read_metrics(ordinary), read_metrics(released)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)
    wa, wb = _weights(ordinary), _weights(released)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)
    assert json.loads((released / "config.json").read_text())["optimizer_step_in_backward"] is True
    if sharding == "none":
        assert "--sharding none" in (released / "train.log").read_text()
        return
    units = [int(re.search(r"'fsdp_units': (\d+)", (run / "train.log").read_text())[1]) for run in (ordinary, released)]
    assert units[1] > units[0] + 4  # blocks + the root; then also every transformer layer and resnet


@pytest.mark.parametrize("sharding", ["none", "full_shard"])
def test_bf16_stochastic_weights_train_and_save_bf16(tiny_model_dir, cache_root, tmp_path, sharding):
    out = tmp_path / sharding
    flags = ["--max_train_steps", "3", "--no-save_final_model", "--mixed_precision", "bf16", "--sharding", sharding,
             "--master_weights", "bf16_stochastic", "--optimizer", "adamw8bit"]  # fmt: skip
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, out, *flags)) == 0
    steps = read_metrics(out)
    assert len(steps) == 3 and all(r["finite"] and r["grad_norm"] > 0 for r in steps)
    weights = _weights(out)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}  # no fp32 master anywhere


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_the_lean_step_in_backward_on_one_process_resumes_exactly(tiny_model_dir, cache_root, tmp_path, kernel):
    """The lean_release plan's recipe on the flat layout (bf16 weights with stochastic rounding, AdamW8bit stepped per
    chunk in backward), with bitsandbytes' step or the fused one: stop at step 2, resume, the same losses, gradient
    norms and bits as the uninterrupted run."""
    flags = ["--max_train_steps", "4", "--no-save_final_model", "--mixed_precision", "bf16", "--sharding", "none",
             "--memory_plan", "lean_release", "--optimizer", "adamw8bit", "--adamw_kernel", kernel,
             "--checkpointing_steps", "2", "--gradient_checkpointing"]  # fmt: skip

    def train(out, *extra):
        assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, out, *flags, *extra)) == 0

    full = tmp_path / "full"
    a, weights = assert_resume_is_exact(train, full, tmp_path / "resumed")
    assert len(a) == 4 and all(r["finite"] and r["grad_norm"] > 0 for r in a)
    config = json.loads((full / "config.json").read_text())
    assert config["optimizer_step_in_backward"] and config["sharding"] == "none" and config["max_grad_norm"] == 0
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
