"""The optimizer step inside backward (FSDP2, one process): the same weights as the ordinary step for AdamW
without clipping, also with gradient accumulation; bf16 stochastic weights through the trainer on both layouts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import base_args, read_metrics, write_synthetic_cache

import sdxl_fsdp_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


def _weights(run) -> dict[str, torch.Tensor]:
    (step_dir,) = sorted((run / "checkpoints").glob("step-*"))
    out = {}
    for f in sorted((step_dir / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_the_step_in_backward_gives_the_ordinary_steps_weights(tiny_model_dir, cache_root, tmp_path):
    """AdamW, no clipping, accumulation 2 (the hooks step in the second micro-batch's backward only); the released
    run also uses per-layer FSDP units, which must not change the numbers either."""
    common = ["--max_train_steps", "3", "--no-save_final_model", "--sharding", "full_shard", "--max_grad_norm", "0",
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
