"""The run folder holds one run's story: what happens to an earlier run's files before a run starts in it.

* A fresh run (no resume) into a folder with checkpoints stops: continuing needs `--resume_from_checkpoint auto`,
  starting over needs `--overwrite_output_dir` (which deletes the earlier run's checkpoints, logs and models).
  An earlier run's logs without checkpoints (it died before its first checkpoint) are moved aside.
* A resume from step K moves the folder's checkpoints newer than K, and the metrics written after step K's
  checkpoint, into `set_aside/after-step-K-<run id>/`, so `auto`, `--checkpoints_total_limit` and metrics.jsonl
  see one trajectory only. A resume into another folder moves that folder's own earlier logs aside as well.
* Every launch has a run id (UTC time + random), recorded in config.json, train_state.json, the log and every
  metrics record.
Only rank 0 calls these functions; they return lines for the log (logging starts after them).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import shutil
from pathlib import Path

from sdxl_trainer.training import checkpoint as ckpt

METRICS = "metrics.jsonl"
RUN_LOG_FILES = (METRICS, "train.log", "summary.json", "config.json", "validation_items.txt")
SET_ASIDE = "set_aside"
TENSORBOARD = "tensorboard"
# What --overwrite_output_dir deletes: only what the trainer itself writes into a run folder.
TRAINER_OUTPUTS = ("checkpoints", TENSORBOARD, "samples", "validation_images", "handoff", SET_ASIDE, *RUN_LOG_FILES)
TRAINER_OUTPUT_GLOBS = ("epoch-*", "final", "final.safetensors")


class RunFolderError(RuntimeError):
    """The run folder holds another run's work; the message names the flags that decide what to do."""


def new_run_id() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def path_tag(run_dir: Path) -> str:
    """A short tag of the run folder's full path: two folders with the same last name get different tags."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:10]


def default_tensorboard_dir(run_dir: Path, log_dir: str | None) -> Path:
    """TensorBoard under the run folder (as diffusers' scripts do); --log_dir: `<log_dir>/<run folder name>`."""
    return Path(log_dir) / Path(run_dir).name if log_dir else Path(run_dir) / TENSORBOARD


def _move(src: Path, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest_dir / src.name)


def prepare_fresh(run_dir: Path, overwrite: bool, run_id: str) -> list[str]:
    """Before a fresh run: refuse a folder with checkpoints unless --overwrite_output_dir; returns log lines."""
    steps = ckpt.step_folders(run_dir)
    if steps and not overwrite:
        raise RunFolderError(
            f"--output_dir {run_dir} already holds checkpoints (newest {steps[-1][1].name}) of an earlier run. "
            "Continue it with --resume_from_checkpoint auto, or start over with --overwrite_output_dir (which "
            "deletes that run's checkpoints, logs and saved models); nothing was changed."
        )
    notes = []
    if overwrite:
        doomed = [run_dir / n for n in TRAINER_OUTPUTS] + [p for g in TRAINER_OUTPUT_GLOBS for p in run_dir.glob(g)]
        gone = []
        for path in doomed:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            gone.append(path.name)
        if gone:
            notes.append(f"--overwrite_output_dir: deleted the earlier run's {', '.join(sorted(gone))} in {run_dir}")
        return notes
    old = [run_dir / n for n in (*RUN_LOG_FILES, TENSORBOARD) if (run_dir / n).exists()]
    if old:
        aside = run_dir / SET_ASIDE / f"before-run-{run_id}"
        for path in old:
            _move(path, aside)
        notes.append(f"an earlier run's {', '.join(p.name for p in old)} (no checkpoints) moved to {aside}")
    return notes


def prepare_resume(run_dir: Path, checkpoint: Path, state: dict, run_id: str) -> list[str]:
    """Before resuming from `checkpoint` (at step K) into `run_dir`: set aside what does not belong to the
    resumed trajectory. Returns log lines."""
    step = int(state["step"])
    aside = run_dir / SET_ASIDE / f"after-step-{step}-{run_id}"
    notes = []
    newer = [path for s, path in ckpt.step_folders(run_dir) if s > step]
    for path in newer:
        _move(path, aside / "checkpoints")
    if newer:
        notes.append(
            f"resuming from step {step}: the newer checkpoints {', '.join(p.name for p in newer)} (another "
            f"trajectory) were moved to {aside / 'checkpoints'}"
        )
    same_folder = Path(checkpoint).resolve().parent.parent == Path(run_dir).resolve()
    metrics = run_dir / METRICS
    if same_folder and metrics.is_file() and state.get("metrics_lines") is not None:
        # Keep the records written before this checkpoint; later ones belong to the abandoned continuation.
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
        keep, rest = lines[: state["metrics_lines"]], lines[state["metrics_lines"] :]
        if rest:
            aside.mkdir(parents=True, exist_ok=True)
            (aside / METRICS).write_text("".join(rest), encoding="utf-8")
            tmp = metrics.with_name(f".{METRICS}.tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, metrics)
            notes.append(f"{len(rest)} metrics records written after step {step}'s checkpoint moved to {aside}")
        if (run_dir / "summary.json").is_file() and (newer or rest):
            _move(run_dir / "summary.json", aside)
    elif not same_folder:
        old = [run_dir / n for n in (*RUN_LOG_FILES, TENSORBOARD) if (run_dir / n).exists()]
        for path in old:
            _move(path, aside)
        if old:
            notes.append(f"this folder's earlier {', '.join(p.name for p in old)} (another run) moved to {aside}")
    return notes
