"""`--optimizer prodigy` (training/prodigy.py): the update of the prodigyopt library, its flags and refusals, the
plan's choice for it, an exact resume, and one step size for all ranks under FSDP2 (2 gloo processes)."""

from __future__ import annotations

import json

import prodigyopt
import pytest
import torch
from train_helpers import assert_resume_is_exact, base_args, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.training import memory_plan, train_args
from sdxl_trainer.training.checkpoint import load_structured
from sdxl_trainer.training.prodigy import Prodigy

PRODIGY = ["--optimizer", "prodigy", "--learning_rate", "1.0"]


def _pull_toward(params: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    for p, t in zip(params, targets, strict=True):
        p.grad = 2 * (p - t)


@pytest.mark.parametrize(
    ("options", "steps", "growth"),
    [({}, 12, 100), ({"use_bias_correction": True, "safeguard_warmup": True, "d_coef": 2.0}, 30, 10)],
    ids=["default", "options"],
)
def test_the_update_is_the_librarys(options, steps, growth):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    targets = [torch.randn(s, generator=g) for s in shapes]
    ours = [torch.randn(s, generator=g) for s in shapes]
    theirs = [p.clone() for p in ours]
    a = Prodigy(ours, lr=1.0, weight_decay=0.01, **options)
    b = prodigyopt.Prodigy(theirs, lr=1.0, weight_decay=0.01, **options)
    for _ in range(steps):  # until D has grown from its 1e-6 start: the estimate is exercised, not just Adam
        for params, opt in ((ours, a), (theirs, b)):
            _pull_toward(params, targets)
            opt.step()
    assert a.param_groups[0]["d"] == pytest.approx(b.param_groups[0]["d"], rel=1e-6)
    assert a.param_groups[0]["d"] > growth * a.param_groups[0]["d0"]
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_a_zero_learning_rate_step_moves_nothing_and_keeps_the_estimate():
    params = [torch.ones(8)]
    opt = Prodigy(params, lr=1.0)
    opt.param_groups[0]["lr"] = 0.0  # the first step of a warm-up from zero
    _pull_toward(params, [torch.zeros(8)])
    opt.step()
    assert torch.equal(params[0], torch.ones(8)) and opt.param_groups[0]["k"] == 0


def _validate(tmp_path, *extra):
    argv = ["--cached_dataset_dirs", str(tmp_path), *extra]
    return train_args.validate_args(train_args.build_parser().parse_args(argv))


def test_flags_and_refusals(tmp_path):
    args = _validate(tmp_path, *PRODIGY, "--prodigy_d_coef", "0.5", "--prodigy_safeguard_warmup")
    assert args.optimizer == "prodigy" and args.prodigy_d_coef == 0.5 and args.prodigy_safeguard_warmup
    with pytest.raises(train_args.ArgsError, match="--learning_rate 1.0"):
        _validate(tmp_path, "--optimizer", "prodigy", "--learning_rate", "3e-5")  # an AdamW rate by mistake
    with pytest.raises(train_args.ArgsError, match="--prodigy_d_coef"):
        _validate(tmp_path, *PRODIGY, "--prodigy_d_coef", "0")
    with pytest.raises(train_args.ArgsError, match="bf16_stochastic"):
        _validate(tmp_path, *PRODIGY, "--master_weights", "bf16_stochastic", "--mixed_precision", "bf16")
    with pytest.raises(train_args.ArgsError, match="--optimizer_step_in_backward"):
        _validate(tmp_path, *PRODIGY, "--optimizer_step_in_backward", "--max_grad_norm", "0")


def test_the_plan_never_steps_prodigy_tensor_by_tensor():
    # On a 24 GiB card AdamW8bit gets bf16 weights and the step in backward; Prodigy's 16 bytes of state per
    # parameter fit only with FSDP2's CPU offload, and a whole-model step.
    name, recipe, _ = memory_plan.choose("auto", 24, 8, fixed={"optimizer": "prodigy"})
    assert name == "offload" and not memory_plan.steps_tensor_by_tensor(recipe)
    name, recipe, estimate = memory_plan.choose("auto", 141, 8, fixed={"optimizer": "prodigy"})
    assert name == "fast" and recipe.optimizer == "prodigy" and estimate < 141 * memory_plan.USABLE_FRACTION
    assert memory_plan.estimate_gib(recipe, 8) > memory_plan.estimate_gib(memory_plan.RUNGS["fast"], 8)


def test_a_prodigy_run_learns_and_resumes_exactly(tiny_model_dir, tmp_path):
    """Flat one-process layout: the step-size estimate lives in the optimizer state's groups (D, its numerator,
    the step count) and comes back from the checkpoint, so the resumed steps are bit for bit the same."""
    cache = write_synthetic_cache(tmp_path / "cache", {(64, 64): 8})

    def train(out, *extra):
        argv = base_args(tiny_model_dir, cache, out, *PRODIGY, "--max_train_steps", "4", "--checkpointing_steps", "2",
                         "--no-save_final_model", "--lr_warmup_steps", "0", *extra)  # fmt: skip
        assert sdxl_fsdp_train.main(argv) == 0

    full = tmp_path / "full"
    steps, _ = assert_resume_is_exact(train, full, tmp_path / "resumed")
    assert len(steps) == 4 and all(r["finite"] for r in steps)
    group = _prodigy_group(full / "checkpoints" / "step-4", rank=0)
    assert group["k"] == 4 and group["d_numerator"] > 0  # the estimate's statistics are in the checkpoint
    assert steps[-1]["prodigy_d"] == group["d"]  # logged at every step (metrics and TensorBoard)


def _prodigy_group(checkpoint, rank: int) -> dict:
    return load_structured(checkpoint / "optimizer" / f"rank{rank}")["state"]["param_groups"][0]


@pytest.mark.slow
def test_two_ranks_share_one_step_size(tiny_model_dir, tmp_path):
    """FSDP2 on 2 gloo processes: each rank sums its shards' statistics and the ranks add them up, so they train
    as one process with the same global batch (per-rank estimates would differ from it)."""
    from test_fsdp_multiprocess import two_ranks_and_one_process

    flags = [*PRODIGY, "--lr_warmup_steps", "0", "--checkpointing_steps", "3"]
    a, b, two = two_ranks_and_one_process(tiny_model_dir, tmp_path, flags, flags)
    assert json.loads((two / "config.json").read_text())["optimizer"] == "prodigy"
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=2e-3)
    one = _prodigy_group(tmp_path / "one" / "checkpoints" / "step-3", rank=0)
    for rank in (0, 1):  # each rank's shards alone would give another numerator, as would each other's
        group = _prodigy_group(two / "checkpoints" / "step-3", rank)
        assert group["k"] == 3 and group["d_numerator"] == pytest.approx(one["d_numerator"], rel=1e-4)
        assert group["d"] == pytest.approx(one["d"], rel=1e-6)
