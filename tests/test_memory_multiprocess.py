"""Stop + resume under the leanest GPU-resident memory plan (`lean_release`: the lean plan's bf16 weights with
stochastic rounding, AdamW8bit and checkpointing, plus the optimizer step in backward) with 2 gloo processes,
FULL_SHARD (what `lean` also is on several processes): the resumed run continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fsdp_multiprocess import _same_checkpoint, _torchrun, _wait
from train_helpers import base_args, read_metrics, write_synthetic_cache

pytestmark = pytest.mark.slow


def _lean_argv(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    argv = base_args(model, cache, out, "--memory_plan", "lean_release", "--mixed_precision", "bf16",
                     "--train_batch_size", "1", "--max_train_steps", "3", "--checkpointing_steps", "2",
                     "--no-save_final_model", "--learning_rate_scheduler", "cosine", *extra)  # fmt: skip
    # base_args fixes the optimizer and checkpointing; the plan must choose them here.
    argv.remove("--no-gradient_checkpointing")
    i = argv.index("--optimizer")
    del argv[i : i + 2]
    i = argv.index("--mixed_precision")  # base_args' own "no"; ours (bf16) comes later
    del argv[i : i + 2]
    return argv


def test_stop_and_resume_under_the_lean_plan_is_exact_on_two_ranks(tmp_path, tiny_model_dir):
    cache = write_synthetic_cache(tmp_path / "cache" / "ds", {(64, 64): 10, (64, 96): 8}).parent
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _wait(_torchrun(_lean_argv(tiny_model_dir, cache, full), tmp_path / "full.log"), tmp_path / "full.log")
    config = json.loads((full / "config.json").read_text())
    assert config["memory_plan_chosen"] == "lean_release" and config["sharding"] == "full_shard"
    assert config["master_weights"] == "bf16_stochastic" and config["optimizer_step_in_backward"] is True
    assert config["gradient_checkpointing"] is True and config["optimizer"] == "adamw8bit"

    start = full / "checkpoints" / "step-2"
    argv = _lean_argv(tiny_model_dir, cache, resumed, "--resume_from_checkpoint", str(start))
    _wait(_torchrun(argv, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in b] == [3]
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in b] == [(r["loss"], r["lr"], r["grad_norm"]) for r in a[2:]]
    assert all(r["grad_norm"] > 0 for r in a)  # measured in backward, summed over the ranks
    _same_checkpoint(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")  # bf16 weights, 8-bit state
