"""Per-sample training loss: the element loss (L2, pseudo-Huber, smooth L1 with kohya's Huber schedule), the
timestep weighting (min-SNR-gamma, debiased estimation), and the one reduction of per-sample losses to the
step's loss. Pure functions over tensors (tests/test_objective_math.py checks them against independent formulas).

The SNR comes from diffusers (`training_utils.compute_snr`); the weights and the pseudo-Huber family are written
here because diffusers has them only inside its example scripts and kohya inside its training scripts.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
DEBIASED_SNR_CAP = 1000.0  # kohya caps the SNR before 1/sqrt(SNR): the first timesteps' weights stay finite


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t / (1 - alpha_bar_t) per sample, by diffusers' own function (fp32, on the timesteps' device)."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps).float()


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
    """The per-sample Huber threshold c(t) (kohya sd-scripts' `--huber_schedule`):

    constant      c
    exponential   c ** (t / T): 1 at t = 0 (L2-like for fine detail), c at t = T
    snr           (1 - c) / (1 + sigma_t) ** 2 + c with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        return huber_c ** (t / scheduler.config.num_train_timesteps)
    if schedule == "snr":
        alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()  # inf at a zero terminal SNR: c there, as it should be
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"--huber_schedule: unknown schedule {schedule!r}; use one of {HUBER_SCHEDULES}")


def element_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss per element in fp32. huber: 2c (sqrt(d^2 + c^2) - c) (pseudo-Huber: d^2 near 0, 2c|d| far out);
    smooth_l1: the same divided by c (|d| far out). `threshold` is c per sample, shape (B,)."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2)
    if threshold is None:
        raise ValueError(f"--loss_type {loss_type} needs a Huber threshold")
    c = threshold.float().view(-1, *([1] * (diff.ndim - 1)))
    # sqrt(d^2 + c^2) - c, written without the cancellation that loses small errors in fp32
    pseudo = diff.pow(2) / (torch.sqrt(diff.pow(2) + c.pow(2)) + c)
    if loss_type == "huber":
        return 2 * c * pseudo
    if loss_type == "smooth_l1":
        return 2 * pseudo
    raise ValueError(f"--loss_type: unknown loss {loss_type!r}; use one of {LOSS_TYPES}")


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) weights for an epsilon or v target: min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v (the v loss is the epsilon loss times SNR + 1)."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"--snr_gamma: min-SNR weighting needs an epsilon or v_prediction target, not {prediction_type}")


def debiased_weights(snr_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024, as kohya's `--debiased_estimation_loss`): 1 / sqrt(SNR) for epsilon,
    1 / (SNR + 1) for v, the SNR capped at 1000."""
    capped = torch.clamp(snr_t, max=DEBIASED_SNR_CAP)
    if prediction_type == "epsilon":
        return capped.rsqrt()
    if prediction_type == "v_prediction":
        return 1 / (capped + 1)
    raise ValueError(f"--debiased_estimation needs an epsilon or v_prediction target, not {prediction_type}")


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    *,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    huber_schedule: str = "snr",
    snr_gamma: float | None = None,
    debiased_estimation: bool = False,
    element_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) loss of each sample: the element loss averaged over the sample's elements (weighted by
    `element_weights`, e.g. a per-pixel mask broadcastable to the prediction), times its timestep weight."""
    threshold = None if loss_type == "l2" else huber_threshold(huber_schedule, huber_c, timesteps, scheduler)
    elements = element_loss(prediction, target, loss_type, threshold)
    if element_weights is None:
        per_sample = elements.flatten(1).mean(dim=1)
    else:
        w = element_weights.float().expand_as(elements).flatten(1)
        per_sample = (elements.flatten(1) * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)
    if snr_gamma is None and not debiased_estimation:
        return per_sample
    snr_t = snr(scheduler, timesteps)
    prediction_type = scheduler.config.prediction_type
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(snr_t, snr_gamma, prediction_type)
    if debiased_estimation:
        per_sample = per_sample * debiased_weights(snr_t, prediction_type)
    return per_sample


def reduce_loss(
    per_sample: torch.Tensor, sample_weights: torch.Tensor | None = None, weight_total: float | None = None
) -> torch.Tensor:
    """The one reduction of per-sample losses.

    With `weight_total` (the training step): this micro-batch's share of the optimizer step's weighted mean,
    sum_i w_i * loss_i / weight_total, where `weight_total` is the sum of the weights of the whole step (every
    micro-batch of every rank), known ahead from the epoch plan. The shares of all micro-batches and ranks add up
    to the weighted mean, and padding (w = 0) changes neither value nor gradient; the caller multiplies by the
    number of ranks because FSDP averages gradients over ranks. Without it: the micro-batch's own (weighted) mean."""
    if sample_weights is None:
        return per_sample.mean()
    w = sample_weights.to(per_sample.dtype)
    if weight_total is not None:
        return (per_sample * w).sum() / max(float(weight_total), 1e-12)
    return (per_sample * w).sum() / w.sum().clamp_min(1e-12)
