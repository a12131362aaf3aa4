"""The trainer's command line: a frozen list of flags, the original's names and aliases, bad combinations."""

from __future__ import annotations

import argparse

import pytest
import torch

from sdxl_trainer.evaluation import eval_args
from sdxl_trainer.training import train_args

# Adding or removing a trainer flag means editing this list on purpose (docs/training.md too).
TRAINER_FLAGS = [
    "--adam_beta1", "--adam_beta2", "--adam_epsilon", "--adam_weight_decay", "--cached_dataset_dirs",
    "--cached_dataset_lists", "--checkpointing_steps", "--checkpoints_total_limit", "--compile",
    "--conditional_dropout_percent", "--cpu_offload", "--data_dir", "--dataloader_num_workers",
    "--gradient_accumulation_steps", "--gradient_checkpointing",
    "--handoff_dir", "--learning_rate", "--learning_rate_scheduler", "--load_saved_state", "--log_dir",
    "--lr_num_cycles", "--lr_scheduler", "--lr_step_rules", "--lr_warmup_steps", "--max_grad_norm",
    "--max_nonfinite_steps", "--max_resolution", "--max_train_steps", "--min_resolution", "--mixed_precision",
    "--no-gradient_checkpointing", "--no_gradient_checkpointing", "--no-save_final_model", "--num_train_epochs",
    "--optimizer", "--output_dir",
    "--percent_lr_warm_up_steps", "--polynomial_lr_end", "--polynomial_power", "--polynominal_power",
    "--pretrained_model_name_or_path", "--project_name", "--resume_from_checkpoint", "--save_final_model",
    "--save_model_every_n_epochs", "--save_single_file", "--save_state", "--save_upscale_samples", "--set_seed",
    "--sharding", "--single_file_config", "--start_save_model_epoch", "--train_batch_size", "--upscale_to_resolution",
    "--upscale_use_GFPGAN", "--validation_loss", "--validation_loss_every_n_epochs", "--validation_loss_percent",
    "--verify_cached_dataset_hash_values", "--weight_dtype",
    # issue 17a: the training objective (training/objective_args.py)
    "--debiased_estimation_loss", "--huber_c", "--huber_schedule", "--input_perturbation", "--logit_mean",
    "--logit_std", "--loss_type", "--max_timestep", "--min_timestep", "--multires_noise_discount",
    "--multires_noise_iterations", "--noise_offset", "--noise_offset_random_strength", "--prediction_type",
    "--sample_guidance_rescale", "--snr_gamma", "--timestep_bias_begin", "--timestep_bias_end",
    "--timestep_bias_multiplier", "--timestep_bias_portion", "--timestep_bias_strategy", "--timestep_sampling",
    "--zero_terminal_snr",
    # issue 18: FP8 matmuls (training/fp8_args.py)
    "--fp8", "--fp8_min_features", "--adamw_kernel",
    # issue 17b: masked loss
    "--masked_loss",
    # issue 14: the memory plan (training/memory_args.py)
    "--memory_plan", "--gpu_memory_gib", "--master_weights", "--optimizer_step_in_backward",
    "--no-optimizer_step_in_backward", "--fsdp_units", "--gradient_checkpointing_fraction", "--offload_optimizer_state",
    "--no-offload_optimizer_state",
    # issue 17a: EMA (training/ema_args.py)
    "--use_ema", "--ema_decay", "--ema_min_decay", "--ema_update_after_step", "--ema_warmup", "--ema_inv_gamma",
    "--ema_power", "--ema_update_every_steps", "--ema_device", "--ema_for_eval", "--no-ema_for_eval",
    "--save_both_weights",
    # issue 17a: metrics destinations (training/report_args.py)
    "--report_to", "--wandb_project", "--wandb_mode",
    # issue 16: the VAE the cache was built with, for samples and saved pipelines (training/cache_checks.py)
    "--vae",
]  # fmt: skip
# Issue 15 (checkpoints and resumes you can trust): training/run_args.py.
TRAINER_FLAGS += ["--checkpointing_minutes", "--overwrite_output_dir"]
# --optimizer prodigy (training/prodigy_args.py)
TRAINER_FLAGS += [
    "--prodigy_d_coef", "--prodigy_use_bias_correction", "--no-prodigy_use_bias_correction",
    "--prodigy_safeguard_warmup", "--no-prodigy_safeguard_warmup",
]  # fmt: skip

# The original trainer's flags (seed_reference.md §1.1) that the trainer itself still owns.
ORIGINAL_FLAGS = [
    "--cached_dataset_dirs", "--cached_dataset_lists", "--max_resolution", "--min_resolution",
    "--upscale_to_resolution", "--upscale_use_GFPGAN", "--save_upscale_samples",
    "--verify_cached_dataset_hash_values", "--conditional_dropout_percent", "--gradient_accumulation_steps",
    "--learning_rate_scheduler", "--num_train_epochs", "--pretrained_model_name_or_path", "--set_seed",
    "--train_batch_size", "--weight_dtype", "--percent_lr_warm_up_steps", "--learning_rate", "--polynomial_lr_end",
    "--polynominal_power", "--save_model_every_n_epochs", "--save_state", "--project_name", "--output_dir",
    "--load_saved_state", "--start_save_model_epoch", "--log_dir", "--validation_loss", "--validation_loss_percent",
    "--validation_loss_every_n_epochs",
    # owned by the evaluation module, in the same parser:
    "--save_samples", "--num_sample_images", "--save_samples_every_n_epochs", "--start_save_samples_epoch",
    "--validation_image", "--validation_image_percent", "--validation_image_every_n_epochs",
]  # fmt: skip


