"""Pure tensor math of one diffusion training step: noise, timesteps, noisy latents, targets, loss, SDXL time ids.

Each function is a few lines over tensors and has a CPU unit test (tests/test_diffusion.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise (DDPM), drawn from `generator` so runs and resumes are reproducible."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh draw from the cached VAE posterior: mean + std * randn (computed in fp32)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return mean.float() + std.float() * eps


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, by the scheduler's own betas."""
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, by the scheduler config's prediction_type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config")


def compute_time_ids(
    original_size_hw: torch.Tensor, crop_top_left: torch.Tensor, target_size_hw: torch.Tensor
) -> torch.Tensor:
    """SDXL micro-conditioning as a (B, 6) tensor, one row per sample, in SDXL's order
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    The UNet flattens this and reshapes the embedding to (B, 6 * dim) row-major, so each row must belong
    to one sample (the original concatenated fields column-wise and scrambled them for B > 1: B1). The
    result is int64: FSDP's mixed-precision input cast leaves integers alone, so sizes like 1681 are not
    rounded to bf16 (1680) before the UNet's sinusoidal embedding, which upcasts to fp32 itself.
    """
    rows = torch.cat([original_size_hw, crop_top_left, target_size_hw], dim=1)
    if rows.ndim != 2 or rows.shape[1] != 6:
        raise ValueError(f"time ids need (B,2) inputs each, got a result of shape {tuple(rows.shape)}")
    return rows.to(torch.int64)


def predict(unet: torch.nn.Module, scheduler, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction and the training target for one batch (tensors already on the device): noisy
    latents by the scheduler, SDXL conditioning = context, pooled text embedding and per-sample time ids.
    A batch of captions of different lengths carries `encoder_attention_mask` (padding left out of attention)."""
    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    # With --input_perturbation the input is noised with a perturbed noise while the target keeps `noise`.
    noisy = add_noise(scheduler, latents, batch.get("input_noise", noise), timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    prediction = unet(
        noisy,
        timesteps,
        encoder_hidden_states=batch["prompt_embeds"],
        encoder_attention_mask=batch.get("encoder_attention_mask"),
        added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
    ).sample
    return prediction, target
