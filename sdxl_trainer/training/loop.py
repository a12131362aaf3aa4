"""The training loop: `main()` calls `setup()` (`training.setup`, everything built in order), then `train()`
runs the epochs and calls evaluation, saving and checkpoints through explicit `if` lines; each optimizer step
is `training.step.train_step()`. No per-step barriers, `gc.collect` or `empty_cache` (B28).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

import torch

from sdxl_trainer.data import dataset, sampler
from sdxl_trainer.distributed import barrier, cleanup
from sdxl_trainer.training import checkpoint as ckpt
from sdxl_trainer.training import checkpoint_integrity as integrity
from sdxl_trainer.training import ema, saving, validation
from sdxl_trainer.training.resume_check import ResumeMismatchError
from sdxl_trainer.training.run_folder import RunFolderError
from sdxl_trainer.training.run_lock import RunLockError
from sdxl_trainer.training.run_log import (
    TAG_EPOCH_LOSS,
    TAG_SKIPPED,
    TAG_STEPS_PER_EPOCH,
    TAG_UPDATES_PER_EPOCH,
    logger,
    write_json,
)
from sdxl_trainer.training.setup import release_run_folder, setup
from sdxl_trainer.training.state import _STOP_SIGNAL, Trainer, TrainingError
from sdxl_trainer.training.step import train_step

# Refusals at start, before anything is changed: the entry script prints them as one message.
REFUSALS = (RunFolderError, RunLockError, ResumeMismatchError, ckpt.CheckpointError)


def save_model(tr: Trainer, name: str) -> None:
    """Gather the full UNet to rank 0 only (collective); rank 0 writes the pipeline and the single file. With
    --use_ema the pipeline holds the EMA weights (unless --no-ema_for_eval); --save_both_weights adds the other."""
    bad = integrity.count_nonfinite(integrity.master_tensors(tr.optimizer, tr.unet))
    if bad:
        raise TrainingError(
            f"the weights at step {tr.progress.step} hold non-finite values: the {name} pipeline was NOT saved; "
            "resume from an earlier checkpoint with a lower --learning_rate"
        )
    tr.progress.saved_model_step = tr.progress.step
    a = tr.args
    versions = [(name, tr.ema is not None and a.ema_for_eval)]
    if tr.ema is not None and a.save_both_weights:
        versions.append((f"{name}-non_ema" if a.ema_for_eval else f"{name}-ema", not a.ema_for_eval))
    for folder, use_ema in versions:
        full = ema.full_state_dict(tr.optimizer, tr.unet, tr.ema, use_ema)
        if tr.info.is_main_process:
            out = saving.save_pipeline(
                a.pretrained_model_name_or_path, full, tr.run_dir / folder, a.weight_dtype, a.prediction_type,
                a.zero_terminal_snr, vae=a.vae,
            )  # fmt: skip
            logger.info(f"saved the {a.weight_dtype} pipeline ({'EMA' if use_ema else 'trained'} weights) to {out}")
            if a.save_single_file:
                logger.info(f"saved the single-file checkpoint {saving.save_single_file(out, a.weight_dtype)}")
        del full
    barrier()


def save_checkpoint(tr: Trainer) -> Path:
    """Write `step-<N>`; when that folder already holds these very weights (written or loaded by this process at
    this step), only its train state is renewed and the log says so."""
    p = tr.progress
    state = {
        "step": p.step,
        "progress": vars(p),
        "sampler": tr.sampler.to_json(tr.data.training),
        "validation_uids": sorted(e.uid for e in tr.data.validation),
        "run_id": tr.run_id,
        "metrics_lines": tr.log.metrics_lines,  # a resume from here cuts metrics.jsonl back to this length
    }
    refresh = tr.weights_checkpoint_step == p.step
    path = ckpt.save_checkpoint(
        tr.run_dir, p.step, tr.info, tr.unet, tr.optimizer, tr.lr_scheduler, tr.scaler, state, tr.config,
        tr.args.checkpoints_total_limit, refresh_only=refresh, extra=tr.extra_state,
    )  # fmt: skip
    tr.weights_checkpoint_step, tr.checkpoint_pending = p.step, False
    tr.last_checkpoint_time = time.monotonic()
    logger.info(f"checkpoint {'train state refreshed' if refresh else 'written'}: {path}")
    return path


def _end_of_epoch(tr: Trainer, epoch: int) -> None:
    a, p = tr.args, tr.progress
    if p.epoch_losses:
        tr.log.scalar(TAG_EPOCH_LOSS, sum(p.epoch_losses) / len(p.epoch_losses), epoch)
    tr.log.scalar(TAG_UPDATES_PER_EPOCH, len(p.epoch_losses), epoch)
    tr.log.scalar(TAG_STEPS_PER_EPOCH, len(p.epoch_losses) * a.gradient_accumulation_steps, epoch)
    p.epoch_losses, p.finished_epoch = [], epoch
    if epoch >= a.start_save_model_epoch and epoch % a.save_model_every_n_epochs == 0:
        save_model(tr, f"epoch-{epoch}")
        tr.checkpoint_pending |= a.save_state  # written after this epoch's evaluation (train())


def _after_step(tr: Trainer, result: dict, epoch: int) -> bool:
    """Bookkeeping, logging and checkpoints after an optimizer step. Returns False to stop training."""
    a, p = tr.args, tr.progress
    rate = tr.throughput.add(tr.data.global_batch * a.gradient_accumulation_steps)
    if result["finite"]:
        p.nonfinite_in_a_row = 0
        p.epoch_losses.append(result["loss"])
    else:
        p.skipped_steps += 1
        p.nonfinite_in_a_row += 1
        tr.log.scalar(TAG_SKIPPED, p.skipped_steps, p.step)
        logger.warning(f"step {p.step}: non-finite loss {result['loss']} or gradient norm; the update was skipped")
    if result.get("bad_items"):
        p.bad_items += result["bad_items"]
        logger.warning(
            f"step {p.step}: {result['bad_items']} damaged cache items skipped ({p.bad_items} so far; named above); "
            "repair them with sdxl_process_data_dir.py --verify_hashes"
        )
    tr.log.step(
        p.step, result["loss"], result["lr"], result["grad_norm"], rate, epoch=epoch, finite=result["finite"],
        loss_scale=result["loss_scale"], memory_gib=result["memory_gib"], prodigy_d=result["prodigy_d"],
    )  # fmt: skip
    if p.nonfinite_in_a_row >= a.max_nonfinite_steps:
        save_checkpoint(tr)
        raise TrainingError(
            f"{p.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient (limit "
            f"--max_nonfinite_steps {a.max_nonfinite_steps}): lower --learning_rate, use --mixed_precision bf16 or "
            "check the data. A checkpoint of the current state was written."
        )
    if result["stop"]:
        path = save_checkpoint(tr)
        logger.warning(f"stopped by a signal at step {p.step}; continue with --resume_from_checkpoint auto ({path})")
        return False
    if (a.checkpointing_steps and p.step % a.checkpointing_steps == 0) or result["checkpoint_due"]:
        if tr.sampler.position == 0:  # the epoch's last step: written after the epoch's evaluation, which a
            tr.checkpoint_pending = True  # resume from this checkpoint then does not repeat (train())
        else:
            save_checkpoint(tr)
    return p.step < tr.data.total_steps


def _run_epoch(tr: Trainer) -> bool:
    """Train the current epoch from the sampler's position. Returns False when training must stop."""
    a, s, info = tr.args, tr.sampler, tr.info
    last = tr.data.num_epochs is not None and s.epoch == tr.data.num_epochs  # remainders are trained, not carried
    plan = sampler.plan_epoch(
        [e.bucket_wh for e in tr.data.training], s.carried_in, s.deferred_in, tr.data.global_batch,
        a.gradient_accumulation_steps, a.set_seed, s.epoch, last,
    )  # fmt: skip
    weights = [sum(sampler.sample_weight(x) for x in gb) for gb in plan.batches]  # real samples per global batch
    mine = [
        [(i, e, sampler.sample_weight((i, e))) for i, e in sampler.rank_slice(gb, info.rank, a.train_batch_size)]
        for gb in plan.batches
    ]
    loader = dataset.make_loader(
        tr.data.dataset, mine[s.position :], a.dataloader_num_workers, info.device.type == "cuda"
    )
    next_epoch = sampler.SamplerState(s.epoch + 1, 0, plan.leftovers, plan.deferred)
    if not plan.batches:  # an epoch too small for one optimizer step: everything moves on to the next
        tr.sampler = next_epoch
        return True
    tr.throughput.resume()
    pending: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        pending.append(batch)
        if len(pending) < a.gradient_accumulation_steps:
            continue
        weight_total = sum(weights[s.position : s.position + a.gradient_accumulation_steps])
        result = train_step(tr, pending, weight_total)
        pending = []
        s.position += a.gradient_accumulation_steps
        tr.progress.step += 1
        tr.steps_this_launch += 1
        if tr.ema is not None:
            tr.ema.update(tr.progress.step)  # after every optimizer step (a skipped one left the weights as they were)
        tr.progress.images_seen += int(weight_total)
        if s.position == len(plan.batches):  # the epoch's last step: the data position moves on before any save
            tr.sampler = next_epoch
        if not _after_step(tr, result, s.epoch):
            return False
    return True


