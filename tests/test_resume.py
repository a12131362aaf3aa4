"""Trustworthy checkpoints and resumes, in pieces: the resume rules, checkpoint manifests, the run-folder lock and
what happens to an earlier run's files (the whole trainer: test_resume_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sdxl_trainer.training import checkpoint, resume_check, run_folder, run_lock, train_args
from sdxl_trainer.training import checkpoint_integrity as integrity


def test_every_trainer_flag_has_a_resume_rule():
    rules = resume_check.all_rules(train_args._flag_modules())
    assert resume_check.unclassified(train_args.build_parser(), rules) == []
    assert rules["train_batch_size"] == rules["gradient_accumulation_steps"] == rules["set_seed"] == "must_match"
    assert rules["learning_rate"] == rules["max_grad_norm"] == rules["num_train_epochs"] == "may_change"


def test_a_flag_module_without_a_rule_is_caught():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--train_batch_size")
    parser.add_argument("--brand_new_flag")
    assert resume_check.unclassified(parser, resume_check.CORE_RULES) == ["brand_new_flag"]
    with pytest.raises(ValueError, match="brand_new_flag"):
        resume_check.all_rules([SimpleNamespace(__name__="m", RESUME_RULES={"brand_new_flag": "maybe"})])


def test_compare_splits_must_match_from_may_change():
    rules = {"train_batch_size": "must_match", "learning_rate": "may_change", "later_flag": "must_match"}
    old = {"train_batch_size": 2, "learning_rate": 1e-4, "world_size": 2}
    new = {"train_batch_size": 3, "learning_rate": 1e-3, "later_flag": 5, "world_size": 1}
    must, may = resume_check.compare(old, new, rules, {"later_flag": 5})  # not recorded = its default
    assert must == ["--train_batch_size 2 -> 3", "world_size (the number of processes (the optimizer state is per "
                    "rank)): 2 -> 1"]  # fmt: skip
    assert may == ["--learning_rate 0.0001 -> 0.001"]


def _adamw_and_schedule(lr: float, total: int = 10):
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    linear = lambda s: s / 2 if s < 2 else max(0.0, (total - s) / (total - 2))  # noqa: E731 - diffusers' "linear"
    return param, opt, torch.optim.lr_scheduler.LambdaLR(opt, linear)


def test_new_hyperparameters_replace_the_restored_ones_and_unchanged_ones_are_exact():
    param, opt, sched = _adamw_and_schedule(1e-4)
    for _ in range(4):
        param.grad = torch.ones(3)
        opt.step()
        sched.step()
    saved_opt, saved_sched, lr_before = opt.state_dict(), sched.state_dict(), opt.param_groups[0]["lr"]

    def resumed(**flags):
        base = dict(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.01,
                    optimizer="adamw")  # fmt: skip
        base.update(flags)
        _, opt2, sched2 = _adamw_and_schedule(base["learning_rate"])
        opt2.load_state_dict(saved_opt)
        sched2.load_state_dict(saved_sched)
        resume_check.apply_to_optimizer(SimpleNamespace(**base), opt2.param_groups, sched2)
        return opt2, sched2

    same, _ = resumed()
    assert same.param_groups[0]["lr"] == lr_before  # bit for bit
    changed, sched = resumed(learning_rate=1e-3, adam_beta2=0.99, adam_weight_decay=0.0)
    group = changed.param_groups[0]
    assert group["lr"] == pytest.approx(10 * lr_before) and group["betas"] == (0.9, 0.99)
    assert group["weight_decay"] == 0.0
    sched.step()  # the schedule continues from the new base lr
    assert changed.param_groups[0]["lr"] == pytest.approx(1e-3 * (10 - 5) / (10 - 2))


def _checkpoint_folder(root, step: int):
    folder = root / "checkpoints" / f"step-{step}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "shard.safetensors").write_bytes(os.urandom(4096))
    (folder / checkpoint.TRAIN_STATE).write_text(json.dumps({"step": step}))
    integrity.write_manifest(folder)
    return folder


def test_a_manifest_names_flipped_truncated_missing_and_extra_files(tmp_path):
    folder = _checkpoint_folder(tmp_path, 1)
    assert integrity.verify_checkpoint(folder) == []
    shard = folder / "model" / "shard.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert integrity.verify_checkpoint(folder) == [f"{shard} does not match its sha256 (changed on disk)"]
    shard.write_bytes(bytes(data[:1000]))
    assert (
        "truncated" in integrity.verify_checkpoint(folder)[0] and str(shard) in integrity.verify_checkpoint(folder)[0]
    )
    shard.unlink()
    (folder / "stray.bin").write_bytes(b"x")
    problems = integrity.verify_checkpoint(folder)
    assert problems == [f"{shard} is missing", f"{folder / 'stray.bin'} is not in the manifest"]
    (folder / integrity.MANIFEST).unlink()
    assert "manifest.json is missing" in integrity.verify_checkpoint(folder)[0]


def test_auto_skips_damaged_checkpoints_and_an_explicit_damaged_one_is_an_error(tmp_path):
    good = _checkpoint_folder(tmp_path, 3)
    bad = _checkpoint_folder(tmp_path, 6)
    with open(bad / "model" / "shard.safetensors", "r+b") as f:
        f.truncate(10)
    (tmp_path / "checkpoints" / "step-9").mkdir()  # incomplete
    path, notes = checkpoint.choose_resume_checkpoint("auto", tmp_path)
    assert path == good
    assert "step-9 is incomplete" in notes[0] and "step-6 is damaged" in notes[1] and "truncated" in notes[1]
    with pytest.raises(checkpoint.CheckpointError, match="step-6 is damaged"):
        checkpoint.choose_resume_checkpoint(str(bad), tmp_path)
    with open(good / "model" / "shard.safetensors", "r+b") as f:
        f.write(b"\0\1\2")
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint"):
        checkpoint.choose_resume_checkpoint("auto", tmp_path)


def test_nonfinite_values_are_counted():
    assert integrity.count_nonfinite([torch.ones(3), torch.zeros(2, dtype=torch.int64)]) == 0
    assert integrity.count_nonfinite([torch.tensor([1.0, float("nan"), float("inf")]), torch.ones(2)]) == 2


def test_a_second_lock_on_a_run_folder_is_refused_and_released_locks_are_free(tmp_path):
    first = run_lock.RunLock(tmp_path, "run-a").acquire()
    with pytest.raises(run_lock.RunLockError, match=f"pid {os.getpid()}.*run run-a"):
        run_lock.RunLock(tmp_path, "run-b").acquire()
    first.release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    run_lock.RunLock(tmp_path, "run-c").acquire().release()


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path):
    code = (
        "import os, pathlib; from sdxl_trainer.training import run_lock; "
        f"run_lock.RunLock(pathlib.Path({str(tmp_path)!r}), 'dead').acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert (tmp_path / run_lock.LOCK_FILE).exists()  # left behind by a process that died holding it
    lock = run_lock.RunLock(tmp_path, "alive").acquire()
    assert lock.previous_holder["run_id"] == "dead"
    lock.release()


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_and_changes_nothing(tmp_path):
    _checkpoint_folder(tmp_path, 4)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(run_folder.RunFolderError, match="--resume_from_checkpoint auto.*--overwrite_output_dir"):
        run_folder.prepare_fresh(tmp_path, overwrite=False, run_id="r")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    (tmp_path / "epoch-1").mkdir()
    (tmp_path / "mine.txt").write_text("the user's own file")
    notes = run_folder.prepare_fresh(tmp_path, overwrite=True, run_id="r")
    assert "checkpoints" in notes[0] and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_logs_of_a_run_without_checkpoints_are_moved_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "train.log").write_text("old\n")
    (tmp_path / "tensorboard").mkdir()
    notes = run_folder.prepare_fresh(tmp_path, overwrite=False, run_id="r2")
    aside = tmp_path / "set_aside" / "before-run-r2"
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "tensorboard", "train.log"]
    assert str(aside) in notes[0]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_sets_newer_checkpoints_and_later_metrics_aside(tmp_path):
    three = _checkpoint_folder(tmp_path, 3)
    _checkpoint_folder(tmp_path, 6)
    _checkpoint_folder(tmp_path, 1)
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(1, 7)))
    notes = run_folder.prepare_resume(tmp_path, three, {"step": 3, "metrics_lines": 3}, "rid")
    aside = tmp_path / "set_aside" / "after-step-3-rid"
    assert [s for s, _ in checkpoint.step_folders(tmp_path)] == [1, 3]
    assert (aside / "checkpoints" / "step-6" / integrity.MANIFEST).is_file()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert (aside / "metrics.jsonl").read_text().count("\n") == 3
    assert "step-6" in notes[0] and "3 metrics records" in notes[1]


def test_two_run_folders_with_one_name_get_different_tags(tmp_path):
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert run_folder.path_tag(a) != run_folder.path_tag(b)
    assert run_folder.default_tensorboard_dir(a, None) == a / "tensorboard"
    assert str(run_folder.default_tensorboard_dir(a, "/logs")) == "/logs/run"


class _Counter:
    """A stand-in for extra training state (e.g. EMA weights)."""

    def __init__(self, value: float):
        self.tensor = torch.full((3,), value)

    def state_dict(self) -> dict:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        self.tensor = state["tensor"]


def _tiny_training_objects(seed: int):
    from types import SimpleNamespace as NS

    from sdxl_trainer.training import optimizers
    from sdxl_trainer.training.flat_master import FlatMasterOptimizer

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    args = NS(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.0)
    optimizer = FlatMasterOptimizer(model, "adamw", optimizers._torch_adamw_factory(args), None, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer.inner, lambda s: 1.0)
    return model, optimizer, schedule


@pytest.fixture
def one_process():
    from sdxl_trainer.distributed import cleanup, init_distributed

    yield init_distributed(use_gpu=False)
    cleanup()


def test_a_step_written_again_is_replaced_whole_and_extra_state_round_trips(tmp_path, one_process):
    info = one_process
    model, optimizer, schedule = _tiny_training_objects(0)
    state, config = {"step": 5, "progress": {}}, {"learning_rate": 1e-3}
    folder = checkpoint.save_checkpoint(tmp_path, 5, info, model, optimizer, schedule, None, state, config,
                                        extra={"ema": _Counter(1.0)})  # fmt: skip
    assert integrity.verify_checkpoint(folder) == []
    # Another trajectory writes step 5 again: nothing of the first write survives.
    other, other_opt, other_schedule = _tiny_training_objects(1)
    checkpoint.save_checkpoint(tmp_path, 5, info, other, other_opt, other_schedule, None, state, config,
                               extra={"ema": _Counter(2.0)})  # fmt: skip
    assert integrity.verify_checkpoint(folder) == [] and not list((tmp_path / "checkpoints").glob(".*"))
    fresh, fresh_opt, fresh_schedule = _tiny_training_objects(2)
    ema = _Counter(0.0)
    checkpoint.load_checkpoint(folder, info, fresh, fresh_opt, fresh_schedule, None, {"ema": ema})
    assert torch.equal(fresh_opt.master, other_opt.master) and torch.equal(ema.tensor, torch.full((3,), 2.0))
    # A refresh renews only the train state: the tensor files are the same inodes, the manifest still holds.
    shard = next((folder / "model").glob("*.safetensors"))
    inode = shard.stat().st_ino
    checkpoint.save_checkpoint(tmp_path, 5, info, other, other_opt, other_schedule, None, {**state, "x": 1}, config,
                               refresh_only=True)  # fmt: skip
    assert shard.stat().st_ino == inode and json.loads((folder / checkpoint.TRAIN_STATE).read_text())["x"] == 1
    assert integrity.verify_checkpoint(folder) == []
    # Refreshed again with a train state of the same size: the manifest holds the new bytes' hash, not the old.
    checkpoint.save_checkpoint(tmp_path, 5, info, other, other_opt, other_schedule, None, {**state, "x": 2}, config,
                               refresh_only=True)  # fmt: skip
    assert integrity.verify_checkpoint(folder) == []
    # Non-finite weights are refused, loudly, and nothing is written.
    other_opt.master[0] = float("inf")
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        checkpoint.save_checkpoint(tmp_path, 6, info, other, other_opt, other_schedule, None, state, config)
    assert [s for s, _ in checkpoint.step_folders(tmp_path)] == [5]


def test_a_step_left_half_replaced_by_a_crash_gets_its_complete_copy_back(tmp_path):
    old = _checkpoint_folder(tmp_path, 4)
    os.replace(old, old.with_name(".replaced-step-4"))  # killed between the two renames of _swap_in
    assert checkpoint.recover_interrupted_swaps(tmp_path) == [
        "step-4: restored the copy left by a write interrupted while replacing it"
    ]
    assert checkpoint.choose_resume_checkpoint("auto", tmp_path) == (old, [])
