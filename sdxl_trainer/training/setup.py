"""`setup()` builds everything the training loop needs, in execution order: process group, run folder,
logging, resume state, data, the UNet (flat or FSDP2), optimizer, compilation, schedule, evaluator."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch

from sdxl_trainer.data.sampler import SamplerState, mix_seed
from sdxl_trainer.distributed import DistInfo, barrier, broadcast_object, init_distributed
from sdxl_trainer.models import loading
from sdxl_trainer.training import (
    allocator,
    compiling,
    data_setup,
    ema_args,
    fp8,
    fused_adamw8bit,
    lr_schedule,
    objective_args,
    optimizers,
    prediction,
    resume_check,
    run_folder,
    run_lock,
    saving,
    sharding,
    stochastic_rounding,
    tensorwise,
    validation,
)
from sdxl_trainer.training import checkpoint as ckpt
from sdxl_trainer.training.ema import EmaError, EmaWeights
from sdxl_trainer.training.flat_master import FlatMasterOptimizer
from sdxl_trainer.training.gradient_release import FlatReleaseOptimizer, GradientReleaseOptimizer
from sdxl_trainer.training.run_log import (
    RunLogger,
    logger,
    setup_logging,
    write_json,
)
from sdxl_trainer.training.state import Progress, Trainer, TrainingError, _request_stop
from sdxl_trainer.training.train_args import _flag_modules, build_parser, run_name


def _make_run_dir(args: argparse.Namespace, info: DistInfo) -> Path:
    out = Path(args.output_dir) if args.output_dir else Path("output") / run_name(args, info.world_size)
    if info.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out.resolve()


def _on_main_process(info: DistInfo, fn):
    """Run `fn` on rank 0 only and give every rank its result, or raise its exception on every rank (a refusal
    must stop all processes, not leave the others waiting in a collective)."""
    result, error = None, None
    if info.is_main_process:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    if info.world_size > 1:
        result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def _prepare_run_folder(args: argparse.Namespace, info: DistInfo, run_dir: Path) -> dict:
    """Rank 0: lock the folder, pick and verify the checkpoint, compare its flags with ours, set aside what
    belongs to other runs. Nothing in the folder changes before all checks pass."""
    run_id = run_folder.new_run_id()
    release_run_folder(run_dir)  # a lock this process kept from an earlier setup() that never ran to its end
    lock = run_lock.RunLock(run_dir, run_id).acquire()
    try:
        notes = ckpt.recover_interrupted_swaps(run_dir)
        path, chosen_notes = ckpt.choose_resume_checkpoint(args.resume_from_checkpoint, run_dir)
        notes += chosen_notes
        changed: list[str] = []
        if path is None:
            notes += run_folder.prepare_fresh(run_dir, args.overwrite_output_dir, run_id)
        else:
            new = {**vars(args), "world_size": info.world_size, "num_nodes": info.num_nodes}
            rules = resume_check.all_rules(_flag_modules())
            defaults = vars(build_parser().parse_args([]))
            for module in _flag_modules():  # what a checkpoint older than a module's flags did
                defaults.update(getattr(module, "RESUME_DEFAULTS", {}))
            changed = resume_check.check_resume(path, new, rules, defaults)
            state = json.loads((path / ckpt.TRAIN_STATE).read_text(encoding="utf-8"))
            notes += run_folder.prepare_resume(run_dir, path, state, run_id)
    except BaseException:
        lock.release()
        raise
    if lock.previous_holder:
        notes.append(f"took over the lock of a trainer that is no longer running: {lock.previous_holder}")
    _LOCKS[str(run_dir)] = lock
    return {"run_id": run_id, "resume_path": str(path) if path else None, "notes": notes, "changed": changed}


_LOCKS: dict[str, run_lock.RunLock] = {}  # rank 0's lock per run folder, released by `release_run_folder`


def release_run_folder(run_dir: Path) -> None:
    lock = _LOCKS.pop(str(run_dir), None)
    if lock is not None:
        lock.release()


def data_digest(td: data_setup.TrainingData) -> str:
    """The training items, their buckets and the hold-out: a resume must see the same (cache content)."""
    items = sorted((e.uid, list(e.bucket_wh)) for e in td.training)
    return f"{mix_seed(items, sorted(e.uid for e in td.validation)):016x}"


def setup(args: argparse.Namespace) -> Trainer:
    """Everything the loop needs, in execution order."""
    loading.set_single_file_config(args.single_file_config)
    info = init_distributed()
    torch.manual_seed(mix_seed(args.set_seed, "rank", info.rank))  # distinct global streams per rank (B31)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:  # resolved first: the resume check compares the resolved layout with the checkpoint's
        args.sharding = sharding.resolve_strategy(args.sharding, info, args.cpu_offload)
    except sharding.ShardingError as exc:
        raise TrainingError(str(exc)) from exc
    args.compile = compiling.resolve_choice(args.compile, info.device.type, args.sharding)
    run_dir = _make_run_dir(args, info)
    folder = _on_main_process(info, lambda: _prepare_run_folder(args, info, run_dir))
    try:
        return _build(args, info, run_dir, folder)
    except BaseException:
        if info.is_main_process:
            release_run_folder(run_dir)
        raise


def _build(args: argparse.Namespace, info: DistInfo, run_dir: Path, folder: dict) -> Trainer:
    setup_logging(run_dir, info.rank)
    logger.info(f"run id {folder['run_id']} in {run_dir}")
    logger.info(args.memory_plan_summary)
    if torch.cuda.is_available():
        logger.info(f"CUDA allocator: {allocator.ENV}={os.environ.get(allocator.ENV, '(PyTorch default)')}")
    for line in folder["notes"]:
        logger.warning(line)
    for flag in getattr(args, "ignored_flags", []):
        logger.warning(f"{flag} is ignored: caching (and re-caching) is done by sdxl_process_data_dir.py")
    resume_path = Path(folder["resume_path"]) if folder["resume_path"] else None
    resume_state = json.loads((resume_path / ckpt.TRAIN_STATE).read_text()) if resume_path else None

    noise_scheduler = loading.load_noise_scheduler(args.pretrained_model_name_or_path)
    try:  # --prediction_type / --zero_terminal_snr: the schedule and target trained from here on
        noise_scheduler = prediction.training_scheduler(noise_scheduler, args)
        objective_args.check_against_schedule(args, noise_scheduler.config.num_train_timesteps)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    td = data_setup.build_training_data(args, info, noise_scheduler.config.num_train_timesteps, resume_state)
    digest = data_digest(td)
    if resume_path is not None:
        recorded = json.loads((resume_path / "config.json").read_text(encoding="utf-8")).get("data_digest")
        if recorded is not None and recorded != digest:
            raise resume_check.ResumeMismatchError(
                f"--resume_from_checkpoint {resume_path}: the training items (cache content, buckets or hold-out) "
                "differ from the checkpoint's: resume with the same --cached_dataset_dirs content"
            )
    mesh = sharding.build_mesh(args.sharding, info)
    bf16_weights = args.master_weights == "bf16_stochastic"
    plain_fp32_shards = not (args.cpu_offload or bf16_weights or args.optimizer_step_in_backward)
    try:  # refuses cards without FP8 matmuls
        fp8_plan = fp8.Fp8Plan.for_run(
            args.fp8, args.fp8_min_features, info.device, args.sharding, plain_fp32_shards, args.compile
        )
    except fp8.Fp8Error as exc:
        raise TrainingError(str(exc)) from exc
    inner, optimizer_name = optimizers.inner_factory(args, mesh.get_group("shard")), args.optimizer
    if bf16_weights or args.optimizer_step_in_backward:
        # The stochastic rounding's own random stream, distinct per rank; the checkpoint's RNG file saves its state.
        rounding = stochastic_rounding.rounding_generator(info.device, mix_seed(args.set_seed, "rounding", info.rank))
        if fused_adamw8bit.chosen(args):  # one compiled kernel per flat chunk (fused_adamw8bit.py; bf16 weights)
            if args.sharding != "none":
                raise TrainingError(
                    f"--adamw_kernel fused with --optimizer adamw8bit steps the flat layout's chunks (one process); "
                    f"this run shards with {args.sharding}: use --adamw_kernel foreach"
                )
            inner = fused_adamw8bit.factory(args, rounding)
            optimizer_name = args.optimizer + fused_adamw8bit.NAME_SUFFIX
        else:  # one inner optimizer per tensor (tensorwise.py)
            state_device = torch.device("cpu") if args.offload_optimizer_state else None
            inner = tensorwise.factory(inner, args.learning_rate, bf16_weights, rounding, state_device)
    if args.sharding == "none":
        unet = sharding.build_single_process_unet(
            args.pretrained_model_name_or_path, args.gradient_checkpointing, load_base_weights=resume_path is None,
            checkpointed_fraction=args.gradient_checkpointing_fraction,
        )  # fmt: skip
        fp8_plan.convert(unet)  # before the flat layout: Float8Linear keeps the same parameter objects
        compute = sharding.COMPUTE_DTYPES[args.mixed_precision]
        flat = FlatReleaseOptimizer if args.optimizer_step_in_backward else FlatMasterOptimizer
        optimizer = flat(unet, optimizer_name, inner, compute, info.device, bf16_weights)
        elements = optimizer.master.numel()
        shards = {"parameters": len(optimizer.params), "local_elements": elements, "global_elements": elements}
    else:
        unet = sharding.build_sharded_unet(
            args.pretrained_model_name_or_path, info, mesh, args.sharding, args.mixed_precision,
            args.gradient_checkpointing, load_base_weights=resume_path is None, cpu_offload=args.cpu_offload,
            convert=fp8_plan.convert, weights_dtype=torch.bfloat16 if bf16_weights else torch.float32,
            units=args.fsdp_units, checkpointed_fraction=args.gradient_checkpointing_fraction,
        )  # fmt: skip
        shards = sharding.verify_sharding(unet, mesh, args.sharding)  # refuses to train if sharding is not in effect
        kind = GradientReleaseOptimizer if args.optimizer_step_in_backward else optimizers.LocalShardOptimizer
        optimizer = kind(list(unet.parameters()), args.optimizer, inner)
    # Lazy: each block compiles at its first forward; dynamic spatial sizes let the buckets share graphs.
    compiled_modules = compiling.compile_regions(unet, args.compile, dynamic=True)
    lr_scheduler = lr_schedule.build_lr_scheduler(args, optimizer.inner, td.total_steps)
    scaler = None
    if args.mixed_precision == "fp16":  # bf16 has fp32's range: no loss scaling
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=info.device.type)

    # Further per-rank training state (EMA weights, ...): named objects with state_dict()/load_state_dict(),
    # registered here before a resume so that checkpoints save and restore them (Trainer.extra_state).
    ema = _build_ema(args, info, optimizer)  # before the resume, which restores its shadows
    extra_state = {"ema": ema} if ema is not None else {}
    progress, sampler = Progress(), SamplerState()
    if resume_path is not None:
        try:
            state = ckpt.load_checkpoint(resume_path, info, unet, optimizer, lr_scheduler, scaler, extra_state)
        except EmaError as exc:
            raise TrainingError(str(exc)) from exc
        # The new flags' learning rate, betas, eps, weight decay and schedule replace the restored ones.
        resume_check.apply_to_optimizer(args, optimizer.param_groups, lr_scheduler)
        if folder["changed"]:
            logger.warning("changed on resume: " + "; ".join(folder["changed"]))
        progress = Progress(**state["progress"])
        sampler = SamplerState.from_json(state["sampler"], td.training)
        logger.info(
            f"resumed from {resume_path}: step {progress.step}, epoch {sampler.epoch}, batch {sampler.position}"
        )
    config = dict(vars(args))
    config.update(
        world_size=info.world_size, num_nodes=info.num_nodes, run_dir=str(run_dir), train_items=len(td.training),
        validation_items=len(td.validation), global_batch=td.global_batch, total_optimizer_steps=td.total_steps,
        effective_batch=td.global_batch * args.gradient_accumulation_steps, run_id=folder["run_id"],
        data_digest=digest, resumed_from=str(resume_path) if resume_path else None,
        changed_on_resume=folder["changed"],
    )  # fmt: skip
    tb_dir = run_folder.default_tensorboard_dir(run_dir, args.log_dir)
    handoff = Path(args.handoff_dir) if args.handoff_dir else None
    handoff = handoff or saving.default_handoff_dir(
        run_dir, 4 * shards["global_elements"], info.num_nodes, run_folder.path_tag(run_dir)
    )
    config.update(tensorboard_dir=str(tb_dir), handoff_dir_used=str(handoff))
    wandb_settings = {"project": args.wandb_project or args.project_name, "mode": args.wandb_mode, "config": config}
    log = RunLogger(
        info.is_main_process, run_dir, tb_dir, td.total_steps, progress.step, folder["run_id"], args.report_to,
        wandb_settings,
    )  # fmt: skip
    if info.is_main_process:
        write_json(run_dir / "config.json", config)
        # One held-out item per line: its dataset cache and image path (relative to the data folder it was cached from)
        held = "".join(f"{td.dataset.caches[e.cache_index].name}/{e.item.image_relpath}\n" for e in td.validation)
        (run_dir / "validation_items.txt").write_text(held, encoding="utf-8")
    evaluator = validation.build_evaluator(args, run_dir, info, td.training, td.validation, log.tb)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _request_stop)
    logger.info(
        f"{info.world_size} processes on {info.num_nodes} node(s), --sharding {args.sharding} {shards}, compute "
        f"{args.mixed_precision}, --fp8 {args.fp8} {fp8_plan.report}, --compile {args.compile} "
        f"({compiled_modules} modules compiled); "
        f"{len(td.training)} items trained per epoch, {len(td.validation)} held out; global batch {td.global_batch} x "
        f"accumulation {args.gradient_accumulation_steps} = {config['effective_batch']} images per optimizer step; "
        f"{td.total_steps} optimizer steps (per epoch: {td.steps_per_epoch[:5]}...); {run_dir}"
    )
    tr = Trainer(
        args, info, run_dir, unet, noise_scheduler, optimizer, lr_scheduler, scaler, td, sampler, progress, log,
        evaluator, handoff, config, mesh.get_group("shard"), objective_args.loss_options(args),
        run_id=folder["run_id"], ema=ema, extra_state=extra_state,
    )  # fmt: skip
    if fp8_plan.float8_all_gather:  # each float8 weight's scale for the next all-gather, in one all-reduce
        tr.after_optimizer_step.append(lambda: fp8.precompute_scales(unet))
    if resume_path is not None and resume_path.resolve() == (ckpt.checkpoints_root(run_dir) / resume_path.name):
        tr.weights_checkpoint_step = progress.step  # that folder holds exactly these weights: refresh, not rewrite
    return tr


def _build_ema(args: argparse.Namespace, info: DistInfo, optimizer) -> EmaWeights | None:
    """--use_ema: fp32 shadows of the optimizer's local tensors (the base weights; a resume then restores the
    checkpoint's EMA into them through `extra_state`)."""
    if not args.use_ema:
        return None
    device = info.device if args.ema_device == "gpu" else torch.device("cpu")
    try:
        ema = EmaWeights(optimizer.locals, ema_args.schedule(args), device)
    except EmaError as exc:
        raise TrainingError(str(exc)) from exc
    elements = sum(t.numel() for t in ema.shadows)
    logger.info(f"EMA of the weights: {elements} fp32 elements on this rank ({device}), {ema_args.schedule(args)}")
    return ema
