"""`setup()` builds everything the training loop needs, in execution order: process group, run folder,
logging, resume state, data, the UNet (flat or FSDP2), optimizer, compilation, schedule, evaluator."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import torch

from sdxl_trainer.data.sampler import SamplerState, mix_seed
from sdxl_trainer.distributed import DistInfo, barrier, init_distributed
from sdxl_trainer.models import loading
from sdxl_trainer.training import checkpoint as ckpt
from sdxl_trainer.training import (
    compiling,
    data_setup,
    fp8,
    lr_schedule,
    objective_args,
    optimizers,
    prediction,
    saving,
    sharding,
    validation,
)
from sdxl_trainer.training.flat_master import FlatMasterOptimizer
from sdxl_trainer.training.run_log import (
    RunLogger,
    logger,
    setup_logging,
    write_json,
)
from sdxl_trainer.training.state import Progress, Trainer, TrainingError, _request_stop
from sdxl_trainer.training.train_args import run_name


def _make_run_dir(args: argparse.Namespace, info: DistInfo) -> Path:
    out = Path(args.output_dir) if args.output_dir else Path("output") / run_name(args, info.world_size)
    if info.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out.resolve()


def setup(args: argparse.Namespace) -> Trainer:
    """Everything the loop needs, in execution order."""
    loading.set_single_file_config(args.single_file_config)
    info = init_distributed()
    torch.manual_seed(mix_seed(args.set_seed, "rank", info.rank))  # distinct global streams per rank (B31)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = _make_run_dir(args, info)
    setup_logging(run_dir, info.rank)
    for flag in getattr(args, "ignored_flags", []):
        logger.warning(f"{flag} is ignored: caching (and re-caching) is done by sdxl_process_data_dir.py")
    resume_path = ckpt.find_resume_checkpoint(args.resume_from_checkpoint, run_dir)
    resume_state = json.loads((resume_path / ckpt.TRAIN_STATE).read_text()) if resume_path else None

    noise_scheduler = loading.load_noise_scheduler(args.pretrained_model_name_or_path)
    try:  # --prediction_type / --zero_terminal_snr: the schedule and target trained from here on
        noise_scheduler = prediction.training_scheduler(noise_scheduler, args)
        objective_args.check_against_schedule(args, noise_scheduler.config.num_train_timesteps)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    td = data_setup.build_training_data(args, info, noise_scheduler.config.num_train_timesteps, resume_state)

    try:
        args.sharding = sharding.resolve_strategy(args.sharding, info, args.cpu_offload)
    except sharding.ShardingError as exc:
        raise TrainingError(str(exc)) from exc
    mesh = sharding.build_mesh(args.sharding, info)
    try:  # refuses cards without FP8 matmuls
        fp8_plan = fp8.Fp8Plan.for_run(args.fp8, args.fp8_min_features, info.device, args.sharding, args.cpu_offload)
    except fp8.Fp8Error as exc:
        raise TrainingError(str(exc)) from exc
    if args.sharding == "none":
        unet = sharding.build_single_process_unet(
            args.pretrained_model_name_or_path, args.gradient_checkpointing, load_base_weights=resume_path is None
        )
        fp8_plan.convert(unet)  # before the flat layout: Float8Linear keeps the same parameter objects
        compute = sharding.COMPUTE_DTYPES[args.mixed_precision]
        optimizer = FlatMasterOptimizer(unet, args.optimizer, optimizers.inner_factory(args), compute, info.device)
        elements = optimizer.master.numel()
        shards = {"parameters": len(optimizer.params), "local_elements": elements, "global_elements": elements}
    else:
        unet = sharding.build_sharded_unet(
            args.pretrained_model_name_or_path, info, mesh, args.sharding, args.mixed_precision,
            args.gradient_checkpointing, load_base_weights=resume_path is None, cpu_offload=args.cpu_offload,
            convert=fp8_plan.convert,
        )  # fmt: skip
        shards = sharding.verify_sharding(unet, mesh, args.sharding)  # refuses to train if sharding is not in effect
        optimizer = optimizers.build_optimizer(args, list(unet.parameters()))
    # Lazy: each block compiles at its first forward; dynamic spatial sizes let the buckets share graphs.
    args.compile = compiling.resolve_choice(args.compile, info.device.type, args.sharding)
    compiled_modules = compiling.compile_regions(unet, args.compile, dynamic=True)
    lr_scheduler = lr_schedule.build_lr_scheduler(args, optimizer.inner, td.total_steps)
    scaler = None
    if args.mixed_precision == "fp16":  # bf16 has fp32's range: no loss scaling
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=info.device.type)

    progress, sampler = Progress(), SamplerState()
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, info, unet, optimizer, lr_scheduler, scaler)
        progress = Progress(**state["progress"])
        sampler = SamplerState.from_json(state["sampler"], td.training)
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
        f"{args.mixed_precision}, --fp8 {args.fp8} {fp8_plan.report}, --compile {args.compile} "
        f"({compiled_modules} modules compiled); "
        f"{len(td.training)} training items, {len(td.validation)} held out; global batch {td.global_batch} x "
        f"accumulation {args.gradient_accumulation_steps} = {config['effective_batch']} images per optimizer step; "
        f"{td.total_steps} optimizer steps (per epoch: {td.steps_per_epoch[:5]}...); {run_dir}"
    )
    tr = Trainer(
        args, info, run_dir, unet, noise_scheduler, optimizer, lr_scheduler, scaler, td, sampler, progress, log,
        evaluator, handoff, config, mesh.get_group("shard"), objective_args.loss_options(args),
    )  # fmt: skip
    if fp8_plan.float8_all_gather:  # each float8 weight's scale for the next all-gather, in one all-reduce
        tr.after_optimizer_step.append(lambda: fp8.precompute_scales(unet))
    return tr