def _finished(tr: Trainer) -> bool:
    if tr.progress.step >= tr.data.total_steps:
        return True
    return tr.data.num_epochs is not None and tr.sampler.epoch > tr.data.num_epochs


def train(tr: Trainer) -> dict:
    """Epochs, with the end-of-epoch work and the evaluation of the model so far (epoch 0 = the base model)
    at each epoch boundary. Epoch boundaries always fall between optimizer steps (see `sampler.plan_epoch`)."""
    completed = True
    while True:
        done_epochs = tr.sampler.epoch - 1
        if tr.sampler.position == 0:
            if done_epochs > tr.progress.finished_epoch:
                _end_of_epoch(tr, done_epochs)
            if done_epochs > tr.progress.evaluated_epoch:
                validation.evaluate(tr, done_epochs)
            if tr.checkpoint_pending:
                save_checkpoint(tr)
        if _finished(tr):
            break
        if not _run_epoch(tr) and tr.progress.step < tr.data.total_steps:
            completed = False
            break
    if completed and tr.sampler.position != 0 and tr.progress.evaluated_step != tr.progress.step:
        # --max_train_steps ended mid-epoch: the final model is evaluated too (the epoch's partial number).
        validation.evaluate(tr, tr.sampler.epoch, final=True)
    if completed:
        save_checkpoint(tr)
        if tr.args.save_final_model and tr.progress.saved_model_step != tr.progress.step:
            save_model(tr, "final")
        elif tr.args.save_final_model and tr.info.is_main_process:  # same weights: link instead of a second copy
            saving.link_final(tr.run_dir, f"epoch-{tr.progress.finished_epoch}")
    return summarize(tr, completed)


