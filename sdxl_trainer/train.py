"""The training loop: `setup()` builds everything in order, `train()` runs epochs and calls evaluation, saving
and checkpoints through explicit `if` lines, `train_step()` does one optimizer step (all micro-steps).

Per optimizer step there is exactly one collective of our own and one host sync: a small all-gather of
(loss, stop request, GPU memory) that gives every rank the same loss, the same skip decision and the same
signal-stop decision. No barriers, `gc.collect` or `empty_cache` per step (B28).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sdxl_trainer import checkpoint as ckpt
from sdxl_trainer import data, diffusion, lr_schedule, models, optim, parallel, saving
from sdxl_trainer.distributed import DistInfo, barrier, check_same_on_all_ranks, cleanup, init_distributed
from sdxl_trainer.log import (
    TAG_EPOCH_LOSS,
    TAG_SKIPPED,
    TAG_STEPS_PER_EPOCH,
    TAG_UPDATES_PER_EPOCH,
    TAG_VALIDATION_LOSS,
    RunLogger,
    Throughput,
    logger,
    memory_gib,
    setup_logging,
    write_json,
)
from sdxl_trainer.train_args import run_name

_STOP_SIGNAL: list[int] = []  # set by the SIGTERM/SIGINT handler, read once per optimizer step


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


@dataclass
class Progress:
    """Counters that go into every checkpoint (with the sampler state)."""

    step: int = 0  # optimizer steps taken (including skipped ones: the LR schedule advances on each)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    images_seen: int = 0
    evaluated_epoch: int = -1  # last epoch whose evaluation ran
    finished_epoch: int = 0  # last epoch whose end-of-epoch work (save, epoch loss) ran
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's per-step losses (rank 0 logs)
    best_validation_loss: float | None = None


@dataclass
class Trainer:
    args: argparse.Namespace
    info: DistInfo
    run_dir: Path
    unet: torch.nn.Module
    noise_scheduler: object
    optimizer: optim.LocalShardOptimizer
    lr_scheduler: object
    scaler: object | None
    dataset: data.CachedLatentDataset
    train_entries: list[data.Entry]
    validation_entries: list[data.Entry]
    validation_keys: list[tuple[int, float]]
    sampler: data.SamplerState
    progress: Progress
    total_steps: int
    num_epochs: int | None  # None: run until total_steps (--max_train_steps)
    global_batch: int
    log: RunLogger
    throughput: Throughput
    evaluator: object | None
    handoff_dir: Path
    config: dict
    start_time: float = field(default_factory=time.monotonic)


# ------------------------------------------------------------------------------------------ setup


def _request_stop(signum, _frame) -> None:
    _STOP_SIGNAL.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process the usual way


def _ignore_signals_in_worker(_worker_id: int) -> None:
    # DataLoader workers share the process group of their rank: a SIGTERM sent to the whole job must not kill
    # them before their rank has written its checkpoint; the loader shuts them down afterwards.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_dir(args: argparse.Namespace, info: DistInfo) -> Path:
    out = Path(args.output_dir) if args.output_dir else Path("output") / run_name(args, info.world_size)
    if info.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out.resolve()


def _load_data(args, info: DistInfo, resume_state: dict | None):
    paths = data.resolve_cache_paths(args.cached_dataset_dirs, args.cached_dataset_lists)
    caches, entries, problems = data.load_entries(paths, verify=args.verify_cached_dataset_hash_values)
    data.check_cache_settings(
        caches,
        {
            "max_resolution": args.max_resolution,
            "min_resolution": args.min_resolution,
            "upscale_to_resolution": args.upscale_to_resolution,
        },
    )
    for line in problems:
        logger.warning("unreadable cache item left out: %s", line)
    # The hold-out covers validation loss and validation images; the smaller set is a prefix of the larger
    # (same hash ranking), so both use the same items where they overlap. A resume reuses the saved split.
    fractions = [args.validation_loss_percent if args.validation_loss else 0.0]
    if getattr(args, "validation_image", False):
        fractions.append(args.validation_image_percent)
    uids = [e.uid for e in entries]
    if resume_state is not None:
        held = set(resume_state["validation_uids"]) & set(uids)
    else:
        held = data.split_validation(uids, max(fractions), args.set_seed)
    check_same_on_all_ranks(str(data.mix_seed(sorted(uids), sorted(held))), "the item list and validation split")
    validation = [e for e in entries if e.uid in held]
    training, notes = data.trainable_entries(
        [e for e in entries if e.uid not in held], args.train_batch_size * info.world_size
    )
    for line in notes:
        logger.warning(line)
    if not training:
        raise TrainingError(
            f"--train_batch_size {args.train_batch_size} x {info.world_size} processes: no bucket has enough items "
            "for one global batch; lower --train_batch_size or add data"
        )
    return caches, entries, training, validation


def _plan_lengths(args, training: list[data.Entry], global_batch: int) -> tuple[int, int | None, list[int]]:
    """(total optimizer steps, epochs or None, steps per epoch for the planned epochs)."""
    sizes = [len(m) for m in data.group_by_bucket([e.bucket_wh for e in training]).values()]
    acc = args.gradient_accumulation_steps
    if args.max_train_steps:
        # Every epoch adds at least one global batch, so a full optimizer step comes within `acc` epochs.
        per_epoch = data.epoch_step_counts(sizes, global_batch, acc, acc)
        if sum(per_epoch) == 0:
            raise TrainingError("--gradient_accumulation_steps: the data never forms a full optimizer step")
        return lr_schedule.total_optimizer_steps(per_epoch, args.max_train_steps), None, per_epoch
    per_epoch = data.epoch_step_counts(sizes, global_batch, acc, args.num_train_epochs)
    total = lr_schedule.total_optimizer_steps(per_epoch)
    if total == 0:
        raise TrainingError(
            "--gradient_accumulation_steps/--train_batch_size: the whole run does not fill one optimizer step"
        )
    return total, args.num_train_epochs, per_epoch


def _build_unet(args, info: DistInfo, mesh, load_base_weights: bool):
    """Meta-device UNet, sharded, then the base weights streamed from rank 0: no rank but rank 0 ever holds a
    full fp32 copy in CPU RAM (the original loaded one per rank, B30)."""
    from diffusers import UNet2DConditionModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = UNet2DConditionModel.load_config(
        args.pretrained_model_name_or_path, subfolder="unet", local_files_only=models._local_only()
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.train()
    if args.gradient_checkpointing:
        parallel.apply_activation_checkpointing(unet)
    parallel.apply_fsdp(unet, mesh, args.sharding, parallel.build_mp_policy(args.mixed_precision))
    unet.to_empty(device=info.device)
    if load_base_weights:
        full = {}
        if info.is_main_process:
            full = models.load_unet(args.pretrained_model_name_or_path, torch_dtype=torch.float32).state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(unet, full, options=options)
        del full
    return unet


def _build_evaluator(args, run_dir: Path, info: DistInfo, training, validation, tb_writer):
    from sdxl_trainer import evaluation

    if not (args.save_samples or args.validation_image):
        return None
    captions = sorted({e.item.caption for e in training if e.item.caption})
    image_count = round(args.validation_image_percent * (len(training) + len(validation))) if validation else 0
    ranked = sorted(validation, key=lambda e: (data.mix_seed(args.set_seed, "validation-split", e.uid), e.uid))
    return evaluation.Evaluator(
        args,
        run_dir,
        args.pretrained_model_name_or_path,
        captions,
        [e.item for e in ranked[: max(image_count, 1 if validation else 0)]],
        Path(args.data_dir) if getattr(args, "data_dir", None) else None,
        info.rank,
        info.world_size,
        info.device,
        tb_writer=tb_writer,
        weight_dtype=saving.DTYPES[args.weight_dtype],
        log=logger.info,
    )


def setup(args: argparse.Namespace) -> Trainer:
    info = init_distributed()
    torch.manual_seed(data.mix_seed(args.set_seed, "rank", info.rank))  # distinct streams per rank (B31)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = _run_dir(args, info)
    setup_logging(run_dir, info.rank)
    resume_path = ckpt.find_resume_checkpoint(args.resume_from_checkpoint, run_dir)
    resume_state = json.loads((resume_path / ckpt.TRAIN_STATE).read_text()) if resume_path else None

    caches, _, training, validation = _load_data(args, info, resume_state)
    global_batch = args.train_batch_size * info.world_size
    total_steps, num_epochs, per_epoch = _plan_lengths(args, training, global_batch)

    mesh = parallel.build_mesh(args.sharding, info)
    unet = _build_unet(args, info, mesh, load_base_weights=resume_path is None)
    shard_counts = parallel.verify_sharding(unet, mesh, args.sharding)
    noise_scheduler = models.load_noise_scheduler(args.pretrained_model_name_or_path)
    optimizer = optim.build_optimizer(args, list(unet.parameters()))
    lr_scheduler = lr_schedule.build_lr_scheduler(args, optimizer.inner, total_steps)
    scaler = None
    if args.mixed_precision == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=info.device.type)

    progress, sampler = Progress(), data.SamplerState()
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, info, unet, optimizer, lr_scheduler, scaler)
        progress = Progress(**state["progress"])
        sampler = data.SamplerState.from_json(state["sampler"], training)
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume_path,
            progress.step,
            sampler.epoch,
            sampler.position,
        )

    dataset = data.CachedLatentDataset(
        caches,
        training + validation,
        args.set_seed,
        noise_scheduler.config.num_train_timesteps,
        args.conditional_dropout_percent,
    )
    n_train = len(training)
    validation_keys = [
        (n_train + i, w)
        for i, w in (
            (i, w) for b in data.validation_batches([e.bucket_wh for e in validation], global_batch) for i, w in b
        )
    ]

    config = {k: v for k, v in vars(args).items()}
    config.update(
        world_size=info.world_size,
        num_nodes=info.num_nodes,
        run_dir=str(run_dir),
        total_optimizer_steps=total_steps,
        train_items=n_train,
        validation_items=len(validation),
        global_batch=global_batch,
        effective_batch=global_batch * args.gradient_accumulation_steps,
        validation_uids=sorted(e.uid for e in validation),
    )
    tb_dir = Path(args.log_dir) / run_dir.name
    log = RunLogger(info.is_main_process, run_dir, tb_dir, total_steps, progress.step)
    if info.is_main_process:
        write_json(run_dir / "config.json", config)
        (run_dir / "validation_items.txt").write_text("".join(f"{e.uid}\n" for e in validation), encoding="utf-8")
    evaluator = _build_evaluator(args, run_dir, info, training, validation, log.tb)
    handoff = (
        Path(args.handoff_dir)
        if args.handoff_dir
        else saving.default_handoff_dir(run_dir, 4 * shard_counts["global_elements"], info.num_nodes)
    )

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _request_stop)
    logger.info(
        "%d processes (%d nodes), --sharding %s (%s), %s compute; %d training items in %d buckets, %d held out; "
        "global batch %d, accumulation %d, effective batch %d; %d optimizer steps (%s per epoch); run dir %s",
        info.world_size,
        info.num_nodes,
        args.sharding,
        shard_counts,
        args.mixed_precision,
        n_train,
        len(data.group_by_bucket([e.bucket_wh for e in training])),
        len(validation),
        global_batch,
        args.gradient_accumulation_steps,
        config["effective_batch"],
        total_steps,
        per_epoch[:3],
        run_dir,
    )
    return Trainer(
        args,
        info,
        run_dir,
        unet,
        noise_scheduler,
        optimizer,
        lr_scheduler,
        scaler,
        dataset,
        training,
        validation,
        validation_keys,
        sampler,
        progress,
        total_steps,
        num_epochs,
        global_batch,
        log,
        Throughput(),
        evaluator,
        handoff,
        config,
    )


# ------------------------------------------------------------------------------------------ the step


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def predict(tr: Trainer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet prediction and training target for one micro-batch (already on the device)."""
    sched = tr.noise_scheduler
    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    noisy = diffusion.add_noise(sched, latents, noise, timesteps)
    target = diffusion.training_target(sched, latents, noise, timesteps)
    prediction = tr.unet(
        noisy,
        timesteps,
        encoder_hidden_states=batch["prompt_embeds"],
        added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
    ).sample
    return prediction, target


