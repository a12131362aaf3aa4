"""What a run tells its user: a plain log file, TensorBoard (the original's tags, fixed), a JSON-lines metrics
file, a tqdm bar on the main process, the resolved config and a final summary. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

# The original's TensorBoard tags (seed_reference.md §3.11), the stray parenthesis fixed (B34).
TAG_VRAM = "Performance/GPU VRAM Usage/rank{rank}"
TAG_VRAM_PEAK = "Performance/GPU VRAM Peak/rank{rank}"
TAG_IMGS_PER_SEC = "Performance/imgs per sec, per update_step"
TAG_LOSS = "Loss/gradient_update, per update_step"
TAG_LR = "Performance/Learning Rate, per update_step"
TAG_EPOCH_LOSS = "Loss/epoch"
TAG_STEPS_PER_EPOCH = "Performance/steps per epoch"
TAG_UPDATES_PER_EPOCH = "Performance/update_steps per epoch"
TAG_VALIDATION_LOSS = "Validation/loss (epoch)"
# Added.
TAG_GRAD_NORM = "Performance/gradient norm, per update_step"
TAG_LOSS_SCALE = "Performance/loss scale, per update_step"
TAG_PRODIGY_D = "Performance/Prodigy D (the step size the learning rate multiplies), per update_step"
TAG_SKIPPED = "Performance/skipped steps (non-finite)"

logger = logging.getLogger("sdxl_trainer")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0: INFO to stdout and `<run_dir>/train.log`. Other ranks: warnings only, prefixed with the rank."""
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)


def write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(allocated, peak allocated) GiB of this process's GPU; zeros on CPU."""
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30


class RunLogger:
    """TensorBoard + metrics.jsonl + tqdm, all on rank 0; every call is a no-op elsewhere."""

    def __init__(
        self,
        enabled: bool,
        run_dir: Path,
        tb_dir: Path,
        total_steps: int,
        initial_step: int,
        run_id: str = "",
        report_to: tuple[str, ...] | list[str] = ("tensorboard",),
        wandb_settings: dict | None = None,
    ):
        """A resume (`initial_step` > 0) hides TensorBoard events of later steps written by an earlier launch
        (`purge_step`); metrics.jsonl has already been cut at the checkpoint (run_folder.prepare_resume).
        `report_to`: tensorboard and/or wandb; `tb` fans out to each (`wandb_log.Writers`). `wandb_settings`:
        keyword arguments of `wandb_log.WandbWriter` (project, mode, config)."""
        self.enabled = enabled
        self.run_id = run_id
        self.metrics_lines = 0  # lines in metrics.jsonl: recorded in checkpoints, to cut the file on a resume
        self.last_memory: list[tuple[float, float]] = []  # (allocated, peak) GiB per rank, latest step
        self.tb = None
        self.bar = None
        self.metrics_file = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        from sdxl_trainer.training import wandb_log

        writers: list = []
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir.mkdir(parents=True, exist_ok=True)
            writers.append(SummaryWriter(str(tb_dir), purge_step=initial_step + 1 if initial_step else None))
        if "wandb" in report_to:
            wandb_writer = wandb_log.WandbWriter(run_dir, **(wandb_settings or {}))
            logger.info(f"Weights & Biases: run {wandb_writer.run.id}, {wandb_writer.mode} mode")
            if wandb_writer.mode == "offline":
                logger.info(f"W&B is offline: upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
            writers.append(wandb_writer)
        self.tb = wandb_log.Writers(writers)
        metrics = run_dir / "metrics.jsonl"
        self.metrics_lines = len(metrics.read_bytes().splitlines()) if metrics.is_file() else 0
        self.metrics_file = open(metrics, "a", encoding="utf-8")  # noqa: SIM115
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="optimizer steps", dynamic_ncols=True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def record(self, record: dict) -> None:
        """One JSON line per event (optimizer step, validation, epoch end): what tests and users can parse."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({**record, "run_id": self.run_id}) + "\n")
            self.metrics_file.flush()
            self.metrics_lines += 1

    def step(self, step: int, loss: float, lr: float, grad_norm: float, imgs_per_sec: float, **extra) -> None:
        if not self.enabled:
            return
        self.scalar(TAG_LOSS, loss, step)
        self.scalar(TAG_LR, lr, step)
        self.scalar(TAG_GRAD_NORM, grad_norm, step)
        self.scalar(TAG_IMGS_PER_SEC, imgs_per_sec, step)
        if extra.get("loss_scale") is not None:
            self.scalar(TAG_LOSS_SCALE, extra["loss_scale"], step)
        if extra.get("prodigy_d") is not None:
            self.scalar(TAG_PRODIGY_D, extra["prodigy_d"], step)
        self.last_memory = extra.pop("memory_gib", [])
        for rank, (alloc, peak) in enumerate(self.last_memory):
            if alloc or peak:
                self.scalar(TAG_VRAM.format(rank=rank), alloc, step)
                self.scalar(TAG_VRAM_PEAK.format(rank=rank), peak, step)
        self.record(
            {
                "event": "step",
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "imgs_per_sec": imgs_per_sec,
                **extra,
            }
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", imgs_s=f"{imgs_per_sec:.2f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


class Throughput:
    """Images per second over wall-clock time, all GPUs together, excluding evaluation pauses."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._window_images = 0
        self._window_start = time.perf_counter()

    def resume(self) -> None:
        self._window_start = time.perf_counter()
        self._window_images = 0

    def add(self, images: int) -> float:
        """Count images of one optimizer step; return images/s since the previous call."""
        now = time.perf_counter()
        dt = max(now - self._window_start, 1e-9)
        self._window_images += images
        rate = self._window_images / dt
        self.images += self._window_images
        self.seconds += dt
        self._window_start, self._window_images = now, 0
        return rate

    @property
    def average(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0
