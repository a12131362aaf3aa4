"""One optimizer step: forward/backward over the micro-batches, clipping, the step's one collective, the
optimizer and schedule updates.

Per optimizer step there is one collective of our own and one host sync: a small all-gather of (loss, grad
norm, stop request, checkpoint due, GPU memory) that gives every rank the same loss, skip decision, signal-stop
decision and periodic-checkpoint decision."""

from __future__ import annotations

import math
import re
import time
import warnings

import torch
import torch.distributed as dist

from sdxl_trainer.training import loss, objective, optimizers
from sdxl_trainer.training.run_log import (
    memory_gib,
)
from sdxl_trainer.training.state import _STOP_SIGNAL, Trainer


def train_step(tr: Trainer, micro_batches: list[dict[str, torch.Tensor]], weight_total: float | None = None) -> dict:
    """One optimizer step over the accumulated micro-batches.

    The loss is the weighted mean over every sample of the step (all micro-batches, all ranks) with the batches'
    `sample_weights` (0 for padding); `weight_total` is their sum over the whole step, from the epoch plan (None:
    every sample of every rank weighs 1).

    FSDP2 reduce-scatters gradients after every micro-step's backward (no `set_requires_gradient_sync(False)`),
    so only sharded gradients are kept between micro-steps (the original kept unsharded ones, B30); on one
    process (`--sharding none`) `after_backward` adds each micro-step's gradient into the fp32 sum.
    """
    dev, scaler, world = tr.info.device, tr.scaler, tr.info.world_size
    if weight_total is None:
        weight_total = float(sum(len(b["sample_weights"]) for b in micro_batches) * world)
    in_backward = getattr(tr.optimizer, "steps_in_backward", False)  # gradient_release.py: steps inside backward
    loss_share = torch.zeros((), device=dev)  # this rank's part of the step's weighted mean loss
    bad_items = 0
    for i, batch in enumerate(micro_batches):
        if in_backward:
            tr.optimizer.arm(last_micro_batch=i == len(micro_batches) - 1)
        bad_items += int(batch["bad"].sum()) if "bad" in batch else 0  # still on the host: no device sync
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        prediction, target = objective.predict(tr.unet, tr.noise_scheduler, batch)
        per_sample = loss.per_sample_loss(
            prediction,
            target,
            batch["timesteps"],
            tr.noise_scheduler,
            element_weights=batch.get("loss_mask"),
            **tr.loss_options,
        )  # --masked_loss: each latent element weighted by the item's cached mask
        micro_loss = loss.reduce_loss(per_sample, batch["sample_weights"], weight_total)
        loss_share += micro_loss.detach()
        scaled = micro_loss * world  # FSDP averages the ranks' gradients; the shares already sum to the mean
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        tr.optimizer.after_backward()

    if in_backward:  # already stepped; only the norm is left to report (summed over the ranks below)
        grad_sq = tr.optimizer.take_grad_sq(dev)
        grad_norm = torch.zeros((), device=dev)
    else:
        tr.optimizer.bind_grads()
        if scaler is not None:
            scaler.unscale_(tr.optimizer)  # before clipping: norm and clip in true units (B3)
        max_norm = tr.args.max_grad_norm if tr.args.max_grad_norm > 0 else math.inf
        grad_norm = optimizers.clip_grad_norm_(tr.optimizer, max_norm, tr.shard_group)  # before the step (B3)
        grad_sq = torch.zeros((), device=dev)

    # The step's one collective and host sync: every rank gets the same loss, norm and stop request. Columns are
    # named so that a new per-rank figure is one more entry here, read back by name below.
    alloc, peak = memory_gib(dev)
    mine_by_name = {
        "loss": loss_share,
        "bad_items": float(bad_items),  # cache items met damaged in this step (trained as weight-0 placeholders)
        "grad_norm": grad_norm.float().to(dev),  # on the CPU with --cpu_offload
        "stop": float(bool(_STOP_SIGNAL)),
        # --checkpointing_minutes: clocks differ per rank, so rank 0's verdict (row 0) decides for all.
        "checkpoint_due": float(_checkpoint_due(tr)),
        "alloc_gib": alloc,
        "peak_gib": peak,
        "grad_sq": grad_sq.to(dev),  # step in backward: this rank's sum of squared gradient shards
    }
    table = _gather_rows(mine_by_name, dev, tr.info.world_size)
    if in_backward:  # every shard group holds the whole gradient once: divide out the replicas
        replicas = tr.info.world_size // dist.get_world_size(tr.shard_group)
        released_norm = math.sqrt(sum(row["grad_sq"] for row in table) / replicas)
        for row in table:
            row["grad_norm"] = released_norm
    loss_value = sum(row["loss"] for row in table)
    finite = math.isfinite(loss_value) and math.isfinite(table[0]["grad_norm"])
    lr = tr.optimizer.param_groups[0]["lr"]

    loss_scale = None
    if scaler is not None:
        loss_scale = float(scaler.get_scale())
        if finite:
            scaler.step(tr.optimizer)  # also skips by itself on inf/nan gradients (found_inf agreed by ranks)
        scaler.update()
    elif finite:
        tr.optimizer.step(bind=False)  # bound above, before unscaling and clipping
    if finite:
        for hook in tr.after_optimizer_step:
            hook()
    tr.optimizer.zero_grad()
    with warnings.catch_warnings():  # a skipped step still advances the schedule, which torch warns about
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        tr.lr_scheduler.step()  # once per optimizer step, on every rank (B4)
    return {
        "loss": loss_value,
        "grad_norm": table[0]["grad_norm"],
        "lr": lr,
        "finite": finite,
        "loss_scale": loss_scale,
        # Prodigy's own estimate after this step (training/prodigy.py): what users of it watch beside the LR
        "prodigy_d": tr.optimizer.param_groups[0]["d"] if tr.args.optimizer == "prodigy" else None,
        "stop": any(row["stop"] > 0 for row in table),
        "checkpoint_due": table[0]["checkpoint_due"] > 0,
        "bad_items": int(sum(row["bad_items"] for row in table)),
        "memory_gib": [(row["alloc_gib"], row["peak_gib"]) for row in table],
    }


def _checkpoint_due(tr: Trainer) -> bool:
    minutes = getattr(tr.args, "checkpointing_minutes", 0)
    return bool(minutes) and time.monotonic() - tr.last_checkpoint_time >= 60.0 * minutes


def _gather_rows(mine_by_name: dict[str, torch.Tensor | float], device: torch.device, world_size: int) -> list[dict]:
    """All-gather one row of named scalars per rank (float64); returns each rank's row as a name -> float dict."""
    names = list(mine_by_name)
    mine = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in mine_by_name.values()]
    )
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return [dict(zip(names, row, strict=True)) for row in torch.stack(gathered).tolist()]
