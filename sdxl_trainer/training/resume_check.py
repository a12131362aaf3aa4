"""What may change between a checkpoint and its resume, and what may not.

Every trainer flag is classified: `must_match` when changing it would corrupt the run (model shape, optimizer
state layout, data order or cache content, the per-rank layout), `may_change` when the new value can simply
take effect (learning rate and schedule, clipping, run length, logging, evaluation, saving). The core flags are
classified here; each module of `train_args._flag_modules()` classifies its own in a `RESUME_RULES` dict, and a
test fails when a flag of the parser is in neither.

The comparison is between the checkpoint's recorded `config.json` (the resolved flags of the run that wrote it)
and the new resolved flags. Differences in must_match stop the run with the full list; may_change ones are
returned so the caller applies them (`apply_to_optimizer`) and logs them as "changed on resume: ...".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MUST, MAY = "must_match", "may_change"

CORE_RULES: dict[str, str] = {
    # data: which items, in which order, with which randomness
    "cached_dataset_dirs": MAY,  # a moved cache is fine: its content is compared through `data_digest`
    "cached_dataset_lists": MAY,
    "train_batch_size": MUST,
    "conditional_dropout_percent": MAY,  # which items drop their caption from now on; the order stays
    "dataloader_num_workers": MAY,  # every item's randomness is keyed by the item, not by the worker
    "set_seed": MUST,
    "max_resolution": MUST,
    "min_resolution": MUST,
    "upscale_to_resolution": MUST,
    "data_dir": MAY,
    "upscale_use_GFPGAN": MAY,  # ignored flags of the original
    "save_upscale_samples": MAY,
    "verify_cached_dataset_hash_values": MAY,  # items it drops change `data_digest`, which is compared
    # model, precision and layout
    "pretrained_model_name_or_path": MUST,
    "single_file_config": MUST,
    "mixed_precision": MUST,
    "weight_dtype": MAY,  # the dtype of saved pipelines only
    "sharding": MUST,
    "gradient_checkpointing": MAY,  # recomputes the same activations
    "compile": MAY,
    "cpu_offload": MUST,
    # optimizer and schedule
    "optimizer": MUST,
    "learning_rate": MAY,
    "adam_beta1": MAY,
    "adam_beta2": MAY,
    "adam_epsilon": MAY,
    "adam_weight_decay": MAY,
    "max_grad_norm": MAY,
    "gradient_accumulation_steps": MUST,
    "learning_rate_scheduler": MAY,
    "percent_lr_warm_up_steps": MAY,
    "lr_warmup_steps": MAY,
    "polynomial_lr_end": MAY,
    "polynomial_power": MAY,
    "lr_num_cycles": MAY,
    "lr_step_rules": MAY,
    # run length, output, logging, checkpoints, saved models
    "num_train_epochs": MAY,
    "max_train_steps": MAY,
    "project_name": MAY,
    "output_dir": MAY,
    "log_dir": MAY,
    "max_nonfinite_steps": MAY,
    "checkpointing_steps": MAY,
    "checkpoints_total_limit": MAY,
    "resume_from_checkpoint": MAY,
    "save_state": MAY,
    "save_model_every_n_epochs": MAY,
    "start_save_model_epoch": MAY,
    "save_final_model": MAY,
    "save_single_file": MAY,
    "handoff_dir": MAY,
    # validation loss: the hold-out itself is restored from the checkpoint (its size is in config.json as
    # validation_items), so the fractions only matter to a fresh run
    "validation_loss": MAY,
    "validation_loss_percent": MAY,
    "validation_loss_every_n_epochs": MAY,
}

# Recorded facts of the run (not flags) that must match too.
MUST_MATCH_FACTS = {
    "world_size": "the number of processes (the optimizer state is per rank)",
    "num_nodes": "the number of machines",
    "data_digest": "the training items and their buckets (the cache content)",
}


# Differ on nearly every resume and say nothing about the training: compared, never reported as changes.
NOT_REPORTED = {"resume_from_checkpoint", "output_dir"}


class ResumeMismatchError(RuntimeError):
    """The new flags differ from the checkpoint's in ways that cannot change on resume."""


def all_rules(modules: list) -> dict[str, str]:
    """The core table plus every flag module's RESUME_RULES (dest name -> must_match | may_change)."""
    rules = dict(CORE_RULES)
    for module in modules:
        for name, rule in getattr(module, "RESUME_RULES", {}).items():
            if rule not in (MUST, MAY):
                raise ValueError(f"{module.__name__}.RESUME_RULES[{name!r}] = {rule!r}: use {MUST!r} or {MAY!r}")
            rules[name] = rule
    return rules


def unclassified(parser: argparse.ArgumentParser, rules: dict[str, str]) -> list[str]:
    """Destinations of the parser's options that no rule classifies."""
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    return sorted(dests - set(rules))


def _normal(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def compare(old: dict, new: dict, rules: dict[str, str], defaults: dict[str, object]) -> tuple[list[str], list[str]]:
    """(must_match differences, may_change differences) as readable lines. A flag the checkpoint did not record
    (added to the trainer later) counts as its default there."""
    must, may = [], []
    for name in sorted(rules):
        if name not in new:
            continue
        before = _normal(old[name]) if name in old else _normal(defaults.get(name))
        after = _normal(new[name])
        if before == after or name in NOT_REPORTED:
            continue
        line = f"--{name} {before} -> {after}"
        (must if rules[name] == MUST else may).append(line)
    for name, what in MUST_MATCH_FACTS.items():
        if name in old and name in new and _normal(old[name]) != _normal(new[name]):
            must.append(f"{name} ({what}): {old[name]} -> {new[name]}")
    return must, may


def check_resume(checkpoint: Path, new: dict, rules: dict[str, str], defaults: dict[str, object]) -> list[str]:
    """Raise ResumeMismatchError listing every must_match difference; return the may_change lines."""
    try:
        old = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeMismatchError(f"--resume_from_checkpoint {checkpoint}: unreadable config.json ({exc})") from exc
    must, may = compare(old, new, rules, defaults)
    if must:
        raise ResumeMismatchError(
            f"--resume_from_checkpoint {checkpoint}: these settings cannot change on resume (they shape the model, "
            "the optimizer state or the data order):\n  " + "\n  ".join(must) + "\nResume with the checkpoint's "
            "values, or start a new run in a new --output_dir."
        )
    return may


def apply_to_optimizer(args: argparse.Namespace, param_groups: list[dict], lr_scheduler) -> None:
    """After the optimizer and LR scheduler states were loaded: the new flags' hyper-parameters replace the
    restored ones (torch keeps the checkpoint's lr, betas, eps and weight decay in `param_groups`, and the
    scheduler's `base_lrs`), and the current lr is recomputed from the new schedule at the restored step.
    With unchanged flags this reproduces the restored values exactly."""
    for group in param_groups:
        group["initial_lr"] = args.learning_rate
        if "betas" in group:
            group["betas"] = (args.adam_beta1, args.adam_beta2)
        if "eps" in group and args.optimizer in ("adamw", "adamw8bit", "prodigy"):
            group["eps"] = args.adam_epsilon
        if "weight_decay" in group:
            group["weight_decay"] = args.adam_weight_decay
    lr_scheduler.base_lrs = [args.learning_rate for _ in param_groups]
    pairs = zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True)
    lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in pairs]  # LambdaLR.get_lr's own formula
    for group, lr in zip(param_groups, lrs, strict=True):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs
