"""Resumes you can trust, through the real script (the tiny model on CPU): a resume from an older checkpoint
replaces the newer trajectory instead of mixing with it, new flags take effect or are refused by name, damaged
checkpoints are skipped, the run folder is locked and never reused by a fresh run, per-run folders do not
collide, and a run ending mid-epoch evaluates its final model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import base_args, read_metrics, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.training import run_lock

pytestmark = pytest.mark.slow
STEPS = 8
COMMON = ["--max_train_steps", str(STEPS), "--checkpointing_steps", "3", "--no-save_final_model",
          "--validation_loss", "--validation_loss_percent", "0.2", "--validation_loss_every_n_epochs", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


@pytest.fixture(scope="module")
def run_a(tiny_model_dir, cache_root, tmp_path_factory) -> Path:
    """8 steps, checkpoints at 3, 6 and 8 (the end), validation loss every epoch."""
    out = tmp_path_factory.mktemp("a") / "run"
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, out, *COMMON)) == 0
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def test_resume_from_an_older_checkpoint_replaces_the_newer_trajectory(tiny_model_dir, cache_root, run_a, tmp_path):
    """Resume from step 3 of a folder that holds steps 6 and 8 of another trajectory (and a new learning rate):
    the newer checkpoints and metrics go aside, step 6 is rewritten whole, and a run resumed from the new step 6
    alone continues exactly as the resumed run did."""
    b = _copy(run_a, tmp_path / "b")
    resume = ["--resume_from_checkpoint", str(b / "checkpoints" / "step-3"), "--learning_rate", "2e-3"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, b, *COMMON, *resume)) == 0
    log = (b / "train.log").read_text()
    assert "changed on resume: --learning_rate 0.001 -> 0.002" in log
    assert "step-6, step-8 (another trajectory) were moved to" in log
    steps = read_metrics(b)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # metrics.jsonl: one trajectory
    assert [r["lr"] for r in steps[3:]] == [2e-3] * (STEPS - 3)  # the new learning rate is used
    assert len({r["run_id"] for r in steps[:3]} | {r["run_id"] for r in steps[3:]}) == 2
    config = json.loads((b / "config.json").read_text())
    assert config["learning_rate"] == 2e-3 and "--learning_rate 0.001 -> 0.002" in config["changed_on_resume"]
    aside = next((b / "set_aside").iterdir())
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-6", "step-8"]
    a_loss, b_loss = _losses(run_a), _losses(b)
    assert [a_loss[s] for s in (1, 2, 3, 4)] == [b_loss[s] for s in (1, 2, 3, 4)]  # step 4 ran on step 3's weights
    assert a_loss[5] != b_loss[5]  # then the trajectories part

    c = tmp_path / "c"
    alone = ["--resume_from_checkpoint", str(b / "checkpoints" / "step-6"), "--learning_rate", "2e-3"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, c, *COMMON, *alone)) == 0
    c_loss = _losses(c)
    assert sorted(c_loss) == [7, 8] and [c_loss[7], c_loss[8]] == [b_loss[7], b_loss[8]]
    # Step 6 ends epoch 1: its checkpoint was written after that epoch's evaluation, which C does not repeat.
    assert [(v["epoch"], v["step"]) for v in read_metrics(c, "validation")] == [(2, STEPS)]


def test_a_fresh_run_into_a_folder_with_checkpoints_stops_and_changes_nothing(
    tiny_model_dir, cache_root, run_a, tmp_path, capsys
):
    d = _copy(run_a, tmp_path / "d")
    before = _tree(d)
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, d, *COMMON)) == 2
    err = capsys.readouterr().err
    assert "--resume_from_checkpoint auto" in err and "--overwrite_output_dir" in err
    assert _tree(d) == before


def test_a_resume_with_another_batch_size_stops_naming_it(tiny_model_dir, cache_root, run_a, tmp_path, capsys):
    e = _copy(run_a, tmp_path / "e")
    before = _tree(e)
    argv = base_args(tiny_model_dir, cache_root, e, *COMMON, "--resume_from_checkpoint", "auto")
    assert sdxl_fsdp_train.main([*argv, "--train_batch_size", "3", "--gradient_accumulation_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--train_batch_size 2 -> 3" in err and "--gradient_accumulation_steps 1 -> 2" in err
    assert _tree(e) == before


def test_damaged_checkpoints_are_named_and_skipped_for_the_previous_one(tiny_model_dir, cache_root, run_a, tmp_path):
    f = _copy(run_a, tmp_path / "f")
    flipped = sorted((f / "checkpoints" / "step-8" / "model").glob("*.safetensors"))[0]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated = sorted((f / "checkpoints" / "step-6" / "model").glob("*.safetensors"))[0]
    truncated.write_bytes(truncated.read_bytes()[:-64])
    argv = base_args(tiny_model_dir, cache_root, f, *COMMON, "--resume_from_checkpoint", "auto")
    assert sdxl_fsdp_train.main(argv) == 0
    log = (f / "train.log").read_text()
    assert f"{flipped} does not match its sha256" in log and f"{truncated} has" in log
    assert f"resumed from {f / 'checkpoints' / 'step-3'}" in log
    a_loss, f_loss = _losses(run_a), _losses(f)
    assert [f_loss[s] for s in range(4, STEPS + 1)] == [a_loss[s] for s in range(4, STEPS + 1)]  # exact resume


def test_a_finished_run_resumed_again_trains_evaluates_and_rewrites_nothing(
    tiny_model_dir, cache_root, run_a, tmp_path
):
    g = _copy(run_a, tmp_path / "g")
    summary, metrics = (g / "summary.json").read_text(), (g / "metrics.jsonl").read_text()
    argv = base_args(tiny_model_dir, cache_root, g, *COMMON, "--resume_from_checkpoint", "auto")
    assert sdxl_fsdp_train.main(argv) == 0
    assert (g / "summary.json").read_text() == summary  # not overwritten with zeros
    assert (g / "metrics.jsonl").read_text() == metrics  # no step and no evaluation repeated
    assert f"checkpoint train state refreshed: {g / 'checkpoints' / f'step-{STEPS}'}" in (g / "train.log").read_text()


def test_the_final_model_is_evaluated_when_the_run_ends_mid_epoch(run_a):
    validations = read_metrics(run_a, "validation")
    assert [(v["epoch"], v["final"]) for v in validations] == [(0, False), (1, False), (2, True)]
    assert validations[1]["step"] < STEPS == validations[2]["step"]  # epoch 1 ended earlier: step 8 is mid-epoch


def test_a_second_trainer_into_a_locked_folder_stops(tiny_model_dir, cache_root, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    lock = run_lock.RunLock(out, "the-first-trainer").acquire()
    try:
        assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, out, *COMMON)) == 2
    finally:
        lock.release()
    assert "another trainer is writing into" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []


def test_two_runs_whose_folders_share_a_name_keep_separate_handoff_and_tensorboard_folders(
    tiny_model_dir, cache_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the old default put TensorBoard under <cwd>/logs/<name>
    configs = []
    for parent in ("x", "y"):
        out = tmp_path / parent / "run"
        # A checkpoint by time after every step: --checkpointing_minutes far below a step's duration.
        argv = base_args(tiny_model_dir, cache_root, out, "--max_train_steps", "2", "--no-save_final_model",
                         "--checkpointing_minutes", "1e-9")  # fmt: skip
        i = argv.index("--log_dir")
        del argv[i : i + 2]
        assert sdxl_fsdp_train.main(argv) == 0
        configs.append(json.loads((out / "config.json").read_text()))
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert configs[0]["handoff_dir_used"] != configs[1]["handoff_dir_used"]
    assert configs[0]["tensorboard_dir"] != configs[1]["tensorboard_dir"]


def test_non_finite_weights_are_never_saved(tiny_model_dir, cache_root, tmp_path, monkeypatch, capsys):
    from sdxl_trainer.training import loop

    real_step = loop.train_step

    def poisoning_step(tr, *rest, **kwargs):
        result = real_step(tr, *rest, **kwargs)
        tr.optimizer.locals[0].data.view(-1)[0] = float("nan")  # e.g. an update that overflowed a weight
        return result

    monkeypatch.setattr(loop, "train_step", poisoning_step)
    out = tmp_path / "nan"
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, out, "--max_train_steps", "2")) == 2
    assert "non-finite values; nothing was saved" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
