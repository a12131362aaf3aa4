"""Exact resume across a real multi-process run: N steps uninterrupted vs N/2, stop, resume to N.

Runs the trainer on the tiny model and a small random cache under torchrun with --nproc processes (NCCL on
GPUs, gloo on CPU) and compares the per-step losses and the final weights of the two runs. Prints one JSON
line; exit code 1 when they differ.

    python bench/multi_gpu_resume.py --nproc 2 [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import write_cache  # noqa: E402

from sdxl_trainer.models.tiny import TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION, save_tiny_sdxl_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def train(work: Path, out: Path, nproc: int, max_steps: int, resume: bool) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "sdxl_fsdp_train.py"), "--pretrained_model_name_or_path", str(work / "model"),
        "--cached_dataset_dirs", str(work / "cache"), "--output_dir", str(out), "--log_dir", str(work / "logs"),
        "--train_batch_size", "2", "--max_train_steps", str(max_steps), "--checkpointing_steps", "1",
        "--optimizer", "adamw8bit", "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
        "--mixed_precision", "bf16" if torch.cuda.is_available() else "no", "--save_final_model",
    ]  # fmt: skip
    if resume:
        cmd += ["--resume_from_checkpoint", "auto"]
    subprocess.run(cmd, check=True, cwd=REPO)


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resume_"))
    save_tiny_sdxl_pipeline(work / "model")
    write_cache(work / "cache" / "tiny", 32, [(64, 64), (64, 96)], context_dim=TE1_HIDDEN + TE2_HIDDEN,
                pooled_dim=TE2_PROJECTION)  # fmt: skip
    train(work, work / "straight", args.nproc, args.steps, resume=False)
    train(work, work / "stopped", args.nproc, args.steps // 2, resume=False)
    train(work, work / "stopped", args.nproc, args.steps, resume=True)
    a, b = losses(work / "straight"), losses(work / "stopped")
    wa = load_file(str(work / "straight" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(work / "stopped" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    result = dict(nproc=args.nproc, steps=args.steps, losses_straight=a, losses_resumed=b,
                  identical_losses=a == b, identical_final_weights=same_weights)  # fmt: skip
    print(json.dumps(result), flush=True)
    sys.exit(0 if a == b and same_weights else 1)


if __name__ == "__main__":
    main()