def _evaluation_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    eval_args.add_args(parser)
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _parse(tmp_path, *extra: str) -> argparse.Namespace:
    return train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), *extra])


def test_flag_list_is_frozen_and_holds_the_evaluation_flags_once():
    names = train_args.flag_names()
    assert len(names) == len(set(names))
    evaluation_flags = _evaluation_flags()
    assert evaluation_flags <= set(names)
    assert sorted(set(names) - evaluation_flags) == sorted(TRAINER_FLAGS)


def test_every_original_flag_still_parses():
    assert set(ORIGINAL_FLAGS) <= set(train_args.flag_names())


def test_defaults_and_resolved_values(tmp_path):
    args = _parse(tmp_path)
    assert args.sharding == "auto" and args.optimizer == "adamw8bit" and args.mixed_precision == "bf16"
    assert args.gradient_checkpointing and args.weight_dtype == "float16"
    assert args.compile == train_args.DEFAULT_COMPILE
    assert args.set_seed == train_args.DEFAULT_SEED  # an unseeded run is still reproducible
    assert args.percent_lr_warm_up_steps == train_args.DEFAULT_WARMUP_FRACTION and args.lr_warmup_steps is None


def test_aliases_keep_the_originals_names(tmp_path):
    args = _parse(tmp_path, "--polynominal_power", "2.5", "--lr_scheduler", "cosine", "--load_saved_state", "auto")
    assert args.polynomial_power == 2.5 and args.learning_rate_scheduler == "cosine"
    assert args.resume_from_checkpoint == "auto"
    assert _parse(tmp_path, "--polynomial_power", "3").polynomial_power == 3.0
    assert not _parse(tmp_path, "--no-gradient_checkpointing").gradient_checkpointing
    assert _parse(tmp_path, "--weight_dtype", "torch.bfloat16").weight_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--percent_lr_warm_up_steps", "0.1", "--lr_warmup_steps", "5"], "--lr_warmup_steps"),
        (["--weight_dtype", "torch.float64"], "--weight_dtype"),
        (["--learning_rate_scheduler", "piecewise_constant"], "--lr_step_rules"),
        (["--optimizer", "adafactor", "--mixed_precision", "fp16"], "--optimizer adafactor"),
        (["--resume_from_checkpoint", "/nonexistent/step-3"], "--resume_from_checkpoint"),
        (["--learning_rate_scheduler", "polynomial", "--polynomial_lr_end", "1"], "--polynomial_lr_end"),
        (["--learning_rate", "-1"], "--learning_rate"),
        (["--sharding", "zero3"], "--sharding"),
        (["--compile", "whole"], "--compile"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--validation_loss_percent", "1.5"], "--validation_loss_percent"),
        (["--sample_grid_max_rows", "1"], "--sample_grid_max_rows"),  # the evaluation module's own check
    ],
)
def test_bad_values_and_combinations_fail_at_start_naming_the_flag(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exc:
        _parse(tmp_path, *extra)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_a_cache_is_required(capsys):
    with pytest.raises(SystemExit):
        train_args.parse_args([])
    assert "--cached_dataset_dirs" in capsys.readouterr().err


def test_run_name_follows_the_original_without_the_output_dir_collision(tmp_path):
    args = _parse(tmp_path, "--project_name", "p", "--train_batch_size", "4", "--gradient_accumulation_steps", "5")
    assert train_args.run_name(args, 2) == "p_gpus2_bsz4_gradAccum5_lr3e-05"
    args = _parse(tmp_path, "--output_dir", str(tmp_path / "runs" / "mine"))
    assert train_args.run_name(args, 2) == "mine"  # a name, not a path (B24)


def test_the_train_sh_recipe_parses(repo_root, tmp_path):
    """Every flag train.sh passes exists and its values are valid (the recipe is the README's main command)."""
    import re
    import shlex

    text = (repo_root / "train.sh").read_text()
    start = text.index("sdxl_fsdp_train.py \\\n") + len("sdxl_fsdp_train.py")
    command = text[start : text.rindex('"$@"')]
    command = re.sub(r'"\$[A-Z_]+"', "VALUE", command.replace("\\\n", " "))
    argv = shlex.split(command)
    argv[argv.index("--mixed_precision") + 1] = "no"
    argv[argv.index("--cached_dataset_dirs") + 1] = str(tmp_path)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")  # not the same VALUE as --data_dir (refused)
    args = train_args.parse_args(argv)
    assert args.resume_from_checkpoint == "auto" and args.validation_loss and args.save_samples


def test_gradient_checkpointing_has_both_spellings_of_off(tmp_path):
    assert _parse(tmp_path).gradient_checkpointing is True
    assert _parse(tmp_path, "--no_gradient_checkpointing").gradient_checkpointing is False
    assert _parse(tmp_path, "--no-gradient_checkpointing").gradient_checkpointing is False


def test_single_file_base_needs_its_config_folder(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read at parse time")
    with pytest.raises(SystemExit):
        _parse(tmp_path, "--pretrained_model_name_or_path", str(checkpoint))
    assert "--single_file_config" in capsys.readouterr().err


def test_cpu_offload_is_refused_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("only meaningful on a machine without a GPU")
    with pytest.raises(SystemExit):
        _parse(tmp_path, "--cpu_offload")
    assert "--cpu_offload" in capsys.readouterr().err
