"""The objective options and EMA through the real training script on the tiny model (issue 17): every loss,
noise, schedule and timestep option reaches the step; a v-prediction / zero-terminal-SNR run saves a pipeline that
diffusers loads with the matching scheduler and samples from; the saved EMA weights equal an independent EMA of
the per-step weights. (EMA and the random options under FULL_SHARD with exact resume: test_fsdp_multiprocess.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fake_wandb
import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from train_helpers import base_args, checkpoint_weights, read_metrics, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.training import loss, objective, saving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 6})
    return root


def _spy(monkeypatch) -> list[dict]:
    """Record what each micro-batch's loss saw: the timesteps, whether the input was perturbed, the options."""
    seen: list[dict] = []
    real_predict, real_loss = objective.predict, loss.per_sample_loss

    def predict(unet, scheduler, batch):
        seen.append({"timesteps": batch["timesteps"].tolist(), "input_noise": "input_noise" in batch,
                     "prediction_type": scheduler.config.prediction_type,
                     "terminal_alpha_bar": scheduler.alphas_cumprod[-1].item()})  # fmt: skip
        return real_predict(unet, scheduler, batch)

    def per_sample_loss(*args, **kwargs):
        seen[-1]["loss_options"] = kwargs
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(objective, "predict", predict)
    monkeypatch.setattr(loss, "per_sample_loss", per_sample_loss)
    return seen