def summarize(tr: Trainer, completed: bool) -> dict:
    p = tr.progress
    previous = tr.run_dir / "summary.json"
    if tr.steps_this_launch == 0 and completed and previous.is_file():
        # A re-run of a finished job: nothing was trained, so the summary of the run that did it stays.
        logger.info(f"the run was already complete at step {p.step}; {previous} is kept")
        return json.loads(previous.read_text(encoding="utf-8"))
    summary = {
        "completed": completed,
        "stopped_by_signal": bool(_STOP_SIGNAL),
        "optimizer_steps": p.step,
        "planned_optimizer_steps": tr.data.total_steps,
        "epochs_finished": tr.sampler.epoch - 1,
        "images_seen": p.images_seen,
        "skipped_steps": p.skipped_steps,
        "bad_items_skipped": p.bad_items,
        "average_images_per_second": tr.throughput.average,
        "wall_seconds": time.monotonic() - tr.start_time,
        "best_validation_loss": p.best_validation_loss,
        "world_size": tr.info.world_size,
        "run_id": tr.run_id,
        "peak_gpu_memory_gib_per_rank": [peak for _, peak in tr.log.last_memory]
        if tr.info.device.type == "cuda"
        else None,
    }
    if tr.info.is_main_process:
        write_json(tr.run_dir / "summary.json", summary)
        if tr.log.tb is not None:
            tr.log.tb.summary(summary)  # TensorBoard: a text; W&B: the run's summary fields
        logger.info(f"run summary: {summary}")
    return summary


def main(args: argparse.Namespace) -> dict:
    """Run one training job in this process (under a launcher or alone) and return its summary."""
    _STOP_SIGNAL.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        tr = setup(args)
        try:
            return train(tr)
        finally:
            tr.log.close()
            if tr.info.is_main_process:
                saving.remove_handoff(tr.handoff_dir)
                release_run_folder(tr.run_dir)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup()
