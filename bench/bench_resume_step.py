"""Step time after a resume against the same steps of an uninterrupted run (issue 15, point 4).

A resume used to restore AdamW's `step` counters onto the GPU, which made torch's AdamW read each one back to the
host at every optimizer step (one sync per tensor: 52 against 13 ms per step was measured). The tiny model under
FSDP2 (`--sharding full_shard`, one tensor per parameter) makes that per-tensor cost visible. Also checks that the
resumed losses equal the uninterrupted run's. Prints one JSON line.

    python bench/bench_resume_step.py            # one GPU, under a minute
    python bench/bench_resume_step.py --smoke    # CPU, checks the script runs (no speed meaning)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import write_cache  # noqa: E402

from sdxl_trainer.models.tiny import TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION, save_tiny_sdxl_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 2


def train(work: Path, out: Path, steps: int, every: int, resume: Path | None, gpu: bool, extra: list[str]) -> None:
    cmd = [
        sys.executable, str(REPO / "sdxl_fsdp_train.py"), "--pretrained_model_name_or_path", str(work / "model"),
        "--cached_dataset_dirs", str(work / "cache"), "--output_dir", str(out), "--train_batch_size", str(BATCH),
        "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
        "--learning_rate", "1e-4", "--dataloader_num_workers", "2", "--no-save_final_model",
        "--mixed_precision", "bf16" if gpu else "no", "--no-gradient_checkpointing", *extra,
    ]  # fmt: skip
    if resume is not None:
        cmd += ["--resume_from_checkpoint", str(resume)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def step_records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r.get("event") == "step"}


def ms(records: dict[int, dict], timed: range) -> float:
    """Median milliseconds per optimizer step over the timed steps."""
    return statistics.median(1000.0 * BATCH / records[s]["imgs_per_sec"] for s in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, a few steps: checks the script runs")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    steps, start = (12, 4) if args.smoke else (80, 20)
    work = Path(tempfile.mkdtemp(prefix="resume_step_"))
    save_tiny_sdxl_pipeline(work / "model")
    write_cache(work / "cache" / "tiny", 64, [(64, 64), (64, 96)], context_dim=TE1_HIDDEN + TE2_HIDDEN,
                pooled_dim=TE2_PROJECTION)  # fmt: skip
    for optimizer in ("adamw", "adamw8bit") if gpu else ("adamw",):
        extra = ["--sharding", "full_shard", "--optimizer", optimizer, "--compile", "none"]
        straight, resumed = work / f"straight-{optimizer}", work / f"resumed-{optimizer}"
        train(work, straight, steps, start, None, gpu, extra)
        train(work, resumed, steps, start, straight / "checkpoints" / f"step-{start}", gpu, extra)
        a, b = step_records(straight), step_records(resumed)
        timed = range(start + 10 if not args.smoke else start + 2, steps + 1)  # after the resumed run warms up
        result = {
            "bench": "resume_step_time", "device": torch.cuda.get_device_name() if gpu else "cpu",
            "optimizer": optimizer, "sharding": "full_shard", "steps_timed": len(timed),
            "uninterrupted_ms_per_step": round(ms(a, timed), 2), "resumed_ms_per_step": round(ms(b, timed), 2),
            "resumed_over_uninterrupted": round(ms(b, timed) / ms(a, timed), 3),
            "identical_losses": [a[s]["loss"] for s in range(start + 1, steps + 1)]
            == [b[s]["loss"] for s in range(start + 1, steps + 1)],
        }  # fmt: skip
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