def _spy_handoff(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The weights handed to evaluation (samples, validation images), by evaluation number."""
    handed: dict[int, dict[str, torch.Tensor]] = {}
    real = saving.write_handoff

    def write_handoff(full, handoff_dir):
        handed[len(handed)] = {k: v.clone() for k, v in full.items()}
        return real(full, handoff_dir)

    monkeypatch.setattr(saving, "write_handoff", write_handoff)
    return handed


def test_v_prediction_zero_terminal_snr_and_robust_loss_train_and_export(tiny_model_dir, cache_root, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    seen = _spy(monkeypatch)
    out = tmp_path / "v"
    argv = base_args(
        tiny_model_dir, cache_root, out, "--max_train_steps", "3", "--prediction_type", "v_prediction",
        "--zero_terminal_snr", "--loss_type", "huber", "--huber_c", "0.2", "--snr_gamma", "5",
        "--noise_offset", "0.1", "--noise_offset_random_strength", "--multires_noise_iterations", "3",
        "--input_perturbation", "0.1", "--timestep_sampling", "logit_normal", "--min_timestep", "100",
        "--max_timestep", "900", "--use_ema", "--ema_decay", "0.9", "--save_both_weights", "--checkpointing_steps",
        "1", "--weight_dtype", "fp32", "--save_samples", "--num_sample_images", "1", "--sample_steps", "1",
        "--save_samples_every_n_epochs", "1",
    )  # fmt: skip
    handed_over = _spy_handoff(monkeypatch)
    assert sdxl_fsdp_train.main(argv) == 0
    steps = read_metrics(out)
    assert len(steps) == 3 and all(r["finite"] for r in steps)
    train_seen = [s for s in seen if "loss_options" in s]
    assert len(train_seen) == 3
    for s in train_seen:
        assert s["prediction_type"] == "v_prediction" and s["terminal_alpha_bar"] == 0.0
        assert s["input_noise"] and all(100 <= t < 900 for t in s["timesteps"])
        options = {k: v for k, v in s["loss_options"].items() if k != "element_weights"}  # masks: issue 17b
        assert options == {"loss_type": "huber", "huber_c": 0.2, "huber_schedule": "snr", "snr_gamma": 5.0,
                           "debiased_estimation": False}  # fmt: skip

    # The exported pipeline: diffusers loads it with the trained target and the zero-terminal-SNR schedule.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "final"), torch_dtype=torch.float32)
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr and cfg.timestep_spacing == "trailing"
    saved = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction" and saved["rescale_betas_zero_snr"] is True
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", num_inference_steps=2, guidance_rescale=0.7, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip
    assert image.shape == (64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())

    # EMA on the one-process flat layout: the saved pipeline equals an independent EMA of the per-step weights
    # (diffusers' decay), the non-EMA pipeline the last weights, and samples were made from the EMA weights.
    expected = _independent_ema(out, 3, 0.9)
    last = checkpoint_weights(out / "checkpoints" / "step-3")
    saved_ema = load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    saved_raw = load_file(str(out / "final-non_ema" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved_ema.keys() == expected.keys() == saved_raw.keys()
    for k in expected:
        torch.testing.assert_close(saved_ema[k].double(), expected[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(saved_raw[k], last[k]), k
    assert any(not torch.equal(saved_ema[k], saved_raw[k]) for k in expected)
    assert (out / "checkpoints" / "step-3" / "extra" / "ema" / "rank0.safetensors").is_file()
    assert sorted(handed_over) == [0, 1]  # epoch 0 = the base model, epoch 1 = after the 3 steps
    for k in expected:
        assert torch.equal(handed_over[1][k], saved_ema[k]), k


def test_epsilon_options_reach_the_step(tiny_model_dir, cache_root, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    argv = base_args(
        tiny_model_dir, cache_root, tmp_path / "eps", "--max_train_steps", "1", "--no-save_final_model",
        "--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--debiased_estimation_loss",
        "--noise_offset", "0.05", "--timestep_bias_strategy", "range", "--timestep_bias_begin", "0",
        "--timestep_bias_end", "200", "--timestep_bias_multiplier", "1000", "--report_to", "tensorboard,wandb",
        "--save_samples", "--num_sample_images", "1", "--sample_steps", "1",
    )  # fmt: skip
    wandb = fake_wandb.make_module()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    assert sdxl_fsdp_train.main(argv) == 0
    assert read_metrics(tmp_path / "eps")[0]["finite"]
    # W&B got what TensorBoard got: the same scalar tags, the sample grid row, and the run summary.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb_dir,) = {p.parent for p in (tmp_path / "eps" / "tb").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    (run,) = wandb.runs
    logged = {k for record in run.logged for k in record} - {"step", "epoch"}
    assert logged == set(acc.Tags()["scalars"]) | set(acc.Tags()["images"]) and "Samples/grid row" in logged
    assert run.summary["optimizer_steps"] == 1 and run.finished
    assert run.init_kwargs["config"]["loss_type"] == "smooth_l1"
    (s,) = seen
    assert s["prediction_type"] == "epsilon" and not s["input_noise"]
    assert s["loss_options"]["loss_type"] == "smooth_l1" and s["loss_options"]["debiased_estimation"]
    assert s["loss_options"]["huber_schedule"] == "exponential"
    assert all(t < 200 for t in s["timesteps"])  # the range holds 99.6% of the probability


def test_zero_terminal_snr_with_an_epsilon_model_is_refused_naming_the_flag(
    tiny_model_dir, cache_root, tmp_path, capsys
):
    # The script prints an expected error as one line and exits 1 (sdxl_trainer.cli, issue 16).
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, tmp_path / "r", "--zero_terminal_snr")) == 1
    assert "error: --zero_terminal_snr needs a v-prediction" in capsys.readouterr().err


def _independent_ema(run: Path, steps: int, decay_cap: float) -> dict[str, torch.Tensor]:
    """diffusers' EMAModel decay applied in float64 to the weights of the per-step checkpoints."""
    expected: dict[str, torch.Tensor] = {}
    for n in range(1, steps + 1):
        weights = checkpoint_weights(run / "checkpoints" / f"step-{n}")
        decay = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay_cap).get_decay(n)
        expected = {k: decay * expected[k] + (1 - decay) * w.double() if expected else w.double()
                    for k, w in weights.items()}  # fmt: skip
    return expected


@pytest.mark.parametrize("strategy", ["shard_grad_op", "no_shard", "hybrid_shard"])
def test_ema_under_each_fsdp_strategy_equals_an_independent_ema(tiny_model_dir, cache_root, tmp_path, strategy):
    """One process per strategy (FULL_SHARD with 2 processes: test_objective_multiprocess.py)."""
    out = tmp_path / strategy
    argv = base_args(tiny_model_dir, cache_root, out, "--sharding", strategy, "--max_train_steps", "2",
                     "--checkpointing_steps", "1", "--use_ema", "--ema_decay", "0.5", "--weight_dtype", "fp32",
                     "--noise_offset", "0.05", "--snr_gamma", "5")  # fmt: skip
    assert sdxl_fsdp_train.main(argv) == 0
    expected = _independent_ema(out, 2, 0.5)
    saved = load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(saved[k].double(), expected[k], rtol=1e-5, atol=1e-6)
