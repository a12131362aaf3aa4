"""The data side of the trainer's setup: which items train, which are held out, and how long the run is.

Every rank computes the same answer from the same sorted cache and seed; a guard compares them anyway.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sdxl_trainer.data import sampler
from sdxl_trainer.data.dataset import (
    CachedLatentDataset,
    Entry,
    check_cache_settings,
    load_entries,
    resolve_cache_paths,
)
from sdxl_trainer.distributed import DistInfo, check_same_on_all_ranks
from sdxl_trainer.training import cache_checks, lr_schedule, masked_loss_args, objective_args
from sdxl_trainer.training.run_log import logger


class DataSetupError(RuntimeError):
    """The data cannot form the run that was asked for; the message names the flag."""


@dataclass
class TrainingData:
    dataset: CachedLatentDataset  # training items first, then the held-out ones
    training: list[Entry]
    validation: list[Entry]
    validation_keys: list[tuple[int, float]]  # (dataset index, weight) in global-batch order, padded
    global_batch: int
    total_steps: int  # optimizer steps of the whole run: the LR schedule's length
    num_epochs: int | None  # None: as many as --max_train_steps needs
    steps_per_epoch: list[int]


def hold_out(args: argparse.Namespace, uids: list[str], resume_state: dict | None) -> set[str]:
    """The validation items: one hash ranking serves both validation loss and validation images (the smaller
    set is a prefix of the larger). A resume reuses the saved split, so it never leaks into training."""
    if resume_state is not None:
        return set(resume_state["validation_uids"]) & set(uids)
    fractions = [args.validation_loss_percent if args.validation_loss else 0.0]
    if getattr(args, "validation_image", False):
        fractions.append(args.validation_image_percent)
    return sampler.split_validation(uids, max(fractions), args.set_seed)


def plan_lengths(args: argparse.Namespace, training: list[Entry], global_batch: int):
    """(total optimizer steps, epochs or None, optimizer steps per planned epoch)."""
    sizes = [len(m) for m in sampler.group_by_bucket([e.bucket_wh for e in training]).values()]
    acc = args.gradient_accumulation_steps
    if args.max_train_steps:
        # Every epoch adds at least one global batch, so a full optimizer step comes within `acc` epochs.
        per_epoch = sampler.epoch_step_counts(sizes, global_batch, acc, acc)
        if sum(per_epoch) == 0:
            raise DataSetupError("--gradient_accumulation_steps: the data never forms a full optimizer step")
        return lr_schedule.total_optimizer_steps(per_epoch, args.max_train_steps), None, per_epoch
    per_epoch = sampler.epoch_step_counts(sizes, global_batch, acc, args.num_train_epochs, last_flush=True)
    total = lr_schedule.total_optimizer_steps(per_epoch)
    if total == 0:
        raise DataSetupError(
            "--gradient_accumulation_steps/--train_batch_size/--num_train_epochs: the whole run does not fill one "
            "optimizer step"
        )
    return total, args.num_train_epochs, per_epoch


def build_training_data(
    args: argparse.Namespace, info: DistInfo, num_train_timesteps: int, resume_state: dict | None
) -> TrainingData:
    paths = resolve_cache_paths(args.cached_dataset_dirs, args.cached_dataset_lists)
    caches, entries, problems = load_entries(paths, verify=args.verify_cached_dataset_hash_values)
    resolutions = ("max_resolution", "min_resolution", "upscale_to_resolution")
    check_cache_settings(caches, {name: getattr(args, name) for name in resolutions})
    try:  # the caches were built by this run's text encoders and VAE (and all by the same ones); fills --vae
        cache_checks.check_models_and_resolve_vae(args, caches, log=logger.info)
    except cache_checks.CacheMismatchError as exc:
        raise DataSetupError(str(exc)) from exc
    for line in problems:
        logger.warning("unreadable cache item left out: %s", line)
    uids = [e.uid for e in entries]
    held = hold_out(args, uids, resume_state)
    check_same_on_all_ranks(str(sampler.mix_seed(uids, sorted(held))), "the item list and the validation split")

    global_batch = args.train_batch_size * info.world_size
    validation = [e for e in entries if e.uid in held]
    training = [e for e in entries if e.uid not in held]
    for line in sampler.padded_bucket_notes(training, global_batch):
        logger.info(line)
    if not training:
        raise DataSetupError("--validation_loss_percent/--validation_image_percent: every item is held out")
    total, num_epochs, per_epoch = plan_lengths(args, training, global_batch)
    masked = getattr(args, "masked_loss", False)
    try:
        masked_loss_args.check_cache_has_masks(masked, sum(e.item.loss_mask for e in entries), len(entries))
    except ValueError as exc:
        raise DataSetupError(str(exc)) from exc
    dataset = CachedLatentDataset(
        caches, training + validation, args.set_seed, num_train_timesteps, args.conditional_dropout_percent,
        objective_args.timestep_options(args), objective_args.noise_options(args), masked_loss=masked,
    )  # fmt: skip
    offset = len(training)
    batches = sampler.validation_batches([e.bucket_wh for e in validation], global_batch)
    keys = [(offset + i, w) for b in batches for i, w in b]
    return TrainingData(dataset, training, validation, keys, global_batch, total, num_epochs, per_epoch)
