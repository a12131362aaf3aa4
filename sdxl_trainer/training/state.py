"""What the training loop carries: the run's objects (`Trainer`), the counters a checkpoint stores
(`Progress`), and the stop request set by SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl_trainer.data.sampler import SamplerState
from sdxl_trainer.distributed import DistInfo
from sdxl_trainer.training import data_setup, optimizers
from sdxl_trainer.training.ema import EmaWeights
from sdxl_trainer.training.flat_master import FlatMasterOptimizer
from sdxl_trainer.training.run_log import (
    RunLogger,
    Throughput,
)

_STOP_SIGNAL: list[int] = []  # appended to by the SIGTERM/SIGINT handler, read once per optimizer step


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


@dataclass
class Progress:
    """Counters that go into every checkpoint, next to the sampler state."""

    step: int = 0  # optimizer steps taken (skipped ones included: the LR schedule advances on each)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    images_seen: int = 0  # real samples trained (padding not counted)
    bad_items: int = 0  # damaged cache items met and skipped (each time they were met)
    evaluated_epoch: int = -1  # the last epoch whose evaluation ran
    finished_epoch: int = 0  # the last epoch whose end-of-epoch work (epoch loss, saving) ran
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's per-step losses
    best_validation_loss: float | None = None
    saved_model_step: int = -1  # the step of the last saved pipeline
    evaluated_step: int = -1  # the step whose model the last evaluation saw


@dataclass
class Trainer:
    args: argparse.Namespace
    info: DistInfo
    run_dir: Path
    unet: torch.nn.Module
    noise_scheduler: object
    optimizer: optimizers.LocalShardOptimizer | FlatMasterOptimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: object | None
    data: data_setup.TrainingData
    sampler: SamplerState
    progress: Progress
    log: RunLogger
    evaluator: object | None
    handoff_dir: Path
    config: dict
    shard_group: object  # the process group that shards each tensor (gradient norms are summed over it)
    loss_options: dict = field(default_factory=dict)  # keyword arguments of `loss.per_sample_loss`
    # Called after every optimizer step that updated the weights (e.g. FP8 scales for FSDP's float8 all-gather).
    after_optimizer_step: list = field(default_factory=list)
    run_id: str = ""  # this launch's id (run_folder.new_run_id), in config.json, checkpoints, log and metrics
    lock: object | None = None  # rank 0's run_lock.RunLock on the run folder, released when the run ends
    # Named objects with state_dict()/load_state_dict() saved per rank in every checkpoint (checkpoint.py
    # `extra`): the place where further training state (EMA weights, ...) joins the checkpoints.
    extra_state: dict = field(default_factory=dict)
    weights_checkpoint_step: int = -1  # a checkpoint folder of this step holds exactly the current weights
    checkpoint_pending: bool = False  # a checkpoint is due once the epoch boundary's evaluation has run
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    steps_this_launch: int = 0
    ema: EmaWeights | None = None  # --use_ema
    throughput: Throughput = field(default_factory=Throughput)
    start_time: float = field(default_factory=time.monotonic)


def _request_stop(signum, _frame) -> None:
    _STOP_SIGNAL.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process the usual way
