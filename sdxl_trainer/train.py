"""The training loop: `setup()` builds everything in order, `train()` runs the epochs and calls evaluation,
saving and checkpoints through explicit `if` lines, `train_step()` does one optimizer step (all micro-steps).

Per optimizer step there is one collective of our own and one host sync: a small all-gather of (loss, grad
norm, stop request, GPU memory) that gives every rank the same loss, skip decision and signal-stop decision.
No per-step barriers, `gc.collect` or `empty_cache` (B28).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sdxl_trainer import checkpoint as ckpt
from sdxl_trainer import (
    compiling,
    data,
    diffusion,
    lr_schedule,
    models,
    optim,
    parallel,
    saving,
    train_data,
    validation,
)
from sdxl_trainer.distributed import DistInfo, barrier, cleanup, init_distributed
from sdxl_trainer.flat_master import FlatMasterOptimizer
from sdxl_trainer.log import (
    TAG_EPOCH_LOSS,
    TAG_SKIPPED,
    TAG_STEPS_PER_EPOCH,
    TAG_UPDATES_PER_EPOCH,
    RunLogger,
    Throughput,
    logger,
    memory_gib,
    setup_logging,
    write_json,
)
from sdxl_trainer.train_args import run_name

_STOP_SIGNAL: list[int] = []  # appended to by the SIGTERM/SIGINT handler, read once per optimizer step


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


@dataclass
class Progress:
    """Counters that go into every checkpoint, next to the sampler state."""

    step: int = 0  # optimizer steps taken (skipped ones included: the LR schedule advances on each)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    images_seen: int = 0
    evaluated_epoch: int = -1  # the last epoch whose evaluation ran
    finished_epoch: int = 0  # the last epoch whose end-of-epoch work (epoch loss, saving) ran
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's per-step losses
    best_validation_loss: float | None = None
    saved_model_step: int = -1  # the step of the last saved pipeline


@dataclass
class Trainer:
    args: argparse.Namespace
    info: DistInfo
    run_dir: Path
    unet: torch.nn.Module
    noise_scheduler: object
    optimizer: optim.LocalShardOptimizer | FlatMasterOptimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: object | None
    data: train_data.TrainingData
    sampler: data.SamplerState
    progress: Progress
    log: RunLogger
    evaluator: object | None
    handoff_dir: Path
    config: dict
    shard_group: object  # the process group that shards each tensor (gradient norms are summed over it)
    throughput: Throughput = field(default_factory=Throughput)
    start_time: float = field(default_factory=time.monotonic)


# ------------------------------------------------------------------------------------------ setup


def _request_stop(signum, _frame) -> None:
    _STOP_SIGNAL.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process the usual way


def _make_run_dir(args: argparse.Namespace, info: DistInfo) -> Path:
    out = Path(args.output_dir) if args.output_dir else Path("output") / run_name(args, info.world_size)
    if info.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out.resolve()


def setup(args: argparse.Namespace) -> Trainer:
    """Everything the loop needs, in execution order."""
    models.set_single_file_config(args.single_file_config)
    info = init_distributed()
    torch.manual_seed(data.mix_seed(args.set_seed, "rank", info.rank))  # distinct global streams per rank (B31)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = _make_run_dir(args, info)
    setup_logging(run_dir, info.rank)
    for flag in getattr(args, "ignored_flags", []):
        logger.warning(f"{flag} is ignored: caching (and re-caching) is done by sdxl_process_data_dir.py")
    resume_path = ckpt.find_resume_checkpoint(args.resume_from_checkpoint, run_dir)
    resume_state = json.loads((resume_path / ckpt.TRAIN_STATE).read_text()) if resume_path else None

    noise_scheduler = models.load_noise_scheduler(args.pretrained_model_name_or_path)
    td = train_data.build_training_data(args, info, noise_scheduler.config.num_train_timesteps, resume_state)

    try:
        args.sharding = parallel.resolve_strategy(args.sharding, info, args.cpu_offload)
    except parallel.ShardingError as exc:
        raise TrainingError(str(exc)) from exc
    mesh = parallel.build_mesh(args.sharding, info)
    if args.sharding == "none":
        unet = parallel.build_single_process_unet(
            args.pretrained_model_name_or_path, args.gradient_checkpointing, load_base_weights=resume_path is None
        )
        compute = parallel.COMPUTE_DTYPES[args.mixed_precision]
        optimizer = FlatMasterOptimizer(unet, args.optimizer, optim.inner_factory(args), compute, info.device)
        elements = optimizer.master.numel()
        shards = {"parameters": len(optimizer.params), "local_elements": elements, "global_elements": elements}
    else:
        unet = parallel.build_sharded_unet(
            args.pretrained_model_name_or_path, info, mesh, args.sharding, args.mixed_precision,
            args.gradient_checkpointing, load_base_weights=resume_path is None, cpu_offload=args.cpu_offload,
        )  # fmt: skip
        shards = parallel.verify_sharding(unet, mesh, args.sharding)  # refuses to train if sharding is not in effect
        optimizer = optim.build_optimizer(args, list(unet.parameters()))
    # Lazy: each block compiles at its first forward; dynamic spatial sizes let the buckets share graphs.
    args.compile = compiling.resolve_choice(args.compile, info.device.type, args.sharding)
    compiled_modules = compiling.compile_regions(unet, args.compile, dynamic=True)
    lr_scheduler = lr_schedule.build_lr_scheduler(args, optimizer.inner, td.total_steps)
    scaler = None
    if args.mixed_precision == "fp16":  # bf16 has fp32's range: no loss scaling
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=info.device.type)

    progress, sampler = Progress(), data.SamplerState()
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, info, unet, optimizer, lr_scheduler, scaler)
        progress = Progress(**state["progress"])
        sampler = data.SamplerState.from_json(state["sampler"], td.training)
        logger.info(
            f"resumed from {resume_path}: step {progress.step}, epoch {sampler.epoch}, batch {sampler.position}"
        )

    config = dict(vars(args))
    config.update(
        world_size=info.world_size, num_nodes=info.num_nodes, run_dir=str(run_dir), train_items=len(td.training),
        validation_items=len(td.validation), global_batch=td.global_batch, total_optimizer_steps=td.total_steps,
        effective_batch=td.global_batch * args.gradient_accumulation_steps,
    )  # fmt: skip
    log = RunLogger(info.is_main_process, run_dir, Path(args.log_dir) / run_dir.name, td.total_steps, progress.step)
    if info.is_main_process:
        write_json(run_dir / "config.json", config)
        (run_dir / "validation_items.txt").write_text("".join(f"{e.uid}\n" for e in td.validation), encoding="utf-8")
    evaluator = validation.build_evaluator(args, run_dir, info, td.training, td.validation, log.tb)
    handoff = Path(args.handoff_dir) if args.handoff_dir else None
    handoff = handoff or saving.default_handoff_dir(run_dir, 4 * shards["global_elements"], info.num_nodes)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _request_stop)
    logger.info(
        f"{info.world_size} processes on {info.num_nodes} node(s), --sharding {args.sharding} {shards}, compute "
        f"{args.mixed_precision}, --compile {args.compile} ({compiled_modules} modules compiled); "
        f"{len(td.training)} training items, {len(td.validation)} held out; global batch {td.global_batch} x "
        f"accumulation {args.gradient_accumulation_steps} = {config['effective_batch']} images per optimizer step; "
        f"{td.total_steps} optimizer steps (per epoch: {td.steps_per_epoch[:5]}...); {run_dir}"
    )
    return Trainer(
        args, info, run_dir, unet, noise_scheduler, optimizer, lr_scheduler, scaler, td, sampler, progress, log,
        evaluator, handoff, config, mesh.get_group("shard"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the step


def train_step(tr: Trainer, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
    """One optimizer step over the accumulated micro-batches.

    FSDP2 reduce-scatters gradients after every micro-step's backward (no `set_requires_gradient_sync(False)`),
    so only sharded gradients are kept between micro-steps (the original kept unsharded ones, B30); on one
    process (`--sharding none`) `after_backward` adds each micro-step's gradient into the fp32 sum.
    """
    dev, scaler = tr.info.device, tr.scaler
    loss_sum = torch.zeros((), device=dev)
    for batch in micro_batches:
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        prediction, target = diffusion.predict(tr.unet, tr.noise_scheduler, batch)
        loss = diffusion.mse_loss(prediction, target)
        loss_sum += loss.detach()
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        tr.optimizer.after_backward()

    tr.optimizer.bind_grads()
    if scaler is not None:
        scaler.unscale_(tr.optimizer)  # before clipping: norm and clip in true units (B3)
    max_norm = tr.args.max_grad_norm if tr.args.max_grad_norm > 0 else math.inf
    grad_norm = optim.clip_grad_norm_(tr.optimizer, max_norm, tr.shard_group)  # before the step (B3)

    # The step's one collective and host sync: every rank gets the same loss, norm and stop request.
    alloc, peak = memory_gib(dev)
    extras = torch.tensor([float(bool(_STOP_SIGNAL)), alloc, peak], device=dev)
    norm = grad_norm.reshape(1).float().to(dev)  # on the CPU with --cpu_offload
    mine = torch.cat([(loss_sum / len(micro_batches)).reshape(1), norm, extras]).double()
    gathered = [torch.empty_like(mine) for _ in range(tr.info.world_size)]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).tolist()
    loss_value = sum(row[0] for row in table) / len(table)
    finite = math.isfinite(loss_value) and math.isfinite(table[0][1])
    lr = tr.optimizer.param_groups[0]["lr"]

    loss_scale = None
    if scaler is not None:
        loss_scale = float(scaler.get_scale())
        if finite:
            scaler.step(tr.optimizer)  # also skips by itself on inf/nan gradients (found_inf agreed by ranks)
        scaler.update()
    elif finite:
        tr.optimizer.step(bind=False)  # bound above, before unscaling and clipping
    tr.optimizer.zero_grad()
    with warnings.catch_warnings():  # a skipped step still advances the schedule, which torch warns about
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        tr.lr_scheduler.step()  # once per optimizer step, on every rank (B4)
    return {
        "loss": loss_value,
        "grad_norm": table[0][1],
        "lr": lr,
        "finite": finite,
        "loss_scale": loss_scale,
        "stop": any(row[2] > 0 for row in table),
        "memory_gib": [(row[3], row[4]) for row in table],
    }


# ------------------------------------------------------------------------------------------ saving


def save_model(tr: Trainer, name: str) -> None:
    """Gather the full UNet to rank 0 only (collective); rank 0 writes the pipeline and the single file."""
    tr.progress.saved_model_step = tr.progress.step
    full = tr.optimizer.full_model_state_dict(tr.unet)
    if tr.info.is_main_process:
        a = tr.args
        out = saving.save_pipeline(a.pretrained_model_name_or_path, full, tr.run_dir / name, a.weight_dtype)
        logger.info(f"saved the {a.weight_dtype} pipeline to {out}")
        if a.save_single_file:
            logger.info(f"saved the single-file checkpoint {saving.save_single_file(out, a.weight_dtype)}")
    del full
    barrier()


def save_checkpoint(tr: Trainer) -> Path:
    state = {
        "step": tr.progress.step,
        "progress": vars(tr.progress),
        "sampler": tr.sampler.to_json(tr.data.training),
        "validation_uids": sorted(e.uid for e in tr.data.validation),
    }
    path = ckpt.save_checkpoint(
        tr.run_dir, tr.progress.step, tr.info, tr.unet, tr.optimizer, tr.lr_scheduler, tr.scaler, state, tr.config,
        tr.args.checkpoints_total_limit,
    )  # fmt: skip
    logger.info(f"checkpoint written: {path}")
    return path


# ------------------------------------------------------------------------------------------ the loop


def _end_of_epoch(tr: Trainer, epoch: int) -> None:
    a, p = tr.args, tr.progress
    if p.epoch_losses:
        tr.log.scalar(TAG_EPOCH_LOSS, sum(p.epoch_losses) / len(p.epoch_losses), epoch)
    tr.log.scalar(TAG_UPDATES_PER_EPOCH, len(p.epoch_losses), epoch)
    tr.log.scalar(TAG_STEPS_PER_EPOCH, len(p.epoch_losses) * a.gradient_accumulation_steps, epoch)
    p.epoch_losses, p.finished_epoch = [], epoch
    if epoch >= a.start_save_model_epoch and epoch % a.save_model_every_n_epochs == 0:
        save_model(tr, f"epoch-{epoch}")
        if a.save_state:
            save_checkpoint(tr)


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
    tr.log.step(
        p.step, result["loss"], result["lr"], result["grad_norm"], rate, epoch=epoch, finite=result["finite"],
        loss_scale=result["loss_scale"], memory_gib=result["memory_gib"],
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
    if a.checkpointing_steps and p.step % a.checkpointing_steps == 0:
        save_checkpoint(tr)
    return p.step < tr.data.total_steps


def _run_epoch(tr: Trainer) -> bool:
    """Train the current epoch from the sampler's position. Returns False when training must stop."""
    a, s, info = tr.args, tr.sampler, tr.info
    plan = data.plan_epoch(
        [e.bucket_wh for e in tr.data.training], s.carried_in, s.deferred_in, tr.data.global_batch,
        a.gradient_accumulation_steps, a.set_seed, s.epoch,
    )  # fmt: skip
    mine = [[(i, e, 1.0) for i, e in data.rank_slice(gb, info.rank, a.train_batch_size)] for gb in plan.batches]
    loader = data.make_loader(tr.data.dataset, mine[s.position :], a.dataloader_num_workers, info.device.type == "cuda")
    next_epoch = data.SamplerState(s.epoch + 1, 0, plan.leftovers, plan.deferred)
    if not plan.batches:  # an epoch too small for one optimizer step: everything moves on to the next
        tr.sampler = next_epoch
        return True
    tr.throughput.resume()
    pending: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        pending.append(batch)
        if len(pending) < a.gradient_accumulation_steps:
            continue
        result = train_step(tr, pending)
        pending = []
        s.position += a.gradient_accumulation_steps
        tr.progress.step += 1
        tr.progress.images_seen += tr.data.global_batch * a.gradient_accumulation_steps
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
    at each epoch boundary. Epoch boundaries always fall between optimizer steps (see `data.plan_epoch`)."""
    completed = True
    while True:
        done_epochs = tr.sampler.epoch - 1
        if tr.sampler.position == 0:
            if done_epochs > tr.progress.finished_epoch:
                _end_of_epoch(tr, done_epochs)
            if done_epochs > tr.progress.evaluated_epoch:
                validation.evaluate(tr, done_epochs)
        if _finished(tr):
            break
        if not _run_epoch(tr) and tr.progress.step < tr.data.total_steps:
            completed = False
            break
    if completed:
        save_checkpoint(tr)
        if tr.args.save_final_model and tr.progress.saved_model_step != tr.progress.step:
            save_model(tr, "final")
        elif tr.args.save_final_model and tr.info.is_main_process:  # same weights: link instead of a second copy
            saving.link_final(tr.run_dir, f"epoch-{tr.progress.finished_epoch}")
    return summarize(tr, completed)


def summarize(tr: Trainer, completed: bool) -> dict:
    p = tr.progress
    summary = {
        "completed": completed,
        "stopped_by_signal": bool(_STOP_SIGNAL),
        "optimizer_steps": p.step,
        "planned_optimizer_steps": tr.data.total_steps,
        "epochs_finished": tr.sampler.epoch - 1,
        "images_seen": p.images_seen,
        "skipped_steps": p.skipped_steps,
        "average_images_per_second": tr.throughput.average,
        "wall_seconds": time.monotonic() - tr.start_time,
        "best_validation_loss": p.best_validation_loss,
        "world_size": tr.info.world_size,
        "peak_gpu_memory_gib_per_rank": [peak for _, peak in tr.log.last_memory]
        if tr.info.device.type == "cuda"
        else None,
    }
    if tr.info.is_main_process:
        write_json(tr.run_dir / "summary.json", summary)
        if tr.log.tb is not None:
            tr.log.tb.add_text("Run summary", "\n".join(f"    {k}: {v}" for k, v in summary.items()))
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup()