def train_step(tr: Trainer, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    FSDP2 reduce-scatters gradients after every micro-step's backward (no `set_requires_gradient_sync(False)`),
    so only sharded gradients are kept between micro-steps (the original kept unsharded ones, B30).
    """
    dev, scaler = tr.info.device, tr.scaler
    loss_sum = torch.zeros((), device=dev)
    for batch in micro_batches:
        prediction, target = predict(tr, _to_device(batch, dev))
        loss = diffusion.mse_loss(prediction, target)
        loss_sum += loss.detach()
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    tr.optimizer.bind_grads()
    if scaler is not None:
        scaler.unscale_(tr.optimizer.inner)  # before clipping, so the norm and the clip are in true units (B3)
    grads = [p.grad for p in tr.unet.parameters() if p.grad is not None]
    max_norm = tr.args.max_grad_norm if tr.args.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.unet.parameters(), max_norm, foreach=True) if grads else loss_sum
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()

    # The one collective and host sync of the step: every rank learns the same loss and stop request.
    alloc, peak = memory_gib(dev)
    mine = torch.stack(
        [
            loss_sum / len(micro_batches),
            grad_norm.to(dev, torch.float32).reshape(()),
            torch.tensor(float(bool(_STOP_SIGNAL)), device=dev),
            torch.tensor(alloc, device=dev),
            torch.tensor(peak, device=dev),
        ]
    ).double()
    gathered = [torch.empty_like(mine) for _ in range(tr.info.world_size)]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).tolist()
    loss_value = sum(row[0] for row in table) / len(table)
    norm_value = table[0][1]
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    lr = tr.optimizer.param_groups[0]["lr"]

    scale = None
    if scaler is not None:
        scale = float(scaler.get_scale())
        scaler.step(tr.optimizer.inner)  # skips by itself on inf/nan gradients (found_inf agreed by all ranks)
        scaler.update()
    elif finite:
        tr.optimizer.step()
    tr.optimizer.zero_grad()
    tr.lr_scheduler.step()  # once per optimizer step, on every rank (B4)
    return {
        "loss": loss_value,
        "grad_norm": norm_value,
        "lr": lr,
        "finite": finite,
        "loss_scale": scale,
        "stop": any(row[2] > 0 for row in table),
        "memory_gib": [(row[3], row[4]) for row in table],
    }


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def validation_loss(tr: Trainer) -> float | None:
    """Mean loss over the hold-out with fixed noise and timesteps (seeded per item, independent of training),
    so epochs compare. Collective."""
    if not tr.validation_entries:
        return None
    r, b = tr.info.rank, tr.args.train_batch_size
    global_batches = [
        tr.validation_keys[k : k + tr.global_batch] for k in range(0, len(tr.validation_keys), tr.global_batch)
    ]
    mine = [[(i, data.VALIDATION_EPOCH, w) for i, w in data.rank_slice(gb, r, b)] for gb in global_batches]
    loader = data.make_loader(tr.dataset, mine, tr.args.dataloader_num_workers, tr.info.device.type == "cuda")
    totals = torch.zeros(2, device=tr.info.device, dtype=torch.float64)
    tr.unet.eval()
    for batch in loader:
        batch = _to_device(batch, tr.info.device)
        prediction, target = predict(tr, batch)
        weights = batch["weight"].double()
        totals += torch.stack([(diffusion.per_sample_mse(prediction, target).double() * weights).sum(), weights.sum()])
    tr.unet.train()
    dist.all_reduce(totals)
    total, count = totals.tolist()
    return total / count if count > 0 else None


def evaluate(tr: Trainer, epoch: int) -> None:
    """At epoch 0 (the base model) and every N epochs: validation loss, then samples/validation images."""
    a = tr.args
    if a.validation_loss and epoch % a.validation_loss_every_n_epochs == 0:
        value = validation_loss(tr)
        if value is None:
            logger.warning("validation loss: no held-out items (raise --validation_loss_percent)")
        else:
            tr.log.scalar(TAG_VALIDATION_LOSS, value, epoch)
            tr.log.record({"event": "validation", "epoch": epoch, "step": tr.progress.step, "validation_loss": value})
            best = tr.progress.best_validation_loss
            tr.progress.best_validation_loss = value if best is None else min(best, value)
            logger.info("epoch %d validation loss %.6f", epoch, value)
    if tr.evaluator is not None and tr.evaluator.wants_to_run(epoch):
        full = saving.gather_full_state_dict(tr.unet)
        path = saving.write_handoff(full, tr.handoff_dir) if tr.info.is_main_process else None
        del full
        barrier()
        try:
            scores = tr.evaluator.run(epoch, tr.handoff_dir / saving.HANDOFF_FILE)
        finally:
            barrier()
            if path is not None:
                saving.remove_handoff(tr.handoff_dir)
        tr.log.record({"event": "scores", "epoch": epoch, **scores})
    tr.progress.evaluated_epoch = epoch


def save_model(tr: Trainer, name: str) -> None:
    """Collective gather; rank 0 builds and writes the pipeline (and the single file)."""
    full = saving.gather_full_state_dict(tr.unet)
    if tr.info.is_main_process:
        out = saving.save_pipeline(tr.args.pretrained_model_name_or_path, full, tr.run_dir / name, tr.args.weight_dtype)
        logger.info("saved %s pipeline to %s", tr.args.weight_dtype, out)
        if tr.args.save_single_file:
            logger.info("saved single-file checkpoint %s", saving.save_single_file(out, tr.args.weight_dtype))
    del full
    barrier()


def save_checkpoint(tr: Trainer) -> Path:
    state = {
        "step": tr.progress.step,
        "progress": vars(tr.progress),
        "sampler": tr.sampler.to_json(tr.train_entries),
        "validation_uids": sorted(e.uid for e in tr.validation_entries),
    }
    path = ckpt.save_checkpoint(
        tr.run_dir,
        tr.progress.step,
        tr.info,
        tr.unet,
        tr.optimizer,
        tr.lr_scheduler,
        tr.scaler,
        state,
        tr.config,
        tr.args.checkpoints_total_limit,
    )
    logger.info("checkpoint written: %s", path)
    return path


# ------------------------------------------------------------------------------------------ the loop


def _end_of_epoch(tr: Trainer, epoch: int) -> None:
    a, p = tr.args, tr.progress
    if p.epoch_losses:
        tr.log.scalar(TAG_EPOCH_LOSS, sum(p.epoch_losses) / len(p.epoch_losses), epoch)
    tr.log.scalar(TAG_UPDATES_PER_EPOCH, len(p.epoch_losses), epoch)
    tr.log.scalar(TAG_STEPS_PER_EPOCH, len(p.epoch_losses) * a.gradient_accumulation_steps, epoch)
    p.epoch_losses = []
    p.finished_epoch = epoch
    if epoch >= a.start_save_model_epoch and epoch % a.save_model_every_n_epochs == 0:
        save_model(tr, f"epoch-{epoch}")
        if a.save_state:
            save_checkpoint(tr)


def _finished(tr: Trainer) -> bool:
    if tr.progress.step >= tr.total_steps:
        return True
    return tr.num_epochs is not None and tr.sampler.epoch > tr.num_epochs


def _epoch_plan(tr: Trainer) -> data.EpochPlan:
    s = tr.sampler
    return data.plan_epoch(
        [e.bucket_wh for e in tr.train_entries],
        s.carried_in,
        s.deferred_in,
        tr.global_batch,
        tr.args.gradient_accumulation_steps,
        tr.args.set_seed,
        s.epoch,
    )


def _run_epoch(tr: Trainer) -> bool:
    """Train the current epoch from the sampler's position. Returns False when training must stop early."""
    a, s, p, info = tr.args, tr.sampler, tr.progress, tr.info
    plan = _epoch_plan(tr)
    acc = a.gradient_accumulation_steps
    mine = [[(i, e, 1.0) for i, e in data.rank_slice(gb, info.rank, a.train_batch_size)] for gb in plan.batches]
    loader = data.make_loader(tr.dataset, mine[s.position :], a.dataloader_num_workers, info.device.type == "cuda")
    loader.worker_init_fn = _ignore_signals_in_worker
    tr.throughput.resume()
    pending: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        pending.append(batch)
        if len(pending) < acc:
            continue
        result = train_step(tr, pending)
        pending = []
        s.position += acc
        p.step += 1
        step_epoch = s.epoch
        p.images_seen += tr.global_batch * acc
        if s.position == len(plan.batches):  # the epoch's last step: the sampler moves on before any checkpoint
            tr.sampler = s = data.SamplerState(s.epoch + 1, 0, plan.leftovers, plan.deferred)
        rate = tr.throughput.add(tr.global_batch * acc)
        if result["finite"]:
            p.nonfinite_in_a_row = 0
            p.epoch_losses.append(result["loss"])
        else:
            p.skipped_steps += 1
            p.nonfinite_in_a_row += 1
            tr.log.scalar(TAG_SKIPPED, p.skipped_steps, p.step)
            logger.warning(
                "step %d: non-finite loss %s / gradient norm %s; update skipped",
                p.step,
                result["loss"],
                result["grad_norm"],
            )
        tr.log.step(
            p.step,
            result["loss"],
            result["lr"],
            result["grad_norm"],
            rate,
            epoch=step_epoch,
            loss_scale=result["loss_scale"],
            memory_gib=result["memory_gib"],
            finite=result["finite"],
        )
        if p.nonfinite_in_a_row >= a.max_nonfinite_steps:
            save_checkpoint(tr)
            raise TrainingError(
                f"{p.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient (limit "
                f"--max_nonfinite_steps {a.max_nonfinite_steps}): lower --learning_rate, use --mixed_precision bf16, "
                "or check the data. A checkpoint of the last state was written."
            )
        if result["stop"]:
            path = save_checkpoint(tr)
            logger.warning(
                "stopped by a signal at step %d; resume with --resume_from_checkpoint auto (%s)", p.step, path
            )
            return False
        if a.checkpointing_steps and p.step % a.checkpointing_steps == 0:
            save_checkpoint(tr)
        if p.step >= tr.total_steps:
            return True
    if tr.sampler is s and s.position == len(plan.batches):  # an epoch too small for one optimizer step
        tr.sampler = data.SamplerState(s.epoch + 1, 0, plan.leftovers, plan.deferred)
    return True


def train(tr: Trainer) -> dict:
    """Epoch loop: at each epoch boundary the end-of-epoch work and the evaluation of the model so far
    (epoch 0 = base model), then the next epoch's optimizer steps."""
    completed = True
    while True:
        done_epochs = tr.sampler.epoch - 1
        if tr.sampler.position == 0:
            if done_epochs > tr.progress.finished_epoch:
                _end_of_epoch(tr, done_epochs)
            if done_epochs > tr.progress.evaluated_epoch:
                evaluate(tr, done_epochs)
        if _finished(tr):
            break
        if not _run_epoch(tr):
            completed = False
            break
    if completed:
        if tr.sampler.position != 0:  # stopped by --max_train_steps inside an epoch
            tr.progress.finished_epoch = tr.sampler.epoch - 1
        save_checkpoint(tr)
        save_model(tr, "final")
    return summarize(tr, completed)


def summarize(tr: Trainer, completed: bool) -> dict:
    p = tr.progress
    summary = {
        "completed": completed,
        "optimizer_steps": p.step,
        "planned_optimizer_steps": tr.total_steps,
        "epochs_finished": tr.sampler.epoch - 1,
        "images_seen": p.images_seen,
        "skipped_steps": p.skipped_steps,
        "average_images_per_second": tr.throughput.average,
        "wall_seconds": time.monotonic() - tr.start_time,
        "best_validation_loss": p.best_validation_loss,
        "world_size": tr.info.world_size,
    }
    if tr.info.is_main_process:
        write_json(tr.run_dir / "summary.json", summary)
        if tr.log.tb is not None:
            tr.log.tb.add_text("Run summary", "\n".join(f"    {k}: {v}" for k, v in summary.items()))
        logger.info("run summary: %s", summary)
    return summary


def main(args: argparse.Namespace) -> dict:
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
